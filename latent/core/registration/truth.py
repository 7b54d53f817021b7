"""How close a registration came to the truth, on cases that know it (the phantom's ``--write-truth``).

The moved CT shows at voxel p the true CT at p + m(p) (``motion_true.mha``, mm); the registered CT
shows at x the moved CT at x + f(x) (the registration's field). So the registered CT shows the
true CT at x + r(x) with the **residual motion** r(x) = f(x) + m(x + f(x)): zero for a perfect
registration, m itself before registering. Its length in mm over the mask is the residual
misalignment; the MAE against ``ct_true.mha`` is the intensity side of the same question.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

#: Gaussian sigmas (voxels, z y x) both CTs get before the MAE against the truth: the phantom's MR and
#: CT share a fine texture that any resampling blurs, so a raw voxel MAE mostly measures interpolation.
MAE_SMOOTHING = (0.5, 1.5, 1.5)
#: Columns :func:`truth_columns` adds to a case's row of ``register.csv``.
TRUTH_COLUMNS = ("residual_mm_before", "residual_mm_after", "residual_p95_mm_before", "residual_p95_mm_after",
                 "true_mae_before", "true_mae_after")


def compose_fields(first_mm: np.ndarray, then_mm: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
    """f(x) + g(x + f(x)) in mm, (3, z, y, x): reading through ``f`` an image already read through ``g``
    is reading the original through this one. ``g`` is read linearly (nearest value beyond the grid)."""
    spacing = np.asarray(spacing_zyx, dtype=np.float32)[:, None, None, None]
    points = np.indices(first_mm.shape[1:], dtype=np.float32) + first_mm / spacing
    moved = np.stack([ndimage.map_coordinates(component, points, order=1, mode="nearest") for component in then_mm])
    return first_mm + moved


def residual_motion(field_mm: np.ndarray, motion_mm: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
    """r(x) = f(x) + m(x + f(x)) in mm, (3, z, y, x): the registration composed with the true motion."""
    return compose_fields(field_mm, motion_mm, spacing_zyx)


def _length_stats(vectors: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    length = np.linalg.norm(vectors, axis=0)[mask > 0]
    if length.size == 0:
        return 0.0, 0.0
    return float(length.mean()), float(np.percentile(length, 95))


def smoothed_mae(ct: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """MAE (HU) of ``ct`` against ``truth`` in the mask, both smoothed by :data:`MAE_SMOOTHING`."""
    def smooth(volume: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(volume.astype(np.float32), MAE_SMOOTHING)
    inside = mask > 0
    return float(np.abs(smooth(ct) - smooth(truth))[inside].mean()) if inside.any() else 0.0


def truth_columns(moved_ct: np.ndarray, registered_ct: np.ndarray, field_mm: np.ndarray, mask: np.ndarray,
                  spacing_zyx: Sequence[float], ct_true: np.ndarray, motion_mm: np.ndarray | None) -> dict:
    """The :data:`TRUTH_COLUMNS` of one case (residual columns only when the motion is known)."""
    row = {"true_mae_before": round(smoothed_mae(moved_ct, ct_true, mask), 2),
           "true_mae_after": round(smoothed_mae(registered_ct, ct_true, mask), 2)}
    if motion_mm is not None:
        before, before_p95 = _length_stats(motion_mm, mask)
        after, after_p95 = _length_stats(residual_motion(field_mm, motion_mm, spacing_zyx), mask)
        row.update(residual_mm_before=round(before, 3), residual_mm_after=round(after, 3),
                   residual_p95_mm_before=round(before_p95, 3), residual_p95_mm_after=round(after_p95, 3))
    return row
