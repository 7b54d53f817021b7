"""What `latent qa` finds and what it is worth, on phantoms with injected defects.

    python benchmarks/bench_qa.py [--work bench_qa] [--cases 60] [--seconds 120] [--note "idle machine"]

1. **Detection**: ``--cases`` small phantoms, about a third of them with one defect each (round
   robin over every defect the generator injects: MR banding, a field-of-view cut, an object in
   one modality only, an MR signal void, a CT offset, metal, rigid misregistration). ``latent qa``
   labels the cohort; a defect is *found* when its case is not GREEN, and *localised* when, for
   defects with slices, a flagged slice of the right kind lies on a recorded slice. The clean
   cases give the false-flag rate (not GREEN). Seconds per 10 cases are timed. Then, since each
   defect appears only a few times there, ``--stress`` cohorts of ``--cases`` phantoms with one
   kind of defect in half of them (by default the two smallest: MR signal voids, which can look
   like dark tissue, and rigid misregistrations of 2 degrees and 2 mm at most).
2. **Worth**: 40 phantoms, 6 of them (a fifth of the 31 training cases) with one defect each;
   clean validation (3) and test (6) cases. The demo's ``l2l_regress`` recipe is trained twice at
   the same budget on the same cache (the shipped stand-in VAE, the demo grid): on every training
   case, and without the cases ``latent qa`` labels RED or YELLOW (``latent split --qa --exclude
   red,yellow``). Test MAE per case on the native grid, mean difference and the Wilcoxon
   signed-rank test of the pairs.

Writes ``benchmarks/results/bench_qa.{json,md}`` with the machine, its load and the git revision.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "benchmarks" / "results"
#: Slice-reason codes of ``latent qa`` that localise each slice-wise defect.
SLICE_CODES = {"banding": {"mr_banding"}, "signal_void": {"mr_void", "mr_dark"}, "metal": {"metal"},
               "extra_object": {"one_modality", "mr_void", "ct_air"}, "fov_cut": {"fov_cut"}}


def detection(work: Path, cases: int, seed: int, defects: tuple[str, ...] | None = None, fraction: float = 0.35,
              name: str = "detection") -> dict:
    """Generate the cohort (every defect, or ``defects``), run ``latent qa`` on it, and score what it
    finds against the record."""
    from latent.app.qa_run import run_qa
    from latent.core.phantom.defects import DEFECTS
    from latent.core.phantom.generate import generate_phantom_dataset
    from latent.core.qa.config import QAConfig

    data = work / name / "data"
    generate_phantom_dataset(data, cases, seed=seed, defects=defects or DEFECTS, defect_fraction=fraction,
                             defects_per_case="one")
    injected = json.loads((data / "phantom.json").read_text())["defect_cases"]
    started = time.perf_counter()
    outcome = run_qa(data, work / name / "qa", QAConfig(), quiet=True)
    seconds = time.perf_counter() - started
    by_pid = {qa.pid: qa for qa in outcome.cohort.cases}
    rows = []
    for pid, defects in sorted(injected.items()):
        qa = by_pid.get(pid)
        for name, record in defects.items():
            label = qa.values.get("label") if qa else "FAILED"
            flagged = {index for index, code in (qa.slices if qa else []) if code in SLICE_CODES.get(name, set())}
            localised = bool(flagged & set(record.get("slices", []))) if name in SLICE_CODES else None
            rows.append({"pid": pid, "defect": name, "label": label, "found": label not in ("GREEN", "FAILED"),
                         "localised": localised, "reasons": qa.values.get("reasons") if qa else ""})
    clean = [qa for pid, qa in by_pid.items() if pid not in injected]
    false_flags = [qa.pid for qa in clean if qa.values.get("label") != "GREEN"]
    per_defect = {}
    for defect in DEFECTS:
        mine = [row for row in rows if row["defect"] == defect]
        if mine:
            localised = [row["localised"] for row in mine if row["localised"] is not None]
            per_defect[defect] = {"cases": len(mine), "found": sum(row["found"] for row in mine),
                                "localised": sum(localised) if localised else None}
    return {"cases": cases, "defect_cases": len(injected), "clean_cases": len(clean), "failed": outcome.run.failures,
            "false_flags": false_flags, "false_flag_rate": len(false_flags) / max(1, len(clean)),
            "recall": sum(row["found"] for row in rows) / max(1, len(rows)), "per_defect": per_defect,
            "rows": rows, "seconds": seconds, "seconds_per_10_cases": 10 * seconds / cases,
            "labels": outcome.counts()}


def worth(work: Path, seconds: float, seed: int) -> dict:
    """Train l2l_regress with and without the QA exclusions at one budget; score the clean test cases."""
    from scipy.stats import wilcoxon

    from latent.app.demo import DEMO_GRID
    from latent.app.encode_run import encode_dataset
    from latent.app.methods import predict_method, train_recipe
    from latent.app.qa_run import run_qa
    from latent.core.cases import QA_EXCLUDED, discover_cases, exclude_by_label, save_splits
    from latent.core.phantom.defects import DEFECTS
    from latent.core.phantom.generate import generate_phantom_dataset
    from latent.core.qa.config import QAConfig
    from latent.core.recipes import RECIPES_DIR
    from latent.core.vae.loading import load_vae

    root = work / "worth"
    data = root / "data"
    generate_phantom_dataset(data, 40, seed=seed, defects=DEFECTS, defect_fraction=0.15, defects_per_case="one")
    injected = json.loads((data / "phantom.json").read_text())["defect_cases"]
    cases = sorted(discover_cases(data), key=lambda case: case.pid)
    clean = [case for case in cases if case.pid not in injected]
    test = [c.pid for region in ("AB", "HN", "TH") for c in [c for c in clean if c.region == region][:2]]
    val = [c.pid for region in ("AB", "HN", "TH") for c in [c for c in clean if c.region == region][2:3]]
    splits = {"train": [c.pid for c in cases if c.pid not in test + val], "val": val, "test": test}
    save_splits(splits, root / "splits.json")
    outcome = run_qa(data, root / "qa", QAConfig(), quiet=True)
    labels = {qa.pid: str(qa.values.get("label")) for qa in outcome.cohort.cases}
    filtered = exclude_by_label(splits, labels, ("RED", "YELLOW"))
    save_splits(filtered, root / "splits_qa.json")
    encode_dataset(data, root / "cache.zarr", load_vae("standin"), DEMO_GRID, split_file=root / "splits.json",
                   quiet=True)
    recipe = RECIPES_DIR / "l2l_regress_demo.yaml"
    results = {}
    for name, split_file in (("without_qa", root / "splits.json"), ("with_qa", root / "splits_qa.json")):
        run_dir = root / "runs" / name
        trained = train_recipe(recipe, run_dir, root / "cache.zarr", split_file, seconds)
        result = predict_method(name, run_dir, data, root, test, trained, vae_spec="standin")
        results[name] = {row["pid"]: row["mae"] for row in result.rows}
    pairs = [(results["without_qa"][pid], results["with_qa"][pid]) for pid in test
             if pid in results["without_qa"] and pid in results["with_qa"]]
    differences = [b - a for a, b in pairs]
    p_value = float(wilcoxon([a for a, _ in pairs], [b for _, b in pairs]).pvalue) if len(pairs) >= 2 else None
    excluded = filtered[QA_EXCLUDED]
    defect_train = [pid for pid in splits["train"] if pid in injected]
    return {"cases": len(cases), "train": len(splits["train"]), "defect_train_cases": defect_train,
            "defects": {pid: list(injected[pid]) for pid in defect_train}, "qa_excluded": excluded,
            "excluded_defect_cases": sorted(set(excluded) & set(defect_train)),
            "excluded_clean_cases": sorted(set(excluded) - set(defect_train)), "seconds_per_run": seconds,
            "test": test, "mae": results,
            "mean_mae": {name: sum(values.values()) / len(values) for name, values in results.items()},
            "mean_difference_with_minus_without": sum(differences) / len(differences) if differences else None,
            "wilcoxon_p": p_value}


def markdown(record: dict) -> str:
    """The report."""
    found, trained = record["detection"], record["worth"]
    lines = [record["header"], "", "## Detection", "",
             f"{found['cases']} phantoms, {found['defect_cases']} with one defect each, {found['clean_cases']} clean; "
             f"labels {found['labels']}; {len(found['failed'])} failed. Recall (defect case not GREEN): "
             f"{found['recall']:.0%}. False flags on clean cases: {len(found['false_flags'])} of "
             f"{found['clean_cases']} ({found['false_flag_rate']:.0%}). {found['seconds_per_10_cases']:.1f} s per 10 cases.",
             "", "| defect | cases | found | localised on its slices |", "|---|---|---|---|"]
    for name, row in found["per_defect"].items():
        localised = "-" if row["localised"] is None else f"{row['localised']} of {row['cases']}"
        lines.append(f"| {name} | {row['cases']} | {row['found']} of {row['cases']} | {localised} |")
    missed = [row for row in found["rows"] if not row["found"]]
    if missed:
        lines += ["", "Missed: " + "; ".join(f"{row['pid']} ({row['defect']})" for row in missed)]
    if found["false_flags"]:
        lines += ["", "Flagged clean cases: " + ", ".join(found["false_flags"])]
    for single in record.get("stress", []):
        missed = [row["pid"] for row in single["rows"] if not row["found"]]
        row = single["per_defect"][single["defect"]]
        localised = "" if row["localised"] is None else f", localised {row['localised']}"
        lines += ["", f"## {single['defect']} alone (seed {single['seed']})", "",
                  f"{single['cases']} phantoms, {single['defect_cases']} with {single['defect']}: found "
                  f"{row['found']} of {single['defect_cases']}{localised}; false flags on clean cases: "
                  f"{len(single['false_flags'])} of {single['clean_cases']}"
                  + (f" ({', '.join(single['false_flags'])})" if single["false_flags"] else "")
                  + (f"; missed: {', '.join(missed)}" if missed else "") + "."]
    lines += ["", "## Worth (l2l_regress, same budget, clean test cases, MAE in HU)", "",
              f"{trained['train']} training cases, {len(trained['defect_train_cases'])} with a defect "
              f"({', '.join(f'{pid}: {names[0]}' for pid, names in trained['defects'].items())}); latent qa kept "
              f"{len(trained['qa_excluded'])} out ({len(trained['excluded_defect_cases'])} with a defect, "
              f"{len(trained['excluded_clean_cases'])} clean). {trained['seconds_per_run']:.0f} s per run.", "",
              "| test case | without QA | with QA |", "|---|---|---|"]
    for pid in trained["test"]:
        lines.append(f"| {pid} | {trained['mae']['without_qa'].get(pid, float('nan')):.1f} | "
                     f"{trained['mae']['with_qa'].get(pid, float('nan')):.1f} |")
    p_value = trained["wilcoxon_p"]
    lines += [f"| mean | {trained['mean_mae']['without_qa']:.1f} | {trained['mean_mae']['with_qa']:.1f} |", "",
              f"Mean difference (with - without): {trained['mean_difference_with_minus_without']:+.1f} HU; "
              f"Wilcoxon signed-rank p = {p_value:.3g} (n = {len(trained['test'])})." if p_value is not None else ""]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench_qa"), help="scratch folder")
    parser.add_argument("--cases", type=int, default=60, help="phantoms of the detection cohort")
    parser.add_argument("--seconds", type=float, default=120.0, help="training budget of each l2l_regress run")
    parser.add_argument("--seed", type=int, default=21, help="phantom seed")
    parser.add_argument("--stress", default="signal_void:22,signal_void:23,misregistration:24,misregistration:25",
                        help="extra cohorts DEFECT:SEED with that defect only, in half the cases (empty: none)")
    parser.add_argument("--note", default="", help="recorded with the results (machine state, purpose)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPOSITORY))
    from latent.core.provenance import git_revision, machine_description

    load_before = os.getloadavg()
    started = time.perf_counter()
    work = args.work.resolve()
    record = {"script": "benchmarks/bench_qa.py", "git": git_revision(), "machine": machine_description(),
              "date": f"{datetime.now(timezone.utc):%Y-%m-%d}", "load_average_before": load_before,
              "note": args.note, "detection": detection(work, args.cases, args.seed)}
    print(json.dumps({k: v for k, v in record["detection"].items() if k != "rows"}, indent=1), flush=True)
    record["stress"] = [dict(detection(work, args.cases, int(seed), (defect,), 0.5, f"{defect}_{seed}"),
                             defect=defect, seed=int(seed))
                        for defect, seed in (text.split(":") for text in args.stress.split(",") if text.strip())]
    record["worth"] = worth(work, args.seconds, args.seed + 1)
    record["load_average_after"] = os.getloadavg()
    record["wall_seconds"] = time.perf_counter() - started
    record["header"] = (f"<!-- written by benchmarks/bench_qa.py at git {record['git']}, {record['date']}, "
                        f"{record['machine']}, load average {load_before[0]:.2f} before / "
                        f"{record['load_average_after'][0]:.2f} after. {args.note} -->\n"
                        "# latent qa on phantoms with injected defects")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_qa.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (RESULTS / "bench_qa.md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
