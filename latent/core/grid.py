"""Canonical grids: native -> canonical (resample + pad/crop centred on the body) and back.

A canonical grid is a spacing (x, y, z) in mm and identity direction in ITK's LPS world, with
either one fixed shape (z, y, x) of multiples of 32 for every case, or the rule ``fit``: each case
gets the smallest shape, in multiples of 4 (the VAE's factor), that covers its whole body mask.
Going there is one SimpleITK resampling onto a box of that shape centred on the body mask; going
back resamples onto exactly the native MR grid (size, spacing, origin and direction copied), so
the round trip restores the geometry exactly. See docs/grids.md.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import SimpleITK as sitk

from latent.core.io import VolumeProperties, array_to_image
from latent.core.errors import BadGeometryError

#: Fixed canonical shapes are multiples of this, so latents (/4) fit UNets with 3 downsamplings.
SHAPE_MULTIPLE = 32
#: Fitted shapes are multiples of the VAE's factor only; latent networks see them through
#: sliding windows of their training crop, so they need no larger multiple.
FIT_MULTIPLE = 4
IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
#: Named presets: spacing (x, y, z) mm and shape (z, y, x).
GRID_PRESETS: dict[str, tuple[tuple[float, float, float], tuple[int, int, int]]] = {
    "synthrad-1.5mm": ((1.5, 1.5, 3.0), (96, 320, 320)),
    "synthrad-2mm": ((2.0, 2.0, 3.0), (96, 256, 256)),
    "synthrad-3mm": ((3.0, 3.0, 3.0), (96, 160, 160)),
}
#: Named fitted grids: spacing (x, y, z) mm; every case gets the shape that covers its body.
FIT_PRESETS: dict[str, tuple[float, float, float]] = {
    "synthrad-fit-1mm": (1.0, 1.0, 3.0),
    "synthrad-fit-1.25mm": (1.25, 1.25, 3.0),
    "synthrad-fit-1.5mm": (1.5, 1.5, 3.0),
    "synthrad-fit-2mm": (2.0, 2.0, 3.0),
}


class GridError(BadGeometryError, ValueError):
    """Invalid canonical grid specification."""


@dataclass(frozen=True)
class CanonicalGrid:
    """Target spacing (x, y, z) in mm and shape (z, y, x), multiples of ``multiple``.

    ``shape=None`` is the rule ``fit``: :meth:`for_body` gives each case its own shape.
    """

    spacing: tuple[float, float, float]
    shape: tuple[int, int, int] | None
    multiple: int = SHAPE_MULTIPLE

    def __post_init__(self) -> None:
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise GridError(f"grid spacing must be three positive numbers, got {self.spacing}")
        if self.shape is not None and (len(self.shape) != 3 or any(s <= 0 or s % self.multiple for s in self.shape)):
            raise GridError(f"grid shape must be three positive multiples of {self.multiple}, got {self.shape}")
        if self.shape is not None:
            check_allocation(self.shape, np.float32, f"grid {self.spec()}")

    @property
    def is_fit(self) -> bool:
        """True for the rule ``fit`` (a shape per case)."""
        return self.shape is None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Shape of the latent grid (4x smaller per axis); a fitted rule has none."""
        if self.shape is None:
            raise GridError(f"grid {self.spec()} gives each case its own shape; ask a case's mapping")
        return tuple(s // 4 for s in self.shape)

    def for_body(self, extent_mm: np.ndarray) -> "CanonicalGrid":
        """The concrete grid of a case whose body spans ``extent_mm`` (x, y, z): itself when fixed,
        else the smallest multiple-of-:data:`FIT_MULTIPLE` shape covering the body."""
        if self.shape is not None:
            return self
        voxels = np.asarray(extent_mm, dtype=float)[::-1] / np.asarray(self.spacing[::-1])
        return CanonicalGrid(self.spacing, round_up_shape(voxels - 1e-6, FIT_MULTIPLE), FIT_MULTIPLE)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``shape`` null for the rule ``fit``; ``multiple`` only where it is not the
        default of its kind, so records of fixed grids keep their producer keys)."""
        data: dict[str, Any] = {"spacing": list(self.spacing), "shape": None if self.shape is None else list(self.shape)}
        if self.multiple != (FIT_MULTIPLE if self.shape is None else SHAPE_MULTIPLE):
            data["multiple"] = self.multiple
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CanonicalGrid":
        """Inverse of :meth:`to_dict` (records without ``multiple`` are fixed multiple-of-32 grids)."""
        shape = data.get("shape")
        multiple = int(data.get("multiple", FIT_MULTIPLE if shape is None else SHAPE_MULTIPLE))
        return cls(tuple(float(v) for v in data["spacing"]), None if shape is None else tuple(int(v) for v in shape),
                   multiple)

    def spec(self) -> str:
        """``'1.5x1.5x3:96x320x320'`` or ``'1.5x1.5x3:fit'``, accepted by :func:`parse_grid_spec`."""
        shape = "fit" if self.shape is None else "x".join(str(v) for v in self.shape)
        return "x".join(f"{v:g}" for v in self.spacing) + ":" + shape


def check_allocation(shape: tuple[int, ...], dtype, what: str) -> None:
    """Refuse, before allocating, an array of ``shape`` and ``dtype`` larger than this machine's memory.

    Raises:
        GridError: naming ``what``, the shape and the sizes in GiB.
    """
    needed = float(np.prod([float(v) for v in shape])) * np.dtype(dtype).itemsize
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return  # unknown on this platform: the allocation itself decides
    if needed > memory:
        shown = "x".join(str(int(v)) for v in shape)
        raise GridError(f"{what}: one {shown} {np.dtype(dtype).name} volume needs {needed / 2**30:.1f} GiB, "
                        f"more than this machine's {memory / 2**30:.1f} GiB of memory")


def parse_grid_spec(spec: str) -> CanonicalGrid:
    """Parse a preset name, ``'SX x SY x SZ : D x H x W'`` (spacing x,y,z mm; shape z,y,x) or
    ``'SX x SY x SZ : fit'`` (each case's shape covers its body).

    Raises:
        GridError: naming the spec and the expected form.
    """
    if spec in GRID_PRESETS:
        spacing, shape = GRID_PRESETS[spec]
        return CanonicalGrid(spacing, shape)
    if spec in FIT_PRESETS:
        return CanonicalGrid(FIT_PRESETS[spec], None, FIT_MULTIPLE)
    number = r"(\d+(?:\.\d+)?)"
    match = re.fullmatch(rf"\s*{number}x{number}x{number}\s*:\s*(?:(\d+)x(\d+)x(\d+)|(fit))\s*", spec)
    if match is None:
        raise GridError(
            f"grid spec {spec!r}: expected a preset ({', '.join([*GRID_PRESETS, *FIT_PRESETS])}), 'auto', "
            "'SXxSYxSZ:DxHxW' (spacing x,y,z in mm : shape z,y,x), e.g. '2x2x3:64x128x128', or 'SXxSYxSZ:fit'"
        )
    values = match.groups()
    spacing = tuple(float(v) for v in values[:3])
    if values[6] == "fit":
        return CanonicalGrid(spacing, None, FIT_MULTIPLE)
    return CanonicalGrid(spacing, tuple(int(v) for v in values[3:6]))


def round_up_shape(extent: np.ndarray, multiple: int = SHAPE_MULTIPLE) -> tuple[int, int, int]:
    """Smallest multiples of ``multiple`` covering ``extent`` voxels per axis."""
    return tuple(int(max(multiple, np.ceil(e / multiple) * multiple)) for e in extent)


@dataclass(frozen=True)
class GridMapping:
    """Everything needed to go from the native grid to the canonical one and back."""

    native: VolumeProperties
    canonical: CanonicalGrid
    canonical_origin: tuple[float, float, float]
    mask_fraction_outside: float

    @property
    def canonical_properties(self) -> VolumeProperties:
        """The canonical grid as volume properties (identity direction)."""
        z, y, x = self.canonical.shape
        return VolumeProperties(self.canonical.spacing, self.canonical_origin, IDENTITY_DIRECTION, (x, y, z), "float32")

    def to_dict(self) -> dict[str, Any]:
        """JSON form (stored with each cached case and prediction)."""
        return {
            "native": self.native.to_dict(),
            "canonical": self.canonical.to_dict(),
            "canonical_origin": list(self.canonical_origin),
            "mask_fraction_outside": self.mask_fraction_outside,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GridMapping":
        """Inverse of :meth:`to_dict`."""
        return cls(
            VolumeProperties.from_dict(data["native"]), CanonicalGrid.from_dict(data["canonical"]),
            tuple(float(v) for v in data["canonical_origin"]), float(data["mask_fraction_outside"]),
        )


def canonical_slices(mapping: GridMapping, native_slices: Iterable[int]) -> set[int]:
    """The canonical axial slices (z indices) that native axial slices overlap (any overlap counts)."""
    nx, ny, _ = mapping.native.size
    canonical = mapping.canonical_properties
    depth = canonical.size[2]
    covered: set[int] = set()
    for k in native_slices:
        corners = np.array([[x, y, k + half] for x in (0, nx - 1) for y in (0, ny - 1) for half in (-0.5, 0.5)],
                           dtype=float)
        z = _physical_to_index(canonical, _index_to_physical(mapping.native, corners))[:, 2]
        low, high = int(np.floor(z.min() + 0.5)), int(np.ceil(z.max() - 0.5))
        covered.update(range(max(low, 0), min(high, depth - 1) + 1))
    return covered


def _index_to_physical(properties: VolumeProperties, index_xyz: np.ndarray) -> np.ndarray:
    """Continuous (x, y, z) indices (N, 3) -> physical points (N, 3)."""
    direction = np.asarray(properties.direction).reshape(3, 3)
    return np.asarray(properties.origin) + (index_xyz * np.asarray(properties.spacing)) @ direction.T


def _physical_to_index(properties: VolumeProperties, points: np.ndarray) -> np.ndarray:
    direction = np.asarray(properties.direction).reshape(3, 3)
    return ((points - np.asarray(properties.origin)) @ direction) / np.asarray(properties.spacing)


def body_centre(mask: np.ndarray, properties: VolumeProperties) -> np.ndarray:
    """Physical centre (x, y, z) of the mask's bounding box (the volume's centre if empty)."""
    nonzero = np.nonzero(mask)
    if nonzero[0].size == 0:
        low, high = np.zeros(3), np.asarray(properties.size, dtype=float) - 1
    else:
        low = np.array([nonzero[2].min(), nonzero[1].min(), nonzero[0].min()], dtype=float)
        high = np.array([nonzero[2].max(), nonzero[1].max(), nonzero[0].max()], dtype=float)
    corners = np.array([[c[0], c[1], c[2]] for c in np.stack(np.meshgrid(*zip(low, high), indexing="ij"), -1).reshape(-1, 3)])
    physical = _index_to_physical(properties, corners)
    return (physical.min(0) + physical.max(0)) / 2


def body_extent_mm(mask: np.ndarray, properties: VolumeProperties) -> np.ndarray:
    """Size (x, y, z) in mm of the axis-aligned box holding the mask (for ``--grid auto``)."""
    nonzero = np.nonzero(mask)
    if nonzero[0].size == 0:
        return np.zeros(3)
    low = np.array([nonzero[2].min(), nonzero[1].min(), nonzero[0].min()], dtype=float) - 0.5
    high = np.array([nonzero[2].max(), nonzero[1].max(), nonzero[0].max()], dtype=float) + 0.5
    corners = np.stack(np.meshgrid(*zip(low, high), indexing="ij"), -1).reshape(-1, 3)
    physical = _index_to_physical(properties, corners)
    return physical.max(0) - physical.min(0)


def plan_mapping(mask: np.ndarray, properties: VolumeProperties, grid: CanonicalGrid) -> GridMapping:
    """Place ``grid`` centred on the body mask of a native volume (a fitted rule first gets the
    shape covering this body, :meth:`CanonicalGrid.for_body`).

    The canonical origin is snapped to whole canonical voxels from the native origin, so that
    with equal spacing and axis-aligned directions no interpolation blur is introduced.

    Args:
        mask: native body mask (z, y, x).
        properties: its native geometry.
        grid: target canonical grid or fitted rule.
    """
    if grid.is_fit:
        grid = _fitted(mask, properties, grid)
    spacing = np.asarray(grid.spacing)
    size_xyz = np.asarray(grid.shape[::-1], dtype=float)
    origin = body_centre(mask, properties) - (size_xyz - 1) / 2 * spacing
    native_origin = np.asarray(properties.origin)
    origin = native_origin + np.floor((origin - native_origin) / spacing + 0.5) * spacing
    mapping = GridMapping(properties, grid, tuple(float(v) for v in origin), 0.0)
    return GridMapping(properties, grid, mapping.canonical_origin, _fraction_outside(mask, mapping))


def _fitted(mask: np.ndarray, properties: VolumeProperties, rule: CanonicalGrid) -> CanonicalGrid:
    """The rule's shape for this body, one voxel larger on any axis the snapped box would clip."""
    grid = rule.for_body(body_extent_mm(mask, properties))
    for _ in range(3):
        mapping = plan_mapping(mask, properties, grid)
        if mapping.mask_fraction_outside == 0.0:
            return grid
        missing = np.asarray(missing_mm(mask, mapping))[::-1] > -np.asarray(grid.spacing[::-1])
        grid = CanonicalGrid(grid.spacing, tuple(s + FIT_MULTIPLE * bool(m) for s, m in zip(grid.shape, missing)),
                             FIT_MULTIPLE)
    return grid


