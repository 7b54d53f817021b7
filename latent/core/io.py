"""Volume I/O with geometry: read and write 3D medical images as ``(array (z, y, x), properties)``.

Readers return a plain numpy array in SimpleITK's (z, y, x) order together with a
:class:`VolumeProperties` record (spacing, origin and direction in ITK's LPS world, size and
dtype). Writers take the same record, so a read -> write -> read round trip keeps voxels and
geometry. Every failure is a :class:`VolumeError` whose one-line message names the file.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from latent.core.atomic import write_atomic
from latent.core.errors import BadFileError
from latent.core.volume_files import VolumeError, VolumeGeometryError, verify_volume_file

#: File suffixes read as single files (a folder is read as a DICOM series).
VOLUME_SUFFIXES = (".mha", ".mhd", ".nii.gz", ".nii", ".nrrd")
#: Suffixes the writer produces (compressed by default).
WRITE_SUFFIXES = (".mha", ".nii.gz", ".nii", ".nrrd")
__all__ = ["VolumeError", "VolumeGeometryError", "VolumeProperties", "read_image", "read_volume", "write_volume"]


@dataclass(frozen=True)
class VolumeProperties:
    """Geometry of a volume in ITK's LPS world; ``spacing``/``origin``/``size`` are (x, y, z)."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    size: tuple[int, int, int]
    dtype: str = "int16"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VolumeProperties":
        """Inverse of :meth:`to_dict`."""
        return cls(
            spacing=tuple(float(v) for v in data["spacing"]),
            origin=tuple(float(v) for v in data["origin"]),
            direction=tuple(float(v) for v in data["direction"]),
            size=tuple(int(v) for v in data["size"]),
            dtype=str(data.get("dtype", "int16")),
        )

    @classmethod
    def from_image(cls, image: sitk.Image, dtype: str | None = None) -> "VolumeProperties":
        """Geometry of a SimpleITK image."""
        array_dtype = dtype or str(sitk.GetArrayViewFromImage(image).dtype)
        return cls(
            spacing=tuple(float(v) for v in image.GetSpacing()),
            origin=tuple(float(v) for v in image.GetOrigin()),
            direction=tuple(float(v) for v in image.GetDirection()),
            size=tuple(int(v) for v in image.GetSize()),
            dtype=array_dtype,
        )

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Copy spacing, origin and direction onto ``image`` (in place) and return it."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def same_grid(self, other: "VolumeProperties", tolerance: float = 1e-4) -> bool:
        """True when size, spacing, origin and direction agree (within ``tolerance``)."""
        return not self.grid_differences(other, tolerance)

    def grid_differences(self, other: "VolumeProperties", tolerance: float = 1e-4) -> list[str]:
        """Human-readable list of what differs between two grids (empty when identical)."""
        differences = []
        if self.size != other.size:
            differences.append(f"size {self.size} vs {other.size}")
        for name in ("spacing", "origin", "direction"):
            mine, theirs = np.asarray(getattr(self, name)), np.asarray(getattr(other, name))
            if not np.allclose(mine, theirs, atol=tolerance, rtol=0):
                differences.append(f"{name} {_mm(mine)} vs {_mm(theirs)}")
        return differences


def is_volume_path(path: Path) -> bool:
    """True for a file with a supported volume suffix."""
    name = path.name.lower()
    return any(name.endswith(suffix) for suffix in VOLUME_SUFFIXES)


def strip_volume_suffix(name: str) -> str:
    """``'1ABA005.nii.gz' -> '1ABA005'``."""
    lower = name.lower()
    for suffix in VOLUME_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read a 3D scalar image (file or DICOM series folder) as a SimpleITK image.

    Raises:
        VolumeError: missing, unreadable, corrupted (``latent.core.volume_files``), not 3D,
            vector-valued, or holding NaN/inf voxels.
        VolumeGeometryError: non-finite origin, spacing or direction.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise VolumeError(f"{path}: broken symbolic link (to {os.readlink(path)})")
    if not path.exists():
        raise VolumeError(f"{path}: file not found")
    if not os.access(path, os.R_OK):
        raise VolumeError(f"{path}: permission denied (not readable by this user)")
    try:
        if path.is_dir():
            image = _read_dicom_series(path)
        else:
            verify_volume_file(path)
            image = sitk.ReadImage(str(path))
    except VolumeError:
        raise
    except RuntimeError as error:
        # ITK's own lines stay out of the one line; `latent --debug` shows them as the cause
        raise VolumeError(f"{path}: cannot be read as an image (truncated or not an image)") from error
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(
            f"{path}: vector image with {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "a scalar 3D volume is needed"
        )
    if image.GetDimension() != 3:
        raise VolumeError(f"{path}: {image.GetDimension()}D image; a 3D volume is needed")
    if min(image.GetSize()) < 2:
        raise VolumeError(f"{path}: a single slice, size (x, y, z) {image.GetSize()}; a 3D volume is needed")
    _check_geometry(path, image)
    view = sitk.GetArrayViewFromImage(image)
    if np.iscomplexobj(view) or view.dtype == bool:
        raise VolumeError(f"{path}: {view.dtype} voxels; a real-valued scalar volume is needed")
    if np.issubdtype(view.dtype, np.floating) and not np.isfinite(view).all():
        count = int((~np.isfinite(view)).sum())
        raise VolumeError(f"{path}: {count} NaN/inf voxels")
    return image


