"""The phantom's injected defects (see :mod:`latent.core.phantom.defects`): each works in voxel
space on the float MR / CT of one case before the mask is derived, draws only from its own
``rng`` and returns its record (``"slices"``: z indices of the written volume, ascending)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: In-plane radius (mm) of the extra objects and of the signal void.
ARM_RADIUS_MM, TUBE_RADIUS_MM, VOID_RADIUS_MM = (10.0, 16.0), (4.0, 6.0), (8.0, 14.0)
#: Extra-object values: CT in HU, MR relative to the case's gain (arm: muscle; tube: a plastic
#: tube filled with fluid, bright on T1w only for the sake of being seen in the MR-only variant).
OBJECT_VALUES = {"arm": (45.0, 0.35), "tube": (150.0, 0.6)}


def _covered(fov: np.ndarray) -> np.ndarray:
    return np.flatnonzero(fov.any(axis=(1, 2)))


def _slices(present: np.ndarray) -> list[int]:
    return [int(z) for z in np.flatnonzero(present.any(axis=(1, 2)))]


def _solid(occupancy: np.ndarray) -> np.ndarray:
    """Occupancy without the slices that hold no voxel of at least one half (partial-volume
    slivers), so that the recorded slices are exactly the changed ones."""
    occupancy[~(occupancy >= 0.5).any(axis=(1, 2))] = 0.0
    return occupancy


def cut_field_of_view(fov: np.ndarray, body: np.ndarray, rng) -> tuple[np.ndarray, dict]:
    """Cut the body by a straight edge of the field of view on 2-4 slices at one end, deeper
    towards that end (a quarter to a half of the body's extent), in MR and CT alike."""
    covered = _covered(fov)
    count = int(min(rng.integers(2, 5), max(1, len(covered) // 4)))
    end = "first" if rng.random() < 0.5 else "last"
    side = ("x+", "x-", "y+", "y-")[int(rng.integers(0, 4))]
    depths = np.linspace(0.25, 0.5, count) * rng.uniform(0.9, 1.1)
    slices = covered[:count][::-1] if end == "first" else covered[-count:]  # inner slice first
    cut = fov.copy()
    record = {"end": end, "side": side, "slices": sorted(int(z) for z in slices), "cut_index": {},
              "removed_body_voxels": 0}
    axis = 1 if side[0] == "y" else 0  # in-plane axis of the slice (y, x)
    for z, depth in zip(slices, depths):
        along = np.flatnonzero(body[z].any(axis=axis))
        if along.size == 0:
            continue
        extent = along[-1] - along[0] + 1
        index = int(round(along[-1] + 1 - depth * extent)) if side[1] == "+" else int(round(along[0] + depth * extent))
        region = np.zeros(body.shape[1:], bool)
        lo, hi = (index, None) if side[1] == "+" else (None, index)
        if axis == 1:
            region[lo:hi, :] = True
        else:
            region[:, lo:hi] = True
        cut[z] &= ~region
        record["cut_index"][str(int(z))] = index
        record["removed_body_voxels"] += int((body[z] & fov[z] & region).sum())
    record["cut_index"] = dict(sorted(record["cut_index"].items(), key=lambda kv: int(kv[0])))
    return cut, record


def add_extra_object(mr, ct, body, fov, pixel_mm: float, rng, info: dict) -> dict:
    """An arm (soft-tissue cylinder) or a thin tube lying against the body along z, in the CT
    only or the MR only."""
    kind = "arm" if rng.random() < 0.5 else "tube"
    modality = "ct" if rng.random() < 0.5 else "mr"
    covered = _covered(fov)
    count = int(rng.integers(max(3, len(covered) // 2), len(covered) + 1))
    start = int(covered[0] + rng.integers(0, len(covered) - count + 1))
    mid = start + count // 2
    radius = rng.uniform(*(ARM_RADIUS_MM if kind == "arm" else TUBE_RADIUS_MM)) / pixel_mm
    centre, radius = _beside_body(body[mid], fov[mid], radius, int(rng.integers(0, 4)))
    yy, xx = np.ogrid[:body.shape[1], :body.shape[2]]
    disc = np.clip(radius - np.hypot(yy - centre[0], xx - centre[1]) + 0.5, 0.0, 1.0)
    occupancy = np.zeros(body.shape, np.float32)
    occupancy[start:start + count] = disc
    occupancy = _solid(occupancy * (fov & ~body))  # lies against the body, never inside it
    hu, relative = OBJECT_VALUES[kind]
    if modality == "ct":
        value = hu + info["ct_noise_hu"] * rng.standard_normal(ct.shape, dtype=np.float32)
        ct += occupancy * (value - ct)
    else:
        value = info["mr_gain"] * relative * (1 + 0.05 * rng.standard_normal(mr.shape, dtype=np.float32))
        mr += occupancy * (value - mr)
    present = occupancy >= 0.5
    return {"modality": modality, "kind": kind, "slices": _slices(present), "centre_yx": [float(c) for c in centre],
            "radius_mm": float(radius * pixel_mm), "voxels": int(present.sum())}


def _beside_body(body2d: np.ndarray, fov2d: np.ndarray, radius: float, first: int) -> tuple[tuple[float, float], float]:
    """Centre and radius of a disc touching the body's outermost point on one of four sides
    (trying ``first`` then the others), kept inside the grid and the field of view."""
    ny, nx = body2d.shape
    rows, cols = np.nonzero(body2d)
    best = ((ny / 2, nx / 2), 0.0)
    for k in range(4):
        side = (first + k) % 4
        coords, other, limit = (cols, rows, nx) if side < 2 else (rows, cols, ny)
        edge = coords.max() if side % 2 == 0 else coords.min()
        across = float(other[coords == edge].mean())
        room = (limit - 2 - edge) if side % 2 == 0 else (edge - 1)
        r = min(radius, room / 1.9)
        sign = 1 if side % 2 == 0 else -1
        along = edge + sign * 0.8 * r
        centre = (across, along) if side < 2 else (along, across)
        inside = fov2d[int(round(centre[0])), int(round(centre[1]))]
        if inside and r >= min(radius, 1.5):
            return centre, r
        if inside and r > best[1]:
            best = (centre, r)
    return best


def add_signal_void(mr, body, soft, spacing_zyx, rng, info: dict) -> dict:
    """An ellipsoid inside the body where the MR falls to the noise floor; ``voxels`` counts them.
    Its central disc lies in soft tissue (MR-bright): a void over bone or air, already dark on MR,
    would change nothing a detector or a model could see."""
    dz, pixel = float(spacing_zyx[0]), float(spacing_zyx[2])
    radius = rng.uniform(*VOID_RADIUS_MM) / pixel
    half_z = max(1.0, rng.uniform(4.0, 8.0) / dz)
    covered = np.flatnonzero(body.any(axis=(1, 2)))
    inner = covered[(covered >= covered[0] + 1) & (covered <= covered[-1] - 1)]
    order = rng.permutation(inner if inner.size else covered)
    centre = None
    for shrink in (1.0, 0.7, 0.5):
        r = max(1.5, radius * shrink)
        for z in order:
            depth = ndimage.distance_transform_edt(body[z])
            soft_depth = ndimage.distance_transform_edt(soft[z])
            candidates = np.argwhere((soft_depth >= r) & (depth >= r + 2))
            if len(candidates):
                centre = (int(z), *(int(v) for v in candidates[rng.integers(0, len(candidates))]))
                break
        if centre is not None:
            break
    if centre is None:
        return {"slices": [], "voxels": 0, "centre_zyx": None, "radius_mm": 0.0}
    y, x = np.ogrid[:mr.shape[1], :mr.shape[2]]
    in_plane = np.hypot(y - centre[1], x - centre[2])
    occupancy = np.zeros(mr.shape, np.float32)
    for z in range(mr.shape[0]):  # an ellipsoid with a hard edge: every voxel in it is void
        across = 1.0 - ((z - centre[0]) / half_z) ** 2
        if across > 0:
            occupancy[z] = in_plane <= r * np.sqrt(across)
    occupancy = _solid(occupancy * body)
    sigma = info["mr_noise_sigma"]
    floor = sigma * np.hypot(rng.standard_normal(mr.shape, dtype=np.float32),
                             rng.standard_normal(mr.shape, dtype=np.float32))
    mr += occupancy * (floor - mr)
    present = occupancy >= 0.5
    return {"slices": _slices(present), "voxels": int(present.sum()), "centre_zyx": list(centre),
            "radius_mm": float(r * pixel), "half_z_mm": float(half_z * dz)}


def add_banding(mr, fov, rng) -> dict:
    """Scale 2-4 contiguous MR slices (never an end slice) by 0.6-0.75 or 1.3-1.5."""
    covered = _covered(fov)
    count = int(min(rng.integers(2, 5), max(1, len(covered) - 2)))
    start = int(covered[0] + 1 + rng.integers(0, max(1, len(covered) - count - 1)))
    factor = rng.uniform(0.6, 0.75) if rng.random() < 0.5 else rng.uniform(1.3, 1.5)
    mr[start:start + count] *= factor
    return {"slices": list(range(start, start + count)), "factor": float(factor)}


def add_ct_offset(ct, fov, rng) -> dict:
    """Shift the whole CT by +150..+300 HU (a wrong rescale intercept); outside the field of
    view stays at its fill value."""
    offset = rng.uniform(150.0, 300.0)
    ct += offset
    return {"slices": [int(z) for z in _covered(fov)], "offset_hu": float(offset)}
