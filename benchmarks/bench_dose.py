"""Cost of `latent dose` on one SynthRAD-size phantom case, and whether HU MAE ranks like dose.

One seeded phantom case at SynthRAD size (1 x 1 x 3 mm native) is written with two baseline
predictions: *water* (0 HU inside the mask) and *bulk* (three MR classes, literature HU). Each
``run_dose`` call runs in its own subprocess so its wall time, CPU time and peak resident memory
are its own:

1. water, empty plan cache: photon + proton plans are optimised on the CT (first run);
2. bulk, same cache: the plans are reused, only the sCT recalculation runs (cached run);
3. water again, cached: the same cost as 2 for a second sCT;
4. bulk with plans on a coarser dose grid (``--compare-grid``, default 5 mm): how much the
   numbers move with the grid.

Targets on the 2-core reference machine: first run <= 240 s, cached run <= 60 s, peak <= 4 GiB.
The machine is shared, so CPU seconds (user + system of the run and its dose workers) are
reported next to wall seconds; memory is the peak total RSS of the run's process tree (main
process, fork server and workers), sampled every 0.2 s. "dose calculations" are the direct
dose calculations (reference doses of new plans + the sCT), spread over the workers; "plans"
is loading or optimising them (photon here, proton in a worker meanwhile); "rest" is start-up,
imports, reading, structures, range proxy, resampling, metrics, figures and writing.
Writes ``results/bench_dose.json`` and ``.md``.

Run: ``.venv/bin/python benchmarks/bench_dose.py [--dose-grid 3] [--region AB] [--keep DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGETS = {"first_run_s": 240.0, "cached_run_s": 60.0, "peak_gib": 4.0}

#: Runs one `run_dose` in a fresh interpreter and prints its cost as JSON on the last line.
CHILD = r"""
import json, os, sys, threading, time
import psutil
start_wall = time.perf_counter()
me = psutil.Process()
peak = {"tree": 0, "main": 0}
child_cpu_seen = {}
stop = threading.Event()

def sample():
    # The dose workers are children of a fork server: follow the whole process tree.
    while not stop.is_set():
        try:
            tree = [me] + me.children(recursive=True)
            rss = 0
            for process in tree:
                try:
                    rss += process.memory_info().rss
                    times = process.cpu_times()
                    if process.pid != me.pid:
                        child_cpu_seen[process.pid] = times.user + times.system
                except psutil.Error:
                    pass
            peak["tree"] = max(peak["tree"], rss)
            peak["main"] = max(peak["main"], me.memory_info().rss)
        except psutil.Error:
            pass
        stop.wait(0.2)