#: Voxel sizes outside (0, MAX_SPACING_MM] mean a broken header (or one not in mm).
MAX_SPACING_MM = 20.0
#: How far from orthonormal a direction matrix may be (rounding in headers).
DIRECTION_TOLERANCE = 1e-3


def _check_geometry(path: Path, image: sitk.Image) -> None:
    for name in ("origin", "spacing", "direction"):
        values = np.asarray(getattr(image, f"Get{name.title()}")(), float)
        if not np.all(np.isfinite(values)):
            raise VolumeGeometryError(f"{path}: {name} {_mm(values)} is not finite; origin, spacing and direction "
                                      "must be finite numbers")
    spacing = np.asarray(image.GetSpacing(), float)
    if np.any(spacing <= 0):
        raise VolumeError(f"{path}: spacing (x, y, z) {_mm(spacing)} mm; every voxel size must be positive")
    if np.any(spacing > MAX_SPACING_MM):
        raise VolumeError(f"{path}: spacing (x, y, z) {_mm(spacing)} mm exceeds {MAX_SPACING_MM:g} mm; "
                          "is the header in mm?")
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=DIRECTION_TOLERANCE):
        raise VolumeError(f"{path}: direction matrix {_mm(direction.ravel())} is not orthonormal")


def _mm(values: np.ndarray) -> tuple[float, ...]:
    return tuple(round(float(v), 4) for v in values)


def _read_dicom_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series_ids = reader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise VolumeError(f"{folder}: folder holds no DICOM series")
    if len(series_ids) > 1:
        raise VolumeError(f"{folder}: folder holds {len(series_ids)} DICOM series; point at one")
    files = reader.GetGDCMSeriesFileNames(str(folder), series_ids[0])
    reader.SetFileNames(files)
    return reader.Execute()


def read_volume(path: str | os.PathLike, dtype: np.dtype | None = None) -> tuple[np.ndarray, VolumeProperties]:
    """Read a 3D volume.

    Args:
        path: .mha/.mhd/.nii/.nii.gz/.nrrd file or a DICOM series folder.
        dtype: optional dtype to cast the array to.

    Returns:
        ``(array, properties)`` with ``array`` of shape (z, y, x).
    """
    image = read_image(path)
    array = sitk.GetArrayFromImage(image)
    properties = VolumeProperties.from_image(image, dtype=str(array.dtype))
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    return array, properties


def array_to_image(array: np.ndarray, properties: VolumeProperties) -> sitk.Image:
    """Wrap a (z, y, x) array in a SimpleITK image with ``properties``' geometry."""
    if array.ndim != 3:
        raise ValueError(f"expected a 3D (z, y, x) array, got shape {array.shape}")
    expected = tuple(reversed(properties.size))
    if tuple(array.shape) != expected:
        raise ValueError(f"array shape {array.shape} does not match the grid size (z, y, x) {expected}")
    return properties.apply_to(sitk.GetImageFromArray(array))


def write_volume(
    path: str | os.PathLike,
    array: np.ndarray,
    properties: VolumeProperties,
    dtype: np.dtype | str | None = None,
    compress: bool = True,
) -> Path:
    """Write a (z, y, x) array with ``properties``' geometry, atomically.

    The file appears under its final name only once completely written, so an interrupted
    write never leaves a half-written volume behind.

    Args:
        path: destination ending in .mha, .nii.gz, .nii or .nrrd.
        array: voxel values, shape (z, y, x) matching ``properties.size`` reversed.
        properties: geometry to write.
        dtype: cast before writing (default: ``properties.dtype``).
        compress: compress the file (SynthRAD files are compressed MetaImage).

    Returns:
        The written path.
    """
    path = Path(path)
    suffix = next((s for s in WRITE_SUFFIXES if path.name.lower().endswith(s)), None)
    if suffix is None:
        raise VolumeError(f"{path}: unsupported output suffix; use one of {', '.join(WRITE_SUFFIXES)}")
    target_dtype = np.dtype(dtype or properties.dtype)
    if np.issubdtype(target_dtype, np.integer) and not np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(target_dtype)
        array = np.clip(np.rint(array), info.min, info.max)
    image = array_to_image(np.ascontiguousarray(array.astype(target_dtype, copy=False)), properties)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, lambda temporary: sitk.WriteImage(image, str(temporary), compress), suffix)
