"""Where MR, CT and mask disagree locally: an MR signal void in soft tissue (no metal), tissue in one
modality only (an arm or a tube the other image lacks), and a body cut by the field of view.

Each finder returns the flagged axial slices and a size; :mod:`latent.core.qa.case` turns them
into findings (YELLOW) and ``slices.csv`` rows (``mr_void``, ``one_modality``, ``fov_cut``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from latent.core.qa.config import QAConfig


def _largest(candidates: np.ndarray, spacing_xyz, min_mm3: float, min_slices: int = 1) -> tuple[list[int], float]:
    """Slices and volume (mm^3) of the connected components of ``candidates`` at least ``min_mm3``
    large and ``min_slices`` slices long."""
    labels, count = ndimage.label(candidates)
    if not count:
        return [], 0.0
    voxel_mm3 = float(np.prod(spacing_xyz))
    sizes = np.bincount(labels.ravel())[1:] * voxel_mm3
    spans = np.array([box[0].stop - box[0].start for box in ndimage.find_objects(labels)])
    kept = np.nonzero((sizes >= min_mm3) & (spans >= min_slices))[0] + 1
    if not len(kept):
        return [], 0.0
    inside = np.isin(labels, kept)
    slices = [int(k) for k in np.nonzero(inside.reshape(inside.shape[0], -1).any(axis=1))[0]]
    return slices, float(sizes[kept - 1].sum())


#: In-plane 4-neighbourhood.
IN_PLANE = np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], bool)


def _opened(candidates: np.ndarray) -> np.ndarray:
    """Candidates without their one-voxel rims (partial-volume edges between tissues)."""
    return ndimage.binary_opening(candidates, structure=IN_PLANE)


def signal_void(mr: np.ndarray, ct: np.ndarray, mask: np.ndarray, metal: np.ndarray, spacing_xyz,
                config: QAConfig) -> tuple[list[int], float]:
    """An MR signal void where the CT holds soft tissue and no metal: dark MR (below
    ``mr_dark_fraction`` of its p99 in the mask) over CT in ``void_soft_hu``. A void that reaches
    within ``streak_radius_mm`` of metal is the metal's (susceptibility) and is left to it."""
    body = mask > 0
    p99 = float(np.percentile(mr[body], 99.0))
    low, high = config.void_soft_hu
    candidates = _opened(body & (mr < config.mr_dark_fraction * p99) & (ct > low) & (ct < high))
    if metal.any():
        steps = max(1, int(round(config.streak_radius_mm / min(spacing_xyz))))
        labels, _ = ndimage.label(candidates)
        near = np.unique(labels[ndimage.binary_dilation(metal, iterations=steps) & (labels > 0)])
        candidates = candidates & ~np.isin(labels, near)
    return _largest(candidates, spacing_xyz, config.void_min_mm3, config.void_min_slices)


def one_modality(mr: np.ndarray, ct: np.ndarray, mask: np.ndarray, spacing_xyz,
                 config: QAConfig) -> tuple[list[int], float]:
    """Tissue in one image only: inside the mask, MR signal over CT air (an object only the MR has),
    or outside the mask but inside the MR's field of view, CT tissue (an object only the CT has,
    which the MR-drawn mask left out)."""
    body = mask > 0
    p99 = float(np.percentile(mr[body], 99.0))
    mr_only = body & (ct <= config.air_hu) & (mr > config.one_modality_mr_fraction * p99)
    # outside the MR's field of view (MR exactly 0, its padding) the CT may hold what the MR never saw
    ct_only = ~ndimage.binary_dilation(body, iterations=1) & (ct > config.one_modality_ct_hu) & (mr != 0)
    return _largest(_opened(mr_only | ct_only), spacing_xyz, config.one_modality_min_mm3)


def fov_cut(mr: np.ndarray, ct: np.ndarray, mask: np.ndarray, config: QAConfig) -> list[int]:
    """Slices whose body is cut by the field of view: a share of the mask's in-plane outline above
    ``fov_edge_share`` lies on CT tissue next to the image's padding outside the field of view
    (MR exactly 0). A mask drawn around a whole body ends in air, whose MR holds noise."""
    body = ndimage.binary_fill_holes(mask > 0, structure=IN_PLANE)  # the outer outline only
    edge = body & ~ndimage.binary_erosion(body, structure=IN_PLANE)
    padding = ndimage.binary_dilation((mr == 0) & ~body, structure=IN_PLANE)
    counts = edge.reshape(edge.shape[0], -1).sum(axis=1)
    cut = (edge & padding & (ct > config.one_modality_ct_hu)).reshape(edge.shape[0], -1).sum(axis=1)
    judged = counts >= config.fov_min_edge_voxels
    shares = np.where(judged, cut / np.maximum(counts, 1), 0.0)
    return [int(k) for k in np.nonzero(shares > config.fov_edge_share)[0]]
