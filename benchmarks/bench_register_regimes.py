"""Does misregistration bias the scores? The regimes experiment on phantoms whose true CT is known.

    python benchmarks/bench_register_regimes.py [--work bench_regimes] [--cases 30] [--seconds 90] [--note "..."]

Every phantom's CT is rigidly misregistered and smoothly deformed against its MR
(``latent phantom --defects misregistration,deformation --write-truth``), so each case has a true
aligned CT. The demo's ``l2l_regress`` recipe (shipped stand-in VAE, demo grid) is trained at one
budget on four versions of the same training pairs: (a) aligned (the true CT), (b) misregistered,
(c) re-registered by ``latent register --method rigid`` and (d) by ``--method bspline`` (cases a
method refuses are left out of its training set). All four predict the same test cases from
their MR files and are scored against (i) the true aligned CT and (ii) the misregistered CT:
MAE in HU, bone Dice and bone HD95 (the blur of bone edges), with Wilcoxon signed-rank tests of
each regime against (a), and the slices of the first test case against the true CT per regime
(``benchmarks/results/bench_register_regimes/<regime>.png``). Writes
``benchmarks/results/bench_register_regimes.{json,md}`` with the machine, its load and the git
revision.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "benchmarks" / "results"
REGIMES = ("aligned", "misregistered", "rigid", "bspline")
COLUMNS = ("mae", "bone_dice", "bone_hd95")


def aligned_root(data: Path, out: Path) -> Path:
    """A copy of ``data`` whose ``ct.mha`` is each case's true aligned CT (``ct_true.mha``)."""
    from latent.core.cases import discover_cases

    for case in discover_cases(data):
        folder = out / case.folder.relative_to(data)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("mr.mha", "mask.mha"):
            shutil.copyfile(case.folder / name, folder / name)
        shutil.copyfile(case.folder / "ct_true.mha", folder / "ct.mha")
    return out


def build(work: Path, cases: int, seed: int) -> tuple[dict[str, Path], dict[str, list[str]], dict]:
    """The phantoms, their four training roots, the split and what registration refused."""
    from latent.app.register_run import run_register
    from latent.core.cases import discover_cases, make_splits, save_splits
    from latent.core.phantom.generate import generate_phantom_dataset
    from latent.core.registration.case import RegisterSettings

    data = work / "misregistered"
    generate_phantom_dataset(data, cases, seed=seed, defects=("misregistration", "deformation"), write_truth=True)
    roots = {"aligned": aligned_root(data, work / "aligned"), "misregistered": data}
    refused = {}
    for method in ("rigid", "bspline"):
        outcome = run_register(data, work / method, RegisterSettings(method=method), quiet=True)
        roots[method] = work / method
        refused[method] = sorted(outcome.run.failures)
    splits = make_splits(discover_cases(data), seed=seed)
    save_splits(splits, work / "splits.json")
    return roots, splits, refused


def train_and_score(work: Path, roots: dict[str, Path], splits: dict[str, list[str]], seconds: float) -> dict:
    """Per regime: encode its root, train, predict the test MRs, score against both CTs."""
    from latent.app.demo import DEMO_GRID
    from latent.app.encode_run import encode_dataset
    from latent.app.methods import train_recipe
    from latent.app.predict_run import PredictOptions, load_run_and_vae, predict_dataset
    from latent.core.cases import discover_cases, save_splits
    from latent.core.recipes import RECIPES_DIR
    from latent.core.vae.loading import load_vae
    from latent.evaluation.scoring import evaluate_predictions

    vae = load_vae("standin")
    test = splits["test"]
    scores: dict = {}
    for regime in REGIMES:
        root, folder = roots[regime], work / "runs" / regime
        present = {case.pid for case in discover_cases(root)}
        regime_splits = {name: [pid for pid in pids if pid in present] for name, pids in splits.items()}
        save_splits(regime_splits, folder / "splits.json")
        encode_dataset(root, folder / "cache.zarr", vae, DEMO_GRID, split_file=folder / "splits.json", quiet=True)
        train_recipe(RECIPES_DIR / "l2l_regress_demo.yaml", folder / "run", folder / "cache.zarr", folder / "splits.json",
                     seconds)
        run, run_vae = load_run_and_vae(folder / "run", "standin")
        predict_dataset(run, run_vae, roots["aligned"], folder / "pred", pids=test, options=PredictOptions(),
                        quiet=True)
        scores[regime] = {}
        for target in ("aligned", "misregistered"):
            evaluation = evaluate_predictions(folder / "pred", roots[target], pids=test, quiet=True)
            scores[regime][target] = {row["pid"]: {c: row[c] for c in COLUMNS} for row in evaluation.rows}
        print(regime, {t: {c: round(sum(r[c] for r in rows.values()) / max(1, len(rows)), 2) for c in COLUMNS}
                       for t, rows in scores[regime].items()}, flush=True)
    return scores


