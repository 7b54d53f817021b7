"""Image and bone metrics for synthetic CT, identical to the SynthRAD2025 leaderboard code.

All volumes are numpy arrays in SimpleITK (z, y, x) order; ``mask`` is any array where
``> 0`` marks the voxels to score; ``spacing_xyz`` is (x, y, z) in mm as SimpleITK gives it.
Definitions follow docs/metrics.md (voxels outside the mask are -1024 HU in both images). The
windowed metrics (MS-SSIM, SSIM) live in :mod:`latent.evaluation.ssim`; :func:`score_case` gathers the
mask voxels once for every voxel-wise metric and shares the SSIM's moments with the MS-SSIM.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage, spatial

from latent.evaluation.ssim import (  # noqa: F401  (re-exported: the metric constants and windowed metrics)
    COV_NORM, DATA_RANGE, HALF_WIN, HU_MAX, HU_MIN, K1, K2, MS_SSIM_MIN_SIZE, MS_SSIM_WEIGHTS, SSIM2023_HU_MAX, WIN,
    bbox, checked_inputs, ms_ssim, slices, ssim_2023, windowed_scores,
)

#: HU at or above which a voxel counts as bone.
BONE_HU = 250.0


def _masked_values(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    box = bbox(mask)
    if box is None:
        return np.empty(0), np.empty(0)
    crop = slices(box)
    inside = mask[crop]
    return ct[crop][inside].astype(np.float64), sct[crop][inside].astype(np.float64)


def _mae_psnr(ct_values: np.ndarray, sct_values: np.ndarray) -> tuple[float, float]:
    if ct_values.size == 0:
        return math.nan, math.nan
    mae_value = float(np.abs(ct_values - sct_values).sum() / ct_values.size)
    diff = np.clip(ct_values, HU_MIN, HU_MAX) - np.clip(sct_values, HU_MIN, HU_MAX)
    mse = float(np.mean(diff * diff))
    return mae_value, (math.inf if mse == 0 else 10.0 * math.log10(DATA_RANGE**2 / mse))


def mae(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute error in HU over the mask, sCT not clipped (nan for an empty mask)."""
    return _mae_psnr(*_masked_values(*checked_inputs(ct, sct, mask)))[0]


def psnr(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> float:
    """PSNR in dB over the mask, both clipped to [-1024, 3071], peak 4095; inf when identical."""
    return _mae_psnr(*_masked_values(*checked_inputs(ct, sct, mask)))[1]


def _spacing_zyx(spacing_xyz: Sequence[float]) -> tuple[float, ...]:
    if len(spacing_xyz) != 3:
        raise ValueError(f"spacing_xyz must have 3 values (x, y, z), got {spacing_xyz}")
    return tuple(float(s) for s in spacing_xyz)[::-1]


def _dice(ref_bone: np.ndarray, pred_bone: np.ndarray) -> float:
    total = int(np.count_nonzero(ref_bone)) + int(np.count_nonzero(pred_bone))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(ref_bone & pred_bone)) / total


def bone_dice(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray, threshold: float = BONE_HU) -> float:
    """Dice of ``HU >= threshold`` inside the mask; 1.0 when neither volume has bone."""
    ct_values, sct_values = _masked_values(*checked_inputs(ct, sct, mask))
    return _dice(ct_values >= threshold, sct_values >= threshold)


def _hd95(ct: np.ndarray, sct: np.ndarray, inside: np.ndarray, sampling: tuple[float, ...], threshold: float) -> float:
    box = bbox(inside)
    if box is None:
        return 0.0
    crop = slices(box)  # bone lies inside the mask: its bounding box holds every bone voxel
    inside = inside[crop]
    ref, pred = (ct[crop] >= threshold) & inside, (sct[crop] >= threshold) & inside
    has_ref, has_pred = bool(ref.any()), bool(pred.any())
    if not (has_ref or has_pred):
        return 0.0
    if has_ref != has_pred:
        return math.inf
    # Every surface voxel lies in the union's bounding box, so distances computed there are exact.
    crop = slices(bbox(ref | pred))  # type: ignore[arg-type]
    ref, pred = ref[crop], pred[crop]
    ref_surface = ref ^ ndimage.binary_erosion(ref)
    pred_surface = pred ^ ndimage.binary_erosion(pred)
    to_ref, to_pred = surface_distances(ref_surface, pred_surface, sampling)
    return float(max(np.percentile(to_ref, 95), np.percentile(to_pred, 95)))


