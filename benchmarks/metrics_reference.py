"""Plain numpy/scipy SynthRAD2025 metrics, written the way the organisers' evaluation code is.

The yardstick for ``latent.evaluation.metrics`` in ``bench_metrics.py`` and the parity tests: full-volume
float64 arrays, ``scipy.ndimage.uniform_filter`` per local statistic, ``fftconvolve`` for the
downsampling between MS-SSIM levels, ``skimage`` for the SynthRAD2023 SSIM, plain numpy for
MAE, PSNR, Dice and the per-tissue errors, ``distance_transform_edt`` on the whole volume for
HD95. Clean, not tuned and not deliberately slow. Definitions: docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import binary_erosion, distance_transform_edt, uniform_filter
from scipy.signal import fftconvolve
from skimage.metrics import structural_similarity

DYNAMIC_RANGE = (-1024.0, 3071.0)
SSIM2023_RANGE = (-1024.0, 3000.0)
WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
BONE_HU = 250.0
TISSUES = {"air": (-2000.0, -500.0), "soft": (-500.0, 250.0), "bone": (250.0, 1000.0), "above_1000": (1000.0, 4000.0)}
CROP = (slice(3, -3),) * 3


def mae(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> float:
    """Mean |gt - pred| over the mask."""
    return float(np.sum(np.abs(gt * mask - pred * mask)) / mask.sum())


def psnr(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> float:
    """PSNR over the mask, both clipped to the dynamic range."""
    gt = np.clip(gt, *DYNAMIC_RANGE)[mask == 1]
    pred = np.clip(pred, *DYNAMIC_RANGE)[mask == 1]
    mse = np.mean((gt - pred) ** 2)
    return float(10 * np.log10((DYNAMIC_RANGE[1] - DYNAMIC_RANGE[0]) ** 2 / mse))


def ssim_map_at_scale(im1: np.ndarray, im2: np.ndarray, weight: float, data_range: float) -> np.ndarray:
    """SynthRAD2025 level map ``L^w C^w S^w`` (7-voxel uniform window, sample covariance)."""
    cov_norm = 7**3 / (7**3 - 1)
    ux, uy = uniform_filter(im1, size=7), uniform_filter(im2, size=7)
    uxx = uniform_filter(im1 * im1, size=7)
    uyy = uniform_filter(im2 * im2, size=7)
    uxy = uniform_filter(im1 * im2, size=7)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    sx, sy = np.sqrt(np.clip(vx, 0, None)), np.sqrt(np.clip(vy, 0, None))
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    c3 = c2 / 2
    lum = np.clip((2 * ux * uy + c1) / (ux * ux + uy * uy + c1), 0, None)
    con = np.clip((2 * sx * sy + c2) / (vx + vy + c2), 0, None)
    struct = np.clip((vxy + c3) / (sx * sy + c3), 0, None)
    return (lum * con * struct) ** weight


def ms_ssim(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> float:
    """Masked 5-level MS-SSIM of the SynthRAD2025 leaderboard."""
    low = DYNAMIC_RANGE[0]
    gt = np.where(mask == 0, low, np.clip(gt, *DYNAMIC_RANGE)) - low
    pred = np.where(mask == 0, low, np.clip(pred, *DYNAMIC_RANGE)) - low
    pads = [(max((97 - n) // 2, 0), max(97 - n - (97 - n) // 2, 0)) for n in gt.shape]
    gt, pred, mask = (np.pad(a, pads, mode="edge") for a in (gt, pred, mask))
    box = np.ones((2, 2, 2)) / 8
    values = []
    for weight in WEIGHTS:
        ssim_map = ssim_map_at_scale(gt, pred, weight, DYNAMIC_RANGE[1] - DYNAMIC_RANGE[0])
        values.append(ssim_map[CROP][mask[CROP] == 1].mean(dtype=np.float64))
        gt, pred = (fftconvolve(a, box, mode="same") for a in (gt, pred))
        gt, pred, mask = (a[::2, ::2, ::2] for a in (gt, pred, mask))
    return float(np.prod(np.clip(values, 0, 1)))


def ssim_2023(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> float:
    """SynthRAD2023 masked SSIM with skimage's ``structural_similarity``."""
    low, high = SSIM2023_RANGE
    gt = np.where(mask == 0, low, np.clip(gt, low, high)) - low
    pred = np.where(mask == 0, low, np.clip(pred, low, high)) - low
    _, ssim_map = structural_similarity(gt, pred, data_range=high - low, full=True)
    return float(ssim_map[CROP][mask[CROP] == 1].mean())


def bone_dice(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> float:
    """Dice of HU >= 250 inside the mask."""
    ref, test = (gt >= BONE_HU) & (mask == 1), (pred >= BONE_HU) & (mask == 1)
    total = ref.sum() + test.sum()
    return 1.0 if total == 0 else float(2 * np.sum(ref & test) / total)


def bone_hd95(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray, spacing_xyz: Sequence[float]) -> float:
    """Symmetric 95th-percentile surface distance (mm), MONAI's definition."""
    ref, test = (gt >= BONE_HU) & (mask == 1), (pred >= BONE_HU) & (mask == 1)
    if not ref.any() and not test.any():
        return 0.0
    if not ref.any() or not test.any():
        return float("inf")
    sampling = tuple(spacing_xyz)[::-1]
    ref_edge, test_edge = ref ^ binary_erosion(ref), test ^ binary_erosion(test)
    to_ref = distance_transform_edt(~ref_edge, sampling=sampling)[test_edge]
    to_test = distance_transform_edt(~test_edge, sampling=sampling)[ref_edge]
    return float(max(np.percentile(to_ref, 95), np.percentile(to_test, 95)))


def tissue_errors(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """MAE and bias per tissue class of the true CT inside the mask."""
    out = {}
    for name, (low, high) in TISSUES.items():
        region = (mask == 1) & (gt >= low) & (gt < high)
        diff = pred[region] - gt[region]
        out[f"mae_{name}"] = float(np.abs(diff).mean()) if diff.size else float("nan")
        out[f"bias_{name}"] = float(diff.mean()) if diff.size else float("nan")
    return out


def score_case(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray, spacing_xyz: Sequence[float]) -> dict[str, float]:
    """Every metric ``latent.evaluation.metrics.score_case`` returns, from float64 copies of the inputs."""
    mask = np.where(mask > 0, 1.0, 0.0)
    gt = np.where(mask == 0, -1024.0, ct.astype(np.float64))
    pred = np.where(mask == 0, -1024.0, sct.astype(np.float64))
    return {
        "mae": mae(gt, pred, mask),
        "psnr": psnr(gt, pred, mask),
        "ms_ssim": ms_ssim(gt, pred, mask),
        "ssim": ssim_2023(gt, pred, mask),
        "bone_dice": bone_dice(gt, pred, mask),
        "bone_hd95": bone_hd95(gt, pred, mask, spacing_xyz),
        **tissue_errors(gt, pred, mask),
    }
