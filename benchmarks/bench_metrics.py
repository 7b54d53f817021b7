"""Speed and agreement of ``latent.metrics`` against a plain SynthRAD2025-style implementation.

Builds one seeded synthetic case of SynthRAD size (90 x 370 x 460 voxels, body mask about half
the volume), scores MAE + PSNR + MS-SSIM with the straightforward float64 numpy/scipy code
below (written in the style of the SynthRAD2025 evaluation's ``image_metrics.py``: full maps,
``uniform_filter`` per moment, ``fftconvolve`` downsampling) and with
``latent.metrics.image_metrics``, and writes ``results/bench_metrics.json`` and ``.md``.

Run: ``.venv/bin/python benchmarks/bench_metrics.py``. Exits 1 when the speed-up is below 3 or
a value differs by more than 1e-5 relative.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy
from scipy.ndimage import gaussian_filter, uniform_filter
from scipy.signal import fftconvolve
from skimage.metrics import peak_signal_noise_ratio

from latent import metrics

#: SynthRAD2025 Task 1 pelvis-sized volume, (z, y, x).
SHAPE = (90, 370, 460)
MIN_SPEEDUP = 3.0
MAX_REL_DIFF = 1e-5
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


# --- reference: full-volume float64 code in the official evaluation's style ----------------

DYNAMIC_RANGE = (-1024.0, 3071.0)


def reference_mae(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> float:
    mask = np.where(mask > 0, 1.0, 0.0)
    return float(np.sum(np.abs(gt * mask - pred * mask)) / mask.sum())


def reference_psnr(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> float:
    mask = np.where(mask > 0, 1.0, 0.0)
    gt = np.clip(gt, *DYNAMIC_RANGE)[mask == 1]
    pred = np.clip(pred, *DYNAMIC_RANGE)[mask == 1]
    return float(peak_signal_noise_ratio(gt, pred, data_range=DYNAMIC_RANGE[1] - DYNAMIC_RANGE[0]))


def reference_ssim_map(im1: np.ndarray, im2: np.ndarray, weight: float, data_range: float) -> np.ndarray:
    cov_norm = 7**3 / (7**3 - 1)
    ux, uy = uniform_filter(im1, size=7), uniform_filter(im2, size=7)
    uxx, uyy, uxy = (uniform_filter(a, size=7) for a in (im1 * im1, im2 * im2, im1 * im2))
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    vxsqrt, vysqrt = np.clip(vx, 0, None) ** 0.5, np.clip(vy, 0, None) ** 0.5
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    c3 = c2 / 2
    lum = np.clip((2 * ux * uy + c1) / (ux * ux + uy * uy + c1), 0, None)
    con = np.clip((2 * vxsqrt * vysqrt + c2) / (vx + vy + c2), 0, None)
    struct = np.clip((vxy + c3) / (vxsqrt * vysqrt + c3), 0, None)
    return (lum**weight) * (con**weight) * (struct**weight)


def reference_ms_ssim(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> float:
    low = DYNAMIC_RANGE[0]
    gt, pred = np.clip(gt, *DYNAMIC_RANGE), np.clip(pred, *DYNAMIC_RANGE)
    mask = np.where(mask > 0, 1.0, 0.0)
    gt, pred = np.where(mask == 0, low, gt) - low, np.where(mask == 0, low, pred) - low
    pads = [(max((97 - n) // 2, 0), max(97 - n - (97 - n) // 2, 0)) for n in gt.shape]
    gt, pred, mask = (np.pad(a, pads, mode="edge") for a in (gt, pred, mask))
    box = np.ones((2, 2, 2)) / 8
    values = []
    for weight in metrics.MS_SSIM_WEIGHTS:
        ssim_map = reference_ssim_map(gt, pred, weight, DYNAMIC_RANGE[1] - DYNAMIC_RANGE[0])
        crop = (slice(3, -3),) * 3
        values.append(ssim_map[crop][mask[crop].astype(bool)].mean(dtype=np.float64))
        gt, pred = (fftconvolve(a, box, mode="same") for a in (gt, pred))
        gt, pred, mask = (a[::2, ::2, ::2] for a in (gt, pred, mask))
    return float(np.prod([np.clip(v, 0, 1) for v in values]))


def reference_metrics(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """MAE, PSNR and MS-SSIM as the official ``score_patient`` computes them, in float64."""
    ct, sct = ct.astype(np.float64), sct.astype(np.float64)
    gt, pred = np.where(mask == 0, -1024.0, ct), np.where(mask == 0, -1024.0, sct)
    return {
        "mae": reference_mae(gt, pred, mask),
        "psnr": reference_psnr(gt, pred, mask),
        "ms_ssim": reference_ms_ssim(gt, pred, mask),
    }


def best_time(fn: Callable[[], dict[str, float]], repeats: int) -> tuple[float, dict[str, float]]:
    best, result = float("inf"), {}
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs per implementation; the fastest counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)

    ct, sct, mask = synthetic_case(SHAPE, args.seed)
    load_before = os.getloadavg()[0]
    ours_s, ours = best_time(lambda: metrics.image_metrics(ct, sct, mask), args.repeats)
    reference_s, reference = best_time(lambda: reference_metrics(ct, sct, mask), args.repeats)
    rel_diff = {k: abs(ours[k] - reference[k]) / abs(reference[k]) for k in reference}
    speedup = reference_s / ours_s
    passed = speedup >= MIN_SPEEDUP and max(rel_diff.values()) <= MAX_REL_DIFF
    result = {
        "shape_zyx": list(SHAPE),
        "mask_fraction": float(mask.mean()),
        "seed": args.seed,
        "repeats": args.repeats,
        "reference_seconds": reference_s,
        "ours_seconds": ours_s,
        "speedup": speedup,
        "reference": reference,
        "ours": ours,
        "relative_difference": rel_diff,
        "max_relative_difference": max(rel_diff.values()),
        "thresholds": {"min_speedup": MIN_SPEEDUP, "max_relative_difference": MAX_REL_DIFF},
        "passed": passed,
        "machine": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "cpu_count": os.cpu_count(),
            "load_average_1min": [load_before, os.getloadavg()[0]],
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# MAE + PSNR + MS-SSIM: latent.metrics vs plain numpy/scipy",
        "",
        f"Case {SHAPE[0]} x {SHAPE[1]} x {SHAPE[2]} (z, y, x), mask {result['mask_fraction']:.1%} of the volume, "
        f"seed {args.seed}, best of {args.repeats}, {os.cpu_count()} CPUs, "
        f"1-min load {load_before:.1f} -> {os.getloadavg()[0]:.1f}.",
        "",
        "| metric | reference | latent.metrics | relative difference |",
        "| --- | --- | --- | --- |",
        *(f"| {k} | {reference[k]:.10g} | {ours[k]:.10g} | {rel_diff[k]:.2e} |" for k in reference),
        "",
        f"Time: reference {reference_s:.2f} s, latent.metrics {ours_s:.2f} s, speed-up {speedup:.1f}x "
        f"(required >= {MIN_SPEEDUP:g}x, max relative difference <= {MAX_REL_DIFF:g}): "
        f"{'PASS' if passed else 'FAIL'}.",
        "",
    ]
    (args.out / "bench_metrics.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