def surface_distances(
    ref_surface: np.ndarray, pred_surface: np.ndarray, sampling: tuple[float, ...], method: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distances (mm) from each pred surface voxel to the nearest ref one, and back.

    ``method`` "edt" uses ``distance_transform_edt`` over the block, "kdtree" a
    ``scipy.spatial.cKDTree`` of the surface voxels (cheaper when surfaces are a small part of
    the block); "auto" picks by that ratio. Both give the exact distances.
    """
    if method == "auto":
        sparse = np.count_nonzero(ref_surface) + np.count_nonzero(pred_surface) < ref_surface.size // 16
        method = "kdtree" if sparse else "edt"
    if method == "edt":
        return (ndimage.distance_transform_edt(~ref_surface, sampling=sampling)[pred_surface],
                ndimage.distance_transform_edt(~pred_surface, sampling=sampling)[ref_surface])
    if method != "kdtree":
        raise ValueError(f"method must be 'auto', 'edt' or 'kdtree', got {method!r}")
    scale = np.asarray(sampling, dtype=np.float64)
    ref_points, pred_points = np.argwhere(ref_surface) * scale, np.argwhere(pred_surface) * scale
    return (spatial.cKDTree(ref_points).query(pred_points, workers=-1)[0],
            spatial.cKDTree(pred_points).query(ref_points, workers=-1)[0])


def bone_hd95(
    ct: np.ndarray, sct: np.ndarray, mask: np.ndarray, spacing_xyz: Sequence[float], threshold: float = BONE_HU
) -> float:
    """Symmetric 95th-percentile surface Hausdorff distance (mm) of bone inside the mask.

    As MONAI's ``compute_hausdorff_distance(percentile=95)``: surface voxels are
    ``bone ^ binary_erosion(bone)``; the value is the larger of the two directed 95th
    percentiles of surface-to-nearest-surface Euclidean distances. Returns 0.0 when neither
    volume has bone and inf when exactly one has (the distance to an empty set).
    """
    ct, sct, inside = checked_inputs(ct, sct, mask)
    return _hd95(ct, sct, inside, _spacing_zyx(spacing_xyz), threshold)


def image_metrics(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """The SynthRAD2025 leaderboard metrics ``mae``, ``psnr``, ``ms_ssim``, sharing the mask gather."""
    ct, sct, inside = checked_inputs(ct, sct, mask)
    mae_value, psnr_value = _mae_psnr(*_masked_values(ct, sct, inside))
    return {"mae": mae_value, "psnr": psnr_value, "ms_ssim": ms_ssim(ct, sct, inside)}


def score_case(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray, spacing_xyz: Sequence[float]) -> dict[str, float]:
    """All metrics of one case: mae, psnr, ms_ssim, ssim (2023), bone_dice, bone_hd95 (mm), and
    MAE / bias per tissue class of the true CT (:func:`tissue_errors`).

    The mask voxels are gathered once for MAE, PSNR, Dice and the tissue errors, and the SSIM
    shares the MS-SSIM's level-0 moments (:func:`latent.evaluation.ssim.windowed_scores`).
    """
    ct, sct, inside = checked_inputs(ct, sct, mask)
    sampling = _spacing_zyx(spacing_xyz)
    ct_values, sct_values = _masked_values(ct, sct, inside)
    mae_value, psnr_value = _mae_psnr(ct_values, sct_values)
    ms_ssim_value, ssim_value = windowed_scores(ct, sct, inside)
    return {
        "mae": mae_value,
        "psnr": psnr_value,
        "ms_ssim": ms_ssim_value,
        "ssim": ssim_value,
        "bone_dice": _dice(ct_values >= BONE_HU, sct_values >= BONE_HU),
        "bone_hd95": _hd95(ct, sct, inside, sampling, BONE_HU),
        **_tissue_errors(ct_values, sct_values),
    }


#: Tissue classes of the true CT (HU, [low, high)): where an error is made, not only how large.
#: "above_1000" is what the MAISI VAE window [-1000, 1000] cannot represent.
TISSUE_CLASSES = {"air": (-2000.0, -500.0), "soft": (-500.0, BONE_HU), "bone": (BONE_HU, 1000.0),
                  "above_1000": (1000.0, 4000.0)}


@dataclass(frozen=True)
class Metric:
    """One reported metric: its column in every evaluation row, its title, its display digits and
    which way is better. The one table of this (:data:`METRICS`) is read by ``latent evaluate``,
    the demo and the bench report; adding a metric means a row here, its value in
    :func:`score_case`, its definition in docs/metrics.md and its test."""

    name: str
    label: str
    digits: int
    better: Literal["lower", "higher", "zero"]
    group: Literal["image", "tissue", "uncertainty"] = "image"
    paired: bool = False  # the bench pairs every method against the best on it (Wilcoxon, t, dz)

    @property
    def lower_is_better(self) -> bool:
        """True for errors and distances (MAE, HD95, |bias|), False for similarities."""
        return self.better != "higher"


#: Every metric of an evaluation row, in table order.
METRICS: dict[str, Metric] = {metric.name: metric for metric in (
    Metric("mae", "MAE (HU)", 1, "lower", paired=True),
    Metric("psnr", "PSNR (dB)", 2, "higher", paired=True),
    Metric("ms_ssim", "MS-SSIM", 4, "higher", paired=True),
    Metric("ssim", "SSIM", 4, "higher"),
    Metric("bone_dice", "bone Dice", 3, "higher"),
    Metric("bone_hd95", "bone HD95 (mm)", 2, "lower"),
    *(Metric(f"mae_{name}", f"MAE {name} [{low:.0f}, {high:.0f})", 1, "lower", "tissue")
      for name, (low, high) in TISSUE_CLASSES.items()),
    *(Metric(f"bias_{name}", f"bias {name}", 1, "zero", "tissue") for name in TISSUE_CLASSES),
    Metric("std_error_spearman", "Spearman (std, |error|)", 3, "higher", "uncertainty"),
    # A case's mean std: no direction of its own; it matters as a ranking of the cases' MAE.
    Metric("std_mean", "mean std (HU)", 1, "lower", "uncertainty"),
)}


def metric_names(group: str) -> list[str]:
    """The metric columns of one group (``image``, ``tissue`` or ``uncertainty``), in table order."""
    return [name for name, metric in METRICS.items() if metric.group == group]


def metric_digits(name: str) -> int:
    """Display digits of a metric column (3 for a column the table does not know)."""
    return METRICS[name].digits if name in METRICS else 3


def _tissue_errors(ct_values: np.ndarray, sct_values: np.ndarray) -> dict[str, float]:
    difference = sct_values - ct_values
    out = {}
    for name, (low, high) in TISSUE_CLASSES.items():
        part = difference[(ct_values >= low) & (ct_values < high)]
        out[f"mae_{name}"] = float(np.abs(part).mean()) if part.size else math.nan
        out[f"bias_{name}"] = float(part.mean()) if part.size else math.nan
    return out


def tissue_errors(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """MAE and bias (mean sCT - CT) in HU per tissue class of the true CT, inside the mask.

    Returns:
        ``{"mae_air", "bias_air", ..., "mae_above_1000", "bias_above_1000"}``; NaN for a class
        with no voxel in the mask.
    """
    return _tissue_errors(*_masked_values(*checked_inputs(ct, sct, mask)))