def figures(work: Path, roots: dict[str, Path], pid: str) -> dict[str, str]:
    """Per regime, the slices of test case ``pid`` against the true CT (MR | CT | sCT | error), as
    PNGs in ``benchmarks/results/bench_register_regimes/``; their paths relative to the report."""
    import numpy as np

    from latent.app.bench.figures import slice_panel
    from latent.core.cases import discover_cases
    from latent.core.io import read_volume
    from latent.core.prepare import read_native
    from latent.evaluation.scoring import find_prediction

    case = next(c for c in discover_cases(roots["aligned"]) if c.pid == pid)
    mr, mask, ct, properties = read_native(case)
    folder = RESULTS / "bench_register_regimes"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for regime in REGIMES:
        sct = read_volume(find_prediction(work / "runs" / regime / "pred", pid), dtype=np.float32)[0]
        slice_panel(mr, ct, sct, mask, folder / f"{regime}.png", title=f"trained on {regime} pairs: {pid}, true CT",
                    spacing_zyx=tuple(reversed(properties.spacing)))
        paths[regime] = f"bench_register_regimes/{regime}.png"
    return paths


def paired(scores: dict, target: str, metric: str, regime: str) -> dict:
    """Mean of ``regime`` and of ``aligned`` on ``target`` and the Wilcoxon p of their pairs."""
    from scipy.stats import wilcoxon

    mine, base = scores[regime][target], scores["aligned"][target]
    pids = [pid for pid in base if pid in mine]
    a, b = [base[pid][metric] for pid in pids], [mine[pid][metric] for pid in pids]
    finite = [(x, y) for x, y in zip(a, b) if abs(x) != float("inf") and abs(y) != float("inf")]
    p_value = None
    if len(finite) >= 2 and any(x != y for x, y in finite):
        p_value = float(wilcoxon([x for x, _ in finite], [y for _, y in finite]).pvalue)
    mean = lambda values: sum(values) / len(values) if values else float("nan")  # noqa: E731
    return {"n": len(finite), "mean": mean([y for _, y in finite]), "aligned_mean": mean([x for x, _ in finite]),
            "wilcoxon_p": p_value}


def markdown(record: dict) -> str:
    """The report: one table per target CT."""
    lines = [record["header"], "",
             f"{record['cases']} phantoms (every CT misregistered: rigid + smooth deformation, the true CT known); "
             f"test cases {', '.join(record['test'])}; l2l_regress {record['seconds']:.0f} s per regime. "
             f"Registration refused (left out of that regime's training): "
             + "; ".join(f"{m}: {', '.join(p) or 'none'}" for m, p in record["refused"].items()) + "."]
    for target, title in (("aligned", "scored against the true aligned CT"),
                          ("misregistered", "scored against the misregistered CT (what a public score would use)")):
        lines += ["", f"## {title}", "", "| trained on | MAE (HU) | p vs aligned | bone Dice | bone HD95 (mm) |",
                  "|---|---|---|---|---|"]
        for regime in REGIMES:
            row = {m: record["paired"][target][m][regime] for m in COLUMNS}
            p_value = row["mae"]["wilcoxon_p"]
            lines.append(f"| {regime} | {row['mae']['mean']:.1f} | {'-' if regime == 'aligned' or p_value is None else f'{p_value:.3g}'}"
                         f" | {row['bone_dice']['mean']:.3f} | {row['bone_hd95']['mean']:.2f} |")
    if record.get("figures"):
        lines += ["", f"## slices of test case {record['test'][0]} against the true CT", ""]
        lines += [f"![{regime}]({path})" for regime, path in record["figures"].items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench_regimes"), help="scratch folder")
    parser.add_argument("--cases", type=int, default=30, help="phantoms (split 70/10/20 by region)")
    parser.add_argument("--seconds", type=float, default=90.0, help="training budget of each regime")
    parser.add_argument("--seed", type=int, default=31)
    parser.add_argument("--note", default="", help="recorded with the results (machine state, purpose)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPOSITORY))
    from latent.core.provenance import git_revision, machine_description

    load_before = os.getloadavg()
    started = time.perf_counter()
    work = args.work.resolve()
    if work.exists():
        shutil.rmtree(work)
    roots, splits, refused = build(work, args.cases, args.seed)
    scores = train_and_score(work, roots, splits, args.seconds)
    panels = figures(work, roots, splits["test"][0])
    record = {"script": "benchmarks/bench_register_regimes.py", "git": git_revision(), "machine": machine_description(),
              "date": f"{datetime.now(timezone.utc):%Y-%m-%d}", "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "wall_seconds": time.perf_counter() - started,
              "note": args.note, "cases": args.cases, "seconds": args.seconds, "test": splits["test"],
              "refused": refused, "scores": scores, "figures": panels,
              "paired": {target: {metric: {regime: paired(scores, target, metric, regime) for regime in REGIMES}
                                  for metric in COLUMNS} for target in ("aligned", "misregistered")}}
    record["header"] = (f"<!-- written by benchmarks/bench_register_regimes.py at git {record['git']}, {record['date']}, "
                        f"{record['machine']}, load average {load_before[0]:.2f} before / "
                        f"{record['load_average_after'][0]:.2f} after. {args.note} -->\n"
                        "# Misregistration regimes on phantoms (l2l_regress, test split, native grid)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_register_regimes.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (RESULTS / "bench_register_regimes.md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
