"""CT onto MR with elastix (``itk-elastix``, imported lazily): the transform as a displacement field.

The images go to elastix on a plain grid (origin 0, identity direction, the case's spacing):
MR and CT share one grid, so a rigid or smooth transform there is the same motion in the
scanner frame, and the displacement field comes back in voxel-aligned millimetres.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from scipy import ndimage

from latent.core.errors import BadConfigError

#: The shipped parameter maps (text files a user may edit; docs/registration.md).
PARAMETER_DIR = Path(__file__).resolve().parents[2] / "configs" / "elastix"
Method = Literal["rigid", "bspline"]
#: Parameter map files of each method, applied in order (elastix composes them).
METHOD_FILES: dict[str, tuple[str, ...]] = {"rigid": ("rigid.txt",), "bspline": ("rigid.txt", "bspline.txt")}
#: CT range given to the metric (HU): air to dense bone; metal is clipped.
CT_METRIC_RANGE = (-1000.0, 2000.0)
#: Dilation of the body mask used as the fixed mask (mm): the skin edge is part of the signal.
MASK_MARGIN_MM = 5.0


def parameter_files(method: str, folder: Path | None = None) -> list[Path]:
    """The parameter map files of ``method`` (``folder``: another folder holding the same names)."""
    if method not in METHOD_FILES:
        raise BadConfigError(f"--method: unknown method {method!r}; expected one of {', '.join(METHOD_FILES)}")
    folder = PARAMETER_DIR if folder is None else Path(folder)
    paths = [folder / name for name in METHOD_FILES[method]]
    for path in paths:
        if not path.is_file():
            raise BadConfigError(f"{path}: elastix parameter map not found")
    return paths


def dilate_mask(mask: np.ndarray, spacing_zyx: Sequence[float], margin_mm: float = MASK_MARGIN_MM) -> np.ndarray:
    """The body mask grown by ``margin_mm`` (an ellipsoidal element in voxels of each axis)."""
    radius = [max(0, int(round(margin_mm / float(s)))) for s in spacing_zyx]
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
    element = sum((g / max(r, 1)) ** 2 for g, r in zip(grids, radius)) <= 1.0
    return ndimage.binary_dilation(mask > 0, structure=element)


def _itk_image(array: np.ndarray, spacing_zyx: Sequence[float], pixel: str = "float"):
    import itk

    dtype = np.float32 if pixel == "float" else np.uint8
    image = itk.image_from_array(np.ascontiguousarray(array, dtype=dtype))
    image.SetSpacing([float(s) for s in reversed(tuple(spacing_zyx))])
    return image


def register_arrays(mr: np.ndarray, ct: np.ndarray, mask: np.ndarray, spacing_zyx: Sequence[float],
                    method: str, folder: Path | None = None, threads: int = 1) -> np.ndarray:
    """Register ``ct`` (moving) onto ``mr`` (fixed) inside the dilated ``mask``.

    Args:
        mr, ct, mask: (z, y, x) arrays on one grid; the CT in HU.
        spacing_zyx: voxel spacing in mm.
        method: ``"rigid"`` or ``"bspline"`` (rigid, then B-spline).
        folder: another folder of parameter maps (default :data:`PARAMETER_DIR`).
        threads: elastix threads.

    Returns:
        The displacement field (3, z, y, x) in mm, components (z, y, x): the CT value that lands
        on voxel ``p`` is read at ``p + field[:, p] / spacing``.
    """
    import itk

    files = parameter_files(method, folder)
    fixed = _itk_image(mr, spacing_zyx)
    moving = _itk_image(np.clip(ct, *CT_METRIC_RANGE), spacing_zyx)
    fixed_mask = _itk_image(dilate_mask(mask, spacing_zyx), spacing_zyx, pixel="mask")
    parameters = itk.ParameterObject.New()
    for path in files:
        parameters.AddParameterFile(str(path))
    _, transform = itk.elastix_registration_method(
        fixed, moving, parameter_object=parameters, fixed_mask=fixed_mask, log_to_console=False,
        number_of_threads=threads)
    # transformix also writes the field to its output folder (the working folder by default)
    with tempfile.TemporaryDirectory(prefix="latent-transformix-") as scratch:
        field = itk.transformix_deformation_field(moving, transform, output_directory=scratch)
        field_xyz = np.array(itk.array_from_image(field), dtype=np.float32)  # (z, y, x, 3), x first
    return np.ascontiguousarray(np.moveaxis(field_xyz[..., ::-1], -1, 0))


def warp(volume: np.ndarray, field_mm: np.ndarray, spacing_zyx: Sequence[float], fill: float) -> np.ndarray:
    """``volume`` resampled through the displacement field (linear). Reads beyond its first or last
    slice take that slice (the anatomy goes on past a scan's ends; air there would teach a model that
    the body stops), reads outside it in-plane take ``fill``."""
    grid = np.indices(volume.shape, dtype=np.float32)
    spacing = np.asarray(spacing_zyx, dtype=np.float32)[:, None, None, None]
    points = grid + field_mm / spacing
    points[0] = np.clip(points[0], 0, volume.shape[0] - 1)
    return ndimage.map_coordinates(np.asarray(volume, dtype=np.float32), points, order=1,
                                   mode="constant", cval=float(fill))


def displacement_stats(field_mm: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Mean and 95th percentile of the displacement length (mm) over the mask."""
    length = np.linalg.norm(field_mm, axis=0)[mask > 0]
    if length.size == 0:
        return 0.0, 0.0
    return float(length.mean()), float(np.percentile(length, 95))


def negative_jacobian_fraction(field_mm: np.ndarray, mask: np.ndarray, spacing_zyx: Sequence[float]) -> float:
    """Share of the mask's voxels where the transform folds: det(I + grad u) <= 0."""
    gradients = np.empty((3, 3) + field_mm.shape[1:], dtype=np.float32)
    for i in range(3):
        for j, step in enumerate(spacing_zyx):
            gradients[i, j] = np.gradient(field_mm[i], float(step), axis=j) if field_mm.shape[1 + j] > 1 else 0.0
    jacobian = np.moveaxis(gradients, (0, 1), (-2, -1)) + np.eye(3, dtype=np.float32)
    inside = mask > 0
    if not inside.any():
        return 0.0
    return float((np.linalg.det(jacobian[inside]) <= 0).mean())