def missing_mm(mask: np.ndarray, mapping: GridMapping) -> tuple[float, float, float]:
    """Per axis (x, y, z), how many mm of the body's extent the canonical box lacks (<= 0: it fits)."""
    capacity = np.asarray(mapping.canonical.shape[::-1]) * np.asarray(mapping.canonical.spacing)
    return tuple(float(v) for v in body_extent_mm(mask, mapping.native) - capacity)


def _fraction_outside(mask: np.ndarray, mapping: GridMapping) -> float:
    total = int(np.count_nonzero(mask))
    if total == 0:
        return 0.0
    canonical = mapping.canonical_properties
    upper = np.asarray(canonical.size) - 0.5
    nonzero = np.nonzero(mask)
    low = np.array([nonzero[2].min(), nonzero[1].min(), nonzero[0].min()], dtype=float)
    high = np.array([nonzero[2].max(), nonzero[1].max(), nonzero[0].max()], dtype=float)
    corners = np.stack(np.meshgrid(*zip(low, high), indexing="ij"), -1).reshape(-1, 3)
    continuous = _physical_to_index(canonical, _index_to_physical(mapping.native, corners))
    if ((continuous >= -0.5) & (continuous <= upper)).all():
        return 0.0  # the body's box lies inside the canonical box: no voxel-by-voxel count needed
    outside = 0
    for z in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(1)):
        y, x = np.nonzero(mask[z])
        index = np.stack([x, y, np.full_like(x, z)], 1).astype(float)
        continuous = _physical_to_index(canonical, _index_to_physical(mapping.native, index))
        outside += int((~((continuous >= -0.5) & (continuous <= upper)).all(1)).sum())
    return outside / total


