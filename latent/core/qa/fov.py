"""Geometry and field of view: spacing, mask size, border contact, slices on CT air or dark MR."""

from __future__ import annotations

import numpy as np

from latent.core.qa.config import QAConfig

#: Axis names of a (z, y, x) array, by array axis.
AXES = ("z", "y", "x")


def border_contact(mask: np.ndarray) -> dict[str, tuple[float, float]]:
    """Per axis, the share of the low and the high border face's voxels that lie in the mask."""
    body = mask > 0
    contact = {}
    for axis, name in enumerate(AXES):
        low = np.take(body, 0, axis=axis)
        high = np.take(body, body.shape[axis] - 1, axis=axis)
        contact[name] = (float(low.mean()), float(high.mean()))
    return contact


def geometry_descriptors(mask: np.ndarray, spacing_xyz) -> dict[str, float]:
    """Spacing, mask voxel count and volume, and the border contact per axis (the larger face)."""
    count = int(np.count_nonzero(mask))
    result = {"spacing_x": float(spacing_xyz[0]), "spacing_y": float(spacing_xyz[1]),
              "spacing_z": float(spacing_xyz[2]), "mask_voxels": float(count),
              "mask_volume_ml": count * float(np.prod(spacing_xyz)) / 1000.0}
    for name, faces in border_contact(mask).items():
        result[f"border_{name}"] = max(faces)
    return result


def border_findings(mask: np.ndarray, config: QAConfig) -> list[str]:
    """``'the end of z'``-style names of the border faces the body touches beyond the configured share."""
    found = []
    for name, (low, high) in border_contact(mask).items():
        limit = config.border_contact_max.get(name, 1.0)
        for side, share in (("start", low), ("end", high)):
            if share > limit:
                found.append(f"the {side} of {name} ({share:.0%} of the face)")
    return found


def slice_shares(values: np.ndarray, below: float, mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """Per slice, the share of the mask's voxels where ``values <= below`` (NaN on slices under ``min_voxels``)."""
    body = mask > 0
    counts = body.reshape(body.shape[0], -1).sum(axis=1)
    hits = (body & (values <= below)).reshape(body.shape[0], -1).sum(axis=1)
    shares = np.full(body.shape[0], np.nan)
    judged = counts >= min_voxels
    shares[judged] = hits[judged] / counts[judged]
    return shares


def outlying_slices(shares: np.ndarray, share: float, excess: float) -> list[int]:
    """Slices whose share exceeds ``share`` and the case's median slice share by ``excess``."""
    if np.all(np.isnan(shares)):
        return []
    median = float(np.nanmedian(shares))
    with np.errstate(invalid="ignore"):
        hit = (shares > share) & (shares - median > excess)
    return [int(k) for k in np.nonzero(hit)[0]]


def air_slices(ct: np.ndarray, mask: np.ndarray, config: QAConfig) -> list[int]:
    """Slices where the mask covers CT air (<= ``air_hu``) beyond the configured share."""
    shares = slice_shares(ct, config.air_hu, mask, config.min_slice_voxels)
    return outlying_slices(shares, config.slice_air_share, config.slice_excess)


def dark_slices(mr: np.ndarray, mask: np.ndarray, config: QAConfig) -> list[int]:
    """Slices where the MR is dark (below ``mr_dark_fraction`` of its p99 in the mask) beyond the configured share."""
    p99 = float(np.percentile(mr[mask > 0], 99.0))
    shares = slice_shares(mr, config.mr_dark_fraction * p99, mask, config.min_slice_voxels)
    return outlying_slices(shares, config.slice_dark_share, config.slice_excess)


def body_slices(mask: np.ndarray, config: QAConfig) -> int:
    """Slices with at least ``min_slice_voxels`` mask voxels."""
    return int(np.count_nonzero(mask.reshape(mask.shape[0], -1).sum(axis=1) >= config.min_slice_voxels))


def ranges(slices: list[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``'3-5, 9'``."""
    parts, ordered = [], sorted(set(slices))
    start = previous = None
    for value in ordered:
        if start is None:
            start = previous = value
        elif value == previous + 1:
            previous = value
        else:
            parts.append(f"{start}-{previous}" if previous != start else f"{start}")
            start = previous = value
    if start is not None:
        parts.append(f"{start}-{previous}" if previous != start else f"{start}")
    return ", ".join(parts)