threading.Thread(target=sample, daemon=True).start()
from latent.evaluation.dose import run_dose
pred, data, out, cache, grid = sys.argv[1:6]
run = run_dose(pred, data, out, dose_grid_mm=float(grid), plan_cache=cache, quiet=True)
stop.set()
own = me.cpu_times()
print(json.dumps({
    "wall_s": time.perf_counter() - start_wall,
    "cpu_s": own.user + own.system + sum(child_cpu_seen.values()),
    "peak_gib": peak["tree"] / 1024**3,
    "peak_main_gib": peak["main"] / 1024**3,
    "rows": run.rows, "failures": run.failures,
    "timings": {pid: d["timings"] for pid, d in run.details.items()},
}, default=str))
"""


def _write_inputs(root: Path, region: str, seed: int) -> tuple[Path, dict[str, Path], dict[str, float]]:
    from latent.core.baselines import BulkModel, water_sct
    from latent.core.cases import discover_cases
    from latent.core.io import read_volume, write_volume
    from latent.evaluation.metrics import mae
    from latent.core.phantom.generate import generate_phantom_dataset

    data = root / "data"
    generate_phantom_dataset(data, 1, [region], seed=seed, size="synthrad")
    case = discover_cases(data)[0]
    mr, grid = read_volume(case.mr, dtype=np.float32)
    ct, _ = read_volume(case.ct, dtype=np.float32)
    mask, _ = read_volume(case.mask)
    predictions = {"water": water_sct(mask), "bulk": BulkModel().predict(mr, mask)}
    folders, hu_mae = {}, {}
    for name, sct in predictions.items():
        folders[name] = root / name
        write_volume(folders[name] / f"{case.pid}.mha", sct, grid, dtype="int16")
        hu_mae[name] = float(mae(ct, np.rint(sct), mask > 0))
    return data, folders, {"pid": case.pid, "size_xyz": list(grid.size), "spacing": list(grid.spacing), "hu_mae": hu_mae}


def _run(pred: Path, data: Path, out: Path, cache: Path, dose_grid: float) -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", CHILD, str(pred), str(data), str(out), str(cache), str(dose_grid)],
        capture_output=True, text=True, check=False,
    )
    if completed.returncode != 0:
        raise SystemExit(f"run_dose failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dose-grid", type=float, default=3.0)
    parser.add_argument("--region", default="AB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-grid", type=float, default=5.0,
                        help="also score the bulk sCT with plans on this dose grid (0: skip)")
    parser.add_argument("--keep", type=Path, help="keep inputs and outputs here instead of a temporary folder")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as temporary:
        root = args.keep or Path(temporary)
        root.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        data, folders, case = _write_inputs(root, args.region, args.seed)
        case["phantom_s"] = time.perf_counter() - started
        cache = root / "plan_cache"
        runs = {
            "first (water, plans optimised)": _run(folders["water"], data, root / "out_water", cache, args.dose_grid),
            "cached (bulk, plans reused)": _run(folders["bulk"], data, root / "out_bulk", cache, args.dose_grid),
            "cached (water again)": _run(folders["water"], data, root / "out_water2", cache, args.dose_grid),
        }
        if args.compare_grid:
            grid_run = _run(folders["bulk"], data, root / "out_bulk_grid", cache, args.compare_grid)
            runs[f"first at {args.compare_grid:g} mm (bulk, plans optimised)"] = grid_run
    first, cached = runs["first (water, plans optimised)"], runs["cached (bulk, plans reused)"]
    rows = {"water": first["rows"][0], "bulk": cached["rows"][0]}
    metrics = ("photon_mae", "photon_dvh", "photon_gamma", "proton_mae", "proton_dvh", "proton_gamma", "range_shift_mm")
    better_hu = min(case["hu_mae"], key=case["hu_mae"].get)
    better_dose = {m: (min if "gamma" not in m else max)(rows, key=lambda n: rows[n][m]) for m in metrics}
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average": os.getloadavg()},
        "dose_grid_mm": args.dose_grid,
        "case": case,
        "runs": runs,
        "targets": TARGETS,
        "ranking": {"better_by_hu_mae": better_hu, "better_by_dose_metric": better_dose,
                    "hu_mae": case["hu_mae"], "dose": {n: {m: rows[n].get(m) for m in metrics} for n in rows}},
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "bench_dose.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    lines = [
        f"# latent dose benchmark ({case['pid']}, native {case['size_xyz']} voxels at {case['spacing']} mm, "
        f"{args.dose_grid:g} mm dose grid, photons + protons + range proxy)",
        "",
        f"Machine: {os.cpu_count()} CPUs, load average at the end {tuple(round(v, 1) for v in os.getloadavg())}.",
        "",
        "| run | wall s | CPU s (all processes) | peak GiB (process tree) | plans s | dose calculations s | rest s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        t = next(iter(run["timings"].values()))
        rest = run["wall_s"] - t.get("plans_s", 0) - t.get("dose_calculations_s", 0)
        lines.append(
            f"| {name} | {run['wall_s']:.0f} | {run['cpu_s']:.0f} | {run['peak_gib']:.2f} | {t.get('plans_s', 0):.0f} | "
            f"{t.get('dose_calculations_s', 0):.0f} | {rest:.0f} |"
        )
    lines += [
        "",
        f"Targets: first run <= {TARGETS['first_run_s']:.0f} s, each further sCT <= {TARGETS['cached_run_s']:.0f} s, "
        f"peak <= {TARGETS['peak_gib']:.0f} GiB.",
        "",
        "| baseline | HU MAE | " + " | ".join(metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for name in rows:
        cells = " | ".join(f"{rows[name][m]:.4f}" if rows[name].get(m) is not None else "-" for m in metrics)
        lines.append(f"| {name} | {case['hu_mae'][name]:.1f} | {cells} |")
    if args.compare_grid:
        coarse = runs[f"first at {args.compare_grid:g} mm (bulk, plans optimised)"]["rows"][0]
        result["dose_grid_effect"] = {f"{g:g} mm": {m: r.get(m) for m in metrics}
                                      for g, r in ((args.dose_grid, rows["bulk"]), (args.compare_grid, coarse))}
        (args.results / "bench_dose.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        lines += ["", f"Same bulk sCT, plans on a {args.compare_grid:g} mm dose grid: "
                  + ", ".join(f"{m} {coarse[m]:.4f}" for m in metrics if coarse.get(m) is not None)
                  + f" (at {args.dose_grid:g} mm: " + ", ".join(f"{rows['bulk'][m]:.4f}" for m in metrics if rows['bulk'].get(m) is not None) + ")."]
    agree = [m for m in metrics if better_dose[m] == better_hu]
    lines += ["", f"HU MAE ranks {better_hu} first; the dose metrics agreeing: {', '.join(agree) or 'none'}; "
              f"disagreeing: {', '.join(m for m in metrics if m not in agree) or 'none'}."]
    (args.results / "bench_dose.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    ok = (first["wall_s"] <= TARGETS["first_run_s"] and cached["wall_s"] <= TARGETS["cached_run_s"]
          and max(r["peak_gib"] for r in runs.values()) <= TARGETS["peak_gib"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
