"""Speed and agreement of ``latent.evaluation.metrics.score_case`` against a clean reference, and the
time of a whole ``latent evaluate``.

One seeded synthetic case of SynthRAD size (91 x 367 x 465 voxels, body mask about half the
volume) is scored with every metric ``latent evaluate`` computes per case (MAE, PSNR, MS-SSIM,
SSIM, bone Dice / HD95, per-tissue errors), once by ``benchmarks/metrics_reference.py`` (plain
float64 numpy/scipy in the organisers' style: ``uniform_filter`` per local statistic,
``fftconvolve`` between MS-SSIM levels) and once by ``latent.evaluation.metrics.score_case``. A second
variant puts a 3071 HU implant inside the mask, which makes the SSIM (ceiling 3000 HU) need its
own moments. Then ``--cases`` copies of the case are written as .mha files and scored by
``latent.evaluation.scoring.evaluate_predictions`` with one worker and with ``--workers``; the time of a
223-case evaluation (the SynthRAD2025 Task 1 test set) is projected from the latter.

Run: ``.venv/bin/python benchmarks/bench_metrics.py [--note "machine load ..."]``; writes
``results/bench_metrics.json`` and ``.md``. Exits 1 when the speed-up is below 3 or a value
differs by more than 1e-6 relative.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy
from scipy.ndimage import gaussian_filter

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metrics_reference  # noqa: E402  (benchmarks/ helper, not part of the package)

from latent.evaluation import metrics  # noqa: E402
from latent.evaluation.scoring import evaluate_predictions  # noqa: E402
from latent.core.io import VolumeProperties, write_volume  # noqa: E402

#: SynthRAD2025 Task 1 pelvis-sized volume, (z, y, x), and its spacing (x, y, z) in mm.
SHAPE = (91, 367, 465)
SPACING_XYZ = (1.0, 1.0, 2.5)
MIN_SPEEDUP = 3.0
MAX_REL_DIFF = 1e-6
TEST_SET_CASES = 223
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def synthetic_case(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CT (int16), perturbed sCT (float32) and body mask (uint8), all (z, y, x)."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    z = np.linspace(-1.0, 1.0, nz)[:, None, None]
    y = np.arange(ny, dtype=np.float32)[None, :, None]
    x = np.arange(nx, dtype=np.float32)[None, None, :]
    cy, cx = 0.52 * ny, 0.5 * nx
    ry, rx = 0.36 * ny * (1 - 0.08 * z**2), 0.43 * nx * (1 - 0.12 * z**2)
    radial = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2
    body = radial <= 1.0
    ct = np.where(body, 40.0, -1000.0).astype(np.float32)
    ct[body & (radial > 0.8)] = -90.0  # subcutaneous fat
    texture = gaussian_filter(rng.normal(0, 1, shape).astype(np.float32), 2.0) * 60.0
    ct += np.where(body, texture, 0.0)
    spine = ((y - (cy + 0.55 * ry)) / 18.0) ** 2 + ((x - cx) / 16.0) ** 2
    ct[(spine <= 1.0) & body] = 300.0
    ct[(spine <= 0.6) & body] = 900.0
    for side in (-1, 1):  # femoral heads / iliac wings
        hip = ((y - cy) / 30.0) ** 2 + ((x - cx - side * 0.6 * rx) / 28.0) ** 2 + (z / 0.6) ** 2
        ct[(hip <= 1.0) & body] = 650.0
    gas = ((y - (cy - 0.3 * ry)) / 15.0) ** 2 + ((x - cx - 20) / 25.0) ** 2 + ((z - 0.2) / 0.15) ** 2
    ct[gas <= 1.0] = -850.0
    table = (y > cy + ry + 8) & (y < cy + ry + 14)
    ct[np.broadcast_to(table, shape)] = -300.0  # couch: outside the mask
    ct += rng.normal(0, 15, shape).astype(np.float32)
    ct = np.round(ct).astype(np.int16)
    sct = gaussian_filter(ct.astype(np.float32), 1.0) + 12.0 + rng.normal(0, 35, shape).astype(np.float32)
    sct[ct > 250] *= 0.9  # under-estimated bone
    sct[0, 0, 0] = 3500.0  # beyond the 3071 ceiling: MAE keeps it, PSNR clips it
    return ct, sct.astype(np.float32), body.astype(np.uint8)


def with_implant(ct: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The CT with a 3071 HU sphere (a hip implant) inside the mask."""
    z, y, x = np.ogrid[: ct.shape[0], : ct.shape[1], : ct.shape[2]]
    centre = [n // 2 for n in ct.shape]
    implant = ((z - centre[0]) / 6.0) ** 2 + ((y - centre[1]) / 10.0) ** 2 + ((x - centre[2] - 90) / 10.0) ** 2 <= 1
    assert mask[implant].all()
    out = ct.copy()
    out[implant] = 3071.0
    return out


def best_time(fn: Callable[[], dict[str, float]], repeats: int) -> tuple[float, dict[str, float]]:
    """Fastest of ``repeats`` runs and the last result."""
    best, result = float("inf"), {}
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def relative_difference(ours: float, reference: float) -> float:
    """|ours - reference| / |reference|; 0 when both are the same nan or infinity."""
    if math.isnan(reference) or math.isinf(reference):
        return 0.0 if (math.isnan(ours) and math.isnan(reference)) or ours == reference else math.inf
    return abs(ours - reference) / abs(reference) if reference else abs(ours)


def compare(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray, repeats: int) -> dict:
    """Both implementations on one case: times, values and relative differences."""
    ours_s, ours = best_time(lambda: metrics.score_case(ct, sct, mask, SPACING_XYZ), repeats)
    reference_s, reference = best_time(lambda: metrics_reference.score_case(ct, sct, mask, SPACING_XYZ), repeats)
    rel = {k: relative_difference(ours[k], reference[k]) for k in reference}
    return {"reference_seconds": reference_s, "ours_seconds": ours_s, "speedup": reference_s / ours_s,
            "reference": reference, "ours": ours, "relative_difference": rel,
            "max_relative_difference": max(rel.values())}


def time_evaluation(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray, cases: int, workers: int) -> dict:
    """``evaluate_predictions`` over ``cases`` copies of the case with 1 and ``workers`` workers."""
    properties = VolumeProperties(SPACING_XYZ, (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0),
                                  (SHAPE[2], SHAPE[1], SHAPE[0]))
    tiny = VolumeProperties(SPACING_XYZ, (0.0, 0.0, 0.0), properties.direction, (2, 2, 2))
    timings, rows = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        root, pred = Path(tmp) / "data" / "Task1" / "AB", Path(tmp) / "pred"
        for index in range(cases):
            pid = f"1ABA{index:03d}"
            write_volume(root / pid / "ct.mha", ct, properties, dtype=np.int16)
            write_volume(root / pid / "mask.mha", mask, properties, dtype=np.uint8)
            write_volume(root / pid / "mr.mha", np.zeros((2, 2, 2)), tiny)  # never read by evaluate
            write_volume(pred / f"{pid}.mha", sct, properties, dtype=np.float32)
        for count in (1, workers):
            start = time.perf_counter()
            evaluation = evaluate_predictions(pred, Path(tmp) / "data", quiet=True, workers=count)
            timings[count] = time.perf_counter() - start
            rows[count] = json.dumps(evaluation.rows)
            assert evaluation.run.ok and len(evaluation.rows) == cases
    per_case = timings[workers] / cases
    return {"cases": cases, "workers": workers, "serial_seconds": timings[1], "parallel_seconds": timings[workers],
            "parallel_equals_serial": rows[1] == rows[workers], "seconds_per_case_parallel": per_case,
            "projected_test_set_seconds": per_case * TEST_SET_CASES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs per implementation; the fastest counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=4, help="cases in the timed evaluation run")
    parser.add_argument("--workers", type=int, default=2, help="workers of the timed parallel evaluation")
    parser.add_argument("--note", default="", help="a remark about the machine (load, other jobs)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    ct, sct, mask = synthetic_case(SHAPE, args.seed)
    ct = ct.astype(np.float32)  # as latent evaluate reads it
    load_before = os.getloadavg()[0]
    plain = compare(ct, sct, mask, args.repeats)
    implant = compare(with_implant(ct, mask), sct, mask, 1)
    evaluation = time_evaluation(ct, sct, mask, args.cases, args.workers)
    load_after = os.getloadavg()[0]
    passed = (plain["speedup"] >= MIN_SPEEDUP and implant["speedup"] >= MIN_SPEEDUP
              and max(plain["max_relative_difference"], implant["max_relative_difference"]) <= MAX_REL_DIFF
              and evaluation["parallel_equals_serial"])
    result = {
        "shape_zyx": list(SHAPE), "spacing_xyz": list(SPACING_XYZ), "mask_fraction": float(mask.mean()),
        "seed": args.seed, "repeats": args.repeats, "case": plain, "case_with_implant": implant,
        "evaluation": evaluation,
        "thresholds": {"min_speedup": MIN_SPEEDUP, "max_relative_difference": MAX_REL_DIFF},
        "passed": passed, "note": args.note,
        "machine": {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
                    "cpu_count": os.cpu_count(), "load_average_1min": [load_before, load_after]},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = report(result, args)
    (args.out / "bench_metrics.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if passed else 1


def report(result: dict, args: argparse.Namespace) -> list[str]:
    """The markdown report of ``result``."""
    plain, implant, evaluation = result["case"], result["case_with_implant"], result["evaluation"]
    load = result["machine"]["load_average_1min"]
    lines = [
        "# latent evaluate per case: latent.evaluation.metrics vs a clean numpy/scipy reference",
        "",
        f"Case {SHAPE[0]} x {SHAPE[1]} x {SHAPE[2]} (z, y, x), spacing {SPACING_XYZ} mm (x, y, z), mask "
        f"{result['mask_fraction']:.1%} of the volume, seed {args.seed}; {os.cpu_count()} CPUs, 1-min load "
        f"{load[0]:.1f} -> {load[1]:.1f}." + (f" Note: {args.note}" if args.note else ""),
        "Reference: `benchmarks/metrics_reference.py` (float64, full volumes, `uniform_filter` per "
        "statistic, `fftconvolve` between MS-SSIM levels, skimage SSIM, full-volume EDT for HD95).",
        "",
        "| metric | reference | latent.evaluation.metrics | relative difference |",
        "| --- | --- | --- | --- |",
        *(f"| {k} | {v:.10g} | {plain['ours'][k]:.10g} | {plain['relative_difference'][k]:.1e} |"
          for k, v in plain["reference"].items()),
        "",
        "| case | reference (s) | latent.evaluation.metrics (s) | speed-up | max relative difference |",
        "| --- | --- | --- | --- | --- |",
        f"| plain (best of {args.repeats}) | {plain['reference_seconds']:.2f} | {plain['ours_seconds']:.2f} | "
        f"{plain['speedup']:.1f}x | {plain['max_relative_difference']:.1e} |",
        f"| 3071 HU implant in the mask (1 run) | {implant['reference_seconds']:.2f} | {implant['ours_seconds']:.2f} | "
        f"{implant['speedup']:.1f}x | {implant['max_relative_difference']:.1e} |",
        "",
        f"Target: speed-up >= {MIN_SPEEDUP:g}x with every value within {MAX_REL_DIFF:g} relative.",
        "",
        f"`evaluate_predictions` on {evaluation['cases']} copies of the case (.mha files, reading included): "
        f"{evaluation['serial_seconds']:.1f} s with 1 worker, {evaluation['parallel_seconds']:.1f} s with "
        f"{evaluation['workers']} (identical rows: {evaluation['parallel_equals_serial']}); "
        f"{evaluation['seconds_per_case_parallel']:.2f} s per case, so a {TEST_SET_CASES}-case evaluation "
        f"takes about {evaluation['projected_test_set_seconds'] / 60:.1f} min (projected; pool start-up included "
        f"once per {evaluation['cases']} cases).",
        "",
        f"Result: {'PASS' if result['passed'] else 'FAIL'}.",
        "",
    ]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