def _resample(image: sitk.Image, reference: VolumeProperties, interpolator: int, default: float) -> np.ndarray:
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(v) for v in reference.size])
    resampler.SetOutputSpacing(reference.spacing)
    resampler.SetOutputOrigin(reference.origin)
    resampler.SetOutputDirection(reference.direction)
    resampler.SetInterpolator(interpolator)
    resampler.SetDefaultPixelValue(float(default))
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampler.Execute(image))


def to_canonical(array: np.ndarray, mapping: GridMapping, *, is_mask: bool = False, pad_value: float = 0.0) -> np.ndarray:
    """Resample a native (z, y, x) array onto the canonical grid.

    Linear interpolation for images, nearest neighbour for masks; voxels outside the native
    field of view get ``pad_value`` (MR 0, CT -1024, mask 0).

    Returns:
        float32 array of shape ``mapping.canonical.shape`` (uint8 for masks).
    """
    image = array_to_image(np.asarray(array, dtype=np.float32), mapping.native)
    interpolator = sitk.sitkNearestNeighbor if is_mask else sitk.sitkLinear
    result = _resample(image, mapping.canonical_properties, interpolator, pad_value)
    return (result > 0.5).astype(np.uint8) if is_mask else result


def to_native(
    array: np.ndarray,
    mapping: GridMapping,
    *,
    is_mask: bool = False,
    outside_value: float = 0.0,
    native_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Resample a canonical (z, y, x) array back onto exactly the native grid.

    Voxels outside the canonical field of view, and outside ``native_mask`` when given, are
    set to ``outside_value`` (air for sCT).

    Returns:
        float32 array of shape ``native.size`` reversed (uint8 for masks).
    """
    image = array_to_image(np.asarray(array, dtype=np.float32), mapping.canonical_properties)
    interpolator = sitk.sitkNearestNeighbor if is_mask else sitk.sitkLinear
    result = _resample(image, mapping.native, interpolator, outside_value)
    if native_mask is not None:
        result[np.asarray(native_mask) == 0] = outside_value
    return (result > 0.5).astype(np.uint8) if is_mask else result


def auto_grid(
    extents_mm: list[np.ndarray],
    spacings: list[tuple[float, float, float]],
    max_shape: tuple[int, int, int] | None = None,
) -> tuple[CanonicalGrid, float]:
    """``--grid auto``: median spacing and the smallest multiple-of-32 shape covering every body.

    Args:
        extents_mm: per-case body extents (x, y, z) in mm (:func:`body_extent_mm`).
        spacings: per-case native spacings (x, y, z).
        max_shape: optional cap (z, y, x).

    Returns:
        ``(grid, coverage)`` where coverage is the fraction of cases whose body fits entirely.
    """
    spacing = tuple(float(v) for v in np.median(np.asarray(spacings, dtype=float), axis=0))
    needed = np.max(np.asarray(extents_mm), axis=0) / np.asarray(spacing)
    shape = round_up_shape(needed[::-1])
    if max_shape is not None:
        shape = tuple(min(s, m) for s, m in zip(shape, max_shape))
    grid = CanonicalGrid(spacing, shape)
    capacity = np.asarray(shape[::-1]) * np.asarray(spacing)
    coverage = float(np.mean([(np.asarray(e) <= capacity + 1e-6).all() for e in extents_mm]))
    return grid, coverage
