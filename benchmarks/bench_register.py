"""`latent register` against the phantom's truth: residual misalignment (mm) and MAE against the true CT.

    python benchmarks/bench_register.py [--work bench_register] [--cases 10] [--threads 2] [--note "idle machine"]
    python benchmarks/bench_register.py --maps benchmarks/register_variants/noz --methods bspline \
        --cohorts deformation --name bench_register_noz

Two cohorts of ``--cases`` small phantoms with their truth (``--write-truth``): one with a rigid
offset (``misregistration``: <= 2 deg, <= 2 mm), one with a smooth deformation (2-4 mm). Each is
registered with ``--method rigid``, ``bspline`` and ``feature`` through ``run_register`` (the command's
own walk, default settings). Per cohort and method: cases registered / refused, mean residual
misalignment in mm (length of the residual motion over the mask, docs/registration.md) before and
after, split into through-plane (z) and in-plane, the smoothed MAE against the true CT before and
after, how many cases improved on each, the median seconds per case (the first case also pays
the itk import; ``feature`` also runs elastix's rigid registration first), and the floor: the
motion the method finds when handed the true CT (its bias on the phantom). Writes
``benchmarks/results/<name>.{json,md}`` (default ``bench_register``) with the machine, its load and
the git revision. ``--maps DIR`` registers with other parameter maps (``rigid.txt`` and
``bspline.txt`` named like the shipped ones; the variants tried are in
``benchmarks/register_variants/``), recorded with their text. ``--feature-network DIR`` gives
``feature`` a segmentation weights folder (e.g. from ``benchmarks/train_phantom_segmenter.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "benchmarks" / "results"
COHORTS = {"rigid offset": "misregistration", "deformation": "deformation"}
METHODS = ("rigid", "bspline", "feature")
#: Slices left out at each end of the volume for the interior MAE.
END_SLICES = 2


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 3) if values else None


def measure(work: Path, cohort: str, defect: str, method: str, cases: int, seed: int, threads: int,
            maps: Path | None = None, feature_network: Path | None = None) -> dict:
    """Register one cohort with one method; summarise its rows against the truth."""
    from latent.app.register_run import run_register
    from latent.core.phantom.generate import generate_phantom_dataset
    from latent.core.registration.case import RegisterSettings
    from latent.core.registration.settings import FeatureSettings

    data = work / defect
    if not (data / "phantom.json").is_file():
        generate_phantom_dataset(data, cases, ["AB", "HN", "TH"], seed=seed, defects=[defect], write_truth=True)
    out = work / "_".join([defect, method] + [path.name for path in (maps, feature_network) if path is not None])
    feature = FeatureSettings(network=str(feature_network)) if feature_network else FeatureSettings()
    settings = RegisterSettings(method=method, threads=threads, parameter_dir=maps, feature=feature)
    outcome = run_register(data, out, settings, quiet=True)
    rows = [row for row in outcome.run.results.values() if not row.get("reused")]
    failures = {pid: str(error) for pid, error in outcome.run.failures.items()}
    summary = {"cohort": cohort, "method": method, "cases": cases, "registered": len(rows),
               "refused": failures, "rows": rows}
    for key in ("residual_mm", "residual_p95_mm", "true_mae"):
        summary[f"{key}_before"] = _mean([row[f"{key}_before"] for row in rows])
        summary[f"{key}_after"] = _mean([row[f"{key}_after"] for row in rows])
    summary["residual_improved"] = sum(row["residual_mm_after"] < row["residual_mm_before"] for row in rows)
    summary["mae_improved"] = sum(row["true_mae_after"] < row["true_mae_before"] for row in rows)
    summary["median_seconds"] = round(statistics.median(row["seconds"] for row in rows), 2) if rows else None
    summary.update(axes(data, rows, settings))
    summary.update(floor(data, settings))
    return summary


def axes(data: Path, rows: list[dict], settings) -> dict:
    """Mean through-plane (z) and in-plane residual (mm) after registering, from the written CTs' fields,
    and the smoothed MAE against the true CT without the first and last :data:`END_SLICES` slices of
    the mask (where a slide along z reads the -1000 HU outside the volume)."""
    import numpy as np

    from latent.core.cases import discover_cases
    from latent.core.phantom.truth import read_truth
    from latent.core.prepare import read_native
    from latent.core.registration.methods import register_field
    from latent.core.registration.elastix import warp
    from latent.core.registration.truth import residual_motion, smoothed_mae

    # the registered root keeps no field; re-derive it with the same maps (deterministic seed; the feature
    # fit is deterministic on the CPU)
    through, inplane, through_before, inplane_before, interior_before, interior = [], [], [], [], [], []
    registered = {row["pid"]: row["method"] for row in rows}
    for case in discover_cases(data):
        if case.pid not in registered:
            continue
        mr, mask, ct, properties = read_native(case)
        spacing = tuple(float(s) for s in reversed(properties.spacing))
        truth, motion = read_truth(case.folder)
        field = register_field(mr, ct, mask, spacing, settings)
        core = mask.copy()
        core[:END_SLICES], core[-END_SLICES:] = 0, 0
        interior_before.append(smoothed_mae(ct, truth, core))
        interior.append(smoothed_mae(warp(ct, field, spacing, -1000.0), truth, core))
        residual, inside = residual_motion(field, motion, spacing), mask > 0
        through.append(float(np.abs(residual[0])[inside].mean()))
        inplane.append(float(np.linalg.norm(residual[1:], axis=0)[inside].mean()))
        through_before.append(float(np.abs(motion[0])[inside].mean()))
        inplane_before.append(float(np.linalg.norm(motion[1:], axis=0)[inside].mean()))
    return {"through_plane_mm_before": _mean(through_before), "through_plane_mm_after": _mean(through),
            "in_plane_mm_before": _mean(inplane_before), "in_plane_mm_after": _mean(inplane),
            "interior_mae_before": _mean(interior_before), "interior_mae_after": _mean(interior)}


def floor(data: Path, settings) -> dict:
    """The method's own bias: the motion (mm, mean over the mask and the cases) it finds when given
    the true, aligned CT, where the right answer is none."""
    import numpy as np

    from latent.core.cases import discover_cases
    from latent.core.phantom.truth import read_truth
    from latent.core.prepare import read_native
    from latent.core.registration.methods import register_field

    length, through, inplane = [], [], []
    for case in discover_cases(data):
        mr, mask, _, properties = read_native(case)
        spacing = tuple(float(s) for s in reversed(properties.spacing))
        truth = read_truth(case.folder)[0].astype(np.float32)
        field, inside = register_field(mr, truth, mask, spacing, settings), mask > 0
        length.append(float(np.linalg.norm(field, axis=0)[inside].mean()))
        through.append(float(np.abs(field[0])[inside].mean()))
        inplane.append(float(np.linalg.norm(field[1:], axis=0)[inside].mean()))
    return {"floor_mm": _mean(length), "floor_through_plane_mm": _mean(through), "floor_in_plane_mm": _mean(inplane)}


def markdown(record: dict) -> str:
    """The report: one row per cohort and method."""
    lines = [record["header"], "",
             f"{record['cases']} small phantoms per cohort (regions AB, HN, TH, seed {record['seed']}), "
             + (f"parameter maps of {record['maps']} (below)" if record.get("maps") else "shipped parameter maps")
             + ", default settings (feature: "
             + (f"the segmentation network of {record['feature_network']}" if record.get("feature_network")
                else "the stand-in VAE") + "). Residual: mean length (mm) over the mask of the motion "
             "left between the registered CT and the true CT; MAE: smoothed MAE (HU) against the true CT "
             "(docs/registration.md). Before -> after; refused cases (diverged or folded) are left out. "
             "Interior MAE: the same without the "
             f"first and last {END_SLICES} slices. Floor: the motion the method finds when given the true, aligned CT (mean length, through-plane / "
             "in-plane, mm): its own bias, where the right answer is 0.", "",
             "| cohort | method | registered | residual mm | through-plane mm | in-plane mm | p95 mm "
             "| residual improved | true MAE HU | MAE improved | interior MAE HU | median s / case | floor mm (z / in-plane) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in record["results"]:
        def pair(key: str) -> str:
            return f"{row[key + '_before']} -> {row[key + '_after']}"
        lines.append(f"| {row['cohort']} | {row['method']} | {row['registered']} of {row['cases']} | "
                     f"{pair('residual_mm')} | {pair('through_plane_mm')} | {pair('in_plane_mm')} | "
                     f"{pair('residual_p95_mm')} | {row['residual_improved']} of {row['registered']} | "
                     f"{pair('true_mae')} | {row['mae_improved']} of {row['registered']} | {pair('interior_mae')} | "
                     f"{row['median_seconds']} | "
                     f"{row.get('floor_mm')} ({row.get('floor_through_plane_mm')} / {row.get('floor_in_plane_mm')}) |")
    lines += ["", "Refused cases:"] + [f"- {row['cohort']}, {row['method']}: {why}"
                                       for row in record["results"] for pid, why in row["refused"].items()]
    for name, text in record.get("map_texts", {}).items():
        lines += ["", f"`{name}`:", "", "```", text.strip(), "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench_register"), help="scratch folder")
    parser.add_argument("--cases", type=int, default=10, help="phantoms per cohort")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed")
    parser.add_argument("--threads", type=int, default=2, help="elastix threads per case")
    parser.add_argument("--maps", type=Path, default=None, help="another folder of parameter maps")
    parser.add_argument("--feature-network", type=Path, default=None,
                        help="--method feature reads this segmentation weights folder instead of the stand-in VAE")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--cohorts", default=",".join(COHORTS.values()), help="comma-separated cohorts (defects)")
    parser.add_argument("--name", default="bench_register", help="file stem of the report")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the report goes")
    parser.add_argument("--note", default="", help="recorded with the results (machine state, purpose)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPOSITORY))
    from latent.core.provenance import git_revision, machine_description

    load_before = os.getloadavg()
    started = time.perf_counter()
    work = args.work.resolve()
    maps = args.maps.resolve() if args.maps else None
    network = args.feature_network.resolve() if args.feature_network else None
    results = [measure(work, cohort, defect, method, args.cases, args.seed, args.threads, maps, network)
               for cohort, defect in COHORTS.items() if defect in args.cohorts.split(",")
               for method in METHODS if method in args.methods.split(",")]
    record = {"script": "benchmarks/bench_register.py", "git": git_revision(), "machine": machine_description(),
              "date": f"{datetime.now(timezone.utc):%Y-%m-%d}", "load_average_before": load_before,
              "note": args.note, "cases": args.cases, "seed": args.seed, "threads": args.threads, "results": results,
              "maps": str(args.maps) if maps else None,
              "feature_network": str(args.feature_network) if network else None,
              "map_texts": {path.name: path.read_text() for path in sorted(maps.glob("*.txt"))} if maps else {},
              "load_average_after": os.getloadavg(), "wall_seconds": round(time.perf_counter() - started, 1)}
    record["header"] = (f"<!-- written by benchmarks/bench_register.py at git {record['git']}, {record['date']}, "
                        f"{record['machine']}, load average {load_before[0]:.2f} before / "
                        f"{record['load_average_after'][0]:.2f} after. {args.note} -->\n"
                        "# latent register against the phantom's truth")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (args.results / f"{args.name}.md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
