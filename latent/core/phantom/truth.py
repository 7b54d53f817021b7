"""The phantom's ground truth for moved cases: the CT before the motion and the motion itself.

Beside ``ct.mha`` a moved case (``--defects misregistration|deformation`` or ``--misregister``,
with ``--write-truth``) gets:

- ``ct_true.mha``: the CT without the motion (same noise and field of view), on the MR grid;
- ``motion_true.mha``: a 3-component float32 image on the same grid whose vector at voxel p is
  the displacement in mm along the image axes (x, y, z) from p to the point of ``ct_true`` that
  the moved ``ct.mha`` shows at p (moved[p] = true[p + motion[p]]).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from latent.core.atomic import write_atomic
from latent.core.errors import BadFileError
from latent.core.io import VolumeProperties, read_volume, write_volume

CT_TRUE = "ct_true.mha"
MOTION_TRUE = "motion_true.mha"


def write_truth(folder: Path, ct_true: np.ndarray, motion_mm: np.ndarray | None,
                properties: VolumeProperties) -> None:
    """Write ``ct_true.mha`` and (when known) ``motion_true.mha``; ``motion_mm`` is (3, z, y, x), zyx components."""
    write_volume(Path(folder) / CT_TRUE, ct_true, properties, dtype="int16")
    if motion_mm is None:
        return
    image = sitk.GetImageFromArray(np.moveaxis(motion_mm[::-1], 0, -1).astype(np.float32), isVector=True)
    image.SetSpacing(properties.spacing)
    image.SetOrigin(properties.origin)
    image.SetDirection(properties.direction)
    write_atomic(Path(folder) / MOTION_TRUE, lambda temporary: sitk.WriteImage(image, str(temporary), True),
                 suffix=".mha")


def read_motion(path: Path, properties: VolumeProperties) -> np.ndarray:
    """The true motion as a (3, z, y, x) float32 field in mm with (z, y, x) components.

    Raises:
        BadFileError: unreadable, not a 3-vector image, or on another grid than ``properties``.
    """
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise BadFileError(f"{path}: cannot read the true motion ({str(error).strip().splitlines()[-1]})") from error
    if image.GetNumberOfComponentsPerPixel() != 3:
        raise BadFileError(f"{path}: the true motion must have 3 components per voxel, "
                           f"found {image.GetNumberOfComponentsPerPixel()}")
    if tuple(image.GetSize()) != tuple(properties.size) or not np.allclose(image.GetSpacing(), properties.spacing):
        raise BadFileError(f"{path}: the true motion is on another grid than the case's CT")
    array = sitk.GetArrayFromImage(image).astype(np.float32)  # (z, y, x, xyz)
    return np.ascontiguousarray(np.moveaxis(array, -1, 0)[::-1])


def read_truth(folder: Path) -> tuple[np.ndarray, np.ndarray | None] | None:
    """``(ct_true, motion_mm or None)`` of a phantom case folder, or None when it has no truth."""
    folder = Path(folder)
    if not (folder / CT_TRUE).is_file():
        return None
    ct_true, properties = read_volume(folder / CT_TRUE)
    motion = read_motion(folder / MOTION_TRUE, properties) if (folder / MOTION_TRUE).is_file() else None
    return ct_true, motion
