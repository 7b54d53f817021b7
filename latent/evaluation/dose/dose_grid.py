"""The planning / dose grid: an isotropic box around the body, and resampling onto it.

Plans are optimised and doses computed on one grid per case: identity direction in the LPS
world (so gantry angles always mean the same patient direction), ``dose_grid_mm`` isotropic
spacing, covering the body mask plus one voxel. Cropping to the body keeps SynthRAD-size cases
(up to 600 x 550 x 160 native voxels, mostly air) cheap.

Going from the native 1 x 1 x 3 mm grid to the coarser dose grid averages *stopping power*,
not HU: RSP is box-filtered to the dose voxel size, resampled, then mapped back to the HU that
has exactly that RSP (the table is monotone). The dose engine, which converts HU with the same
table, therefore sees the mean RSP of each dose voxel. Masks are box-filtered the same way and
kept where at least half of a dose voxel is inside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from latent.core.io import VolumeProperties, array_to_image
from latent.evaluation.dose.stopping_power import StoppingPowerCurve

IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
#: HU written outside the body before planning (the challenge sets outside-mask CT to -1024).
OUTSIDE_BODY_HU = -1024.0
#: A dose voxel belongs to a structure when at least this fraction of it is inside.
MASK_FRACTION = 0.5


@dataclass(frozen=True)
class PlanningGrid:
    """Isotropic identity-direction grid; ``origin``/``size`` in (x, y, z), arrays are (z, y, x)."""

    origin: tuple[float, float, float]
    spacing_mm: float
    size: tuple[int, int, int]

    @property
    def properties(self) -> VolumeProperties:
        """Geometry as a :class:`VolumeProperties` (float32 volumes)."""
        spacing = (self.spacing_mm,) * 3
        return VolumeProperties(spacing, self.origin, IDENTITY_DIRECTION, self.size, "float32")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (z, y, x)."""
        return tuple(reversed(self.size))

    def world_coordinates(self, index_zyx: np.ndarray) -> np.ndarray:
        """World LPS (x, y, z) mm of (n, 3) voxel indices given as (z, y, x)."""
        index_xyz = np.asarray(index_zyx, dtype=np.float64)[:, ::-1]
        return np.asarray(self.origin) + index_xyz * self.spacing_mm

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"origin": list(self.origin), "spacing_mm": self.spacing_mm, "size": list(self.size)}

    @classmethod
    def around_body(cls, body: np.ndarray, native: VolumeProperties, spacing_mm: float) -> "PlanningGrid":
        """Smallest grid of ``spacing_mm`` covering the body mask (z, y, x) plus one voxel."""
        indices = np.argwhere(body)
        if indices.size == 0:
            raise ValueError("empty body mask: nothing to plan on")
        low, high = indices.min(axis=0)[::-1] - 0.5, indices.max(axis=0)[::-1] + 0.5  # (x, y, z)
        corners = np.array([[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])
        world = index_to_world(corners, native)
        world_low, world_high = world.min(axis=0) - spacing_mm, world.max(axis=0) + spacing_mm
        size = np.ceil((world_high - world_low) / spacing_mm).astype(int) + 1
        return cls(tuple(float(v) for v in world_low), float(spacing_mm), tuple(int(v) for v in size))


def index_to_world(index_xyz: np.ndarray, properties: VolumeProperties) -> np.ndarray:
    """World LPS mm of continuous (n, 3) voxel indices in (x, y, z) order."""
    direction = np.asarray(properties.direction, dtype=np.float64).reshape(3, 3)
    scaled = np.asarray(index_xyz, dtype=np.float64) * np.asarray(properties.spacing)
    return np.asarray(properties.origin) + scaled @ direction.T


def world_to_index(world: np.ndarray, properties: VolumeProperties) -> np.ndarray:
    """Continuous (x, y, z) voxel indices of (n, 3) world LPS points (inverse of index_to_world)."""
    direction = np.asarray(properties.direction, dtype=np.float64).reshape(3, 3)
    local = (np.asarray(world, dtype=np.float64) - np.asarray(properties.origin)) @ direction
    return local / np.asarray(properties.spacing)


def _box_filter_to(array: np.ndarray, native: VolumeProperties, target_mm: float) -> np.ndarray:
    """Gaussian with the extra variance that turns a native voxel into a ``target_mm`` box."""
    spacing_zyx = np.asarray(native.spacing[::-1], dtype=np.float64)
    extra_variance_mm2 = np.maximum(target_mm**2 - spacing_zyx**2, 0.0) / 12.0
    sigma_voxels = np.sqrt(extra_variance_mm2) / spacing_zyx
    if np.all(sigma_voxels < 0.05):
        return array
    return ndimage.gaussian_filter(array, sigma=sigma_voxels, mode="nearest", truncate=3.0)


def _resample(array: np.ndarray, native: VolumeProperties, grid: PlanningGrid, outside: float) -> np.ndarray:
    image = array_to_image(np.ascontiguousarray(array, dtype=np.float32), native)
    target = grid.properties
    resampled = sitk.Resample(
        image, list(target.size), sitk.Transform(), sitk.sitkLinear, target.origin,
        target.spacing, target.direction, float(outside), sitk.sitkFloat32,
    )
    return sitk.GetArrayFromImage(resampled)


def hu_to_planning_grid(
    hu: np.ndarray, body: np.ndarray, native: VolumeProperties, grid: PlanningGrid, curve: StoppingPowerCurve
) -> np.ndarray:
    """HU (z, y, x) on the planning grid whose RSP is the dose-voxel mean RSP; air outside the body."""
    rsp = curve(np.where(body, hu, OUTSIDE_BODY_HU))
    air = float(curve(np.array([OUTSIDE_BODY_HU]))[0])
    rsp = _box_filter_to(rsp, native, grid.spacing_mm)
    return curve.inverse(_resample(rsp, native, grid, air))


def mask_to_planning_grid(mask: np.ndarray, native: VolumeProperties, grid: PlanningGrid) -> np.ndarray:
    """Boolean mask (z, y, x) on the planning grid: dose voxels at least half inside."""
    fraction = _box_filter_to(mask.astype(np.float32), native, grid.spacing_mm)
    return _resample(fraction, native, grid, 0.0) >= MASK_FRACTION


def crop_to_body(body: np.ndarray, native: VolumeProperties, margin_mm: float) -> tuple[tuple[slice, ...], VolumeProperties]:
    """Slices (z, y, x) of the body's bounding box plus ``margin_mm``, and the cropped geometry.

    Everything the dose pipeline reads lies inside the body, so cropping first bounds memory by
    the patient rather than by the scanner's field of view.
    """
    indices = np.argwhere(body)
    if indices.size == 0:
        raise ValueError("empty body mask: nothing to plan on")
    margin = np.ceil(margin_mm / np.asarray(native.spacing[::-1])).astype(int)
    low = np.maximum(indices.min(axis=0) - margin, 0)
    high = np.minimum(indices.max(axis=0) + margin + 1, body.shape)
    slices = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
    origin = index_to_world(low[::-1][None, :], native)[0]
    cropped = VolumeProperties(
        native.spacing, tuple(float(v) for v in origin), native.direction,
        tuple(int(b - a) for a, b in zip(low[::-1], high[::-1])), native.dtype,
    )
    return slices, cropped
