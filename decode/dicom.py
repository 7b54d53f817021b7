"""Write a synthetic CT as a DICOM CT image series a treatment-planning system can import.

One file per slice (CT Image Storage, explicit VR little endian, with file meta). Geometry comes
from the volume's properties, so oblique and rotated grids are written correctly:

- ImageOrientationPatient = the direction's first two columns (the x and y index axes),
- ImagePositionPatient of slice k = origin + direction[:, 2] * k * spacing_z,
- PixelSpacing = [row spacing (y), column spacing (x)], SliceThickness = SpacingBetweenSlices =
  spacing_z.

Storage: unsigned integers, 12 bits stored, RescaleSlope 1 / RescaleIntercept -1024, so stored
values 0..4095 map exactly onto the SynthRAD range [-1024, 3071] HU (voxels are rounded and
clipped to it). 12 bits stored also lets readers such as GDCM return a signed 16-bit image.

DICOM has no slice-axis direction of its own: readers rebuild it as the cross product of the
two in-plane axes and sort slices by position. A volume whose direction has determinant -1
(left-handed) is therefore read back with its z axis reversed: the same voxels at the same
physical positions, on a grid indexed the other way along z.

The series is written into a hidden temporary folder beside the target and renamed into place
only once complete, so a TPS watching the folder never sees a partial series.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid
from pydicom.valuerep import format_number_as_ds

from latent.core.atomic import output_mode
from latent.core.errors import InputError
from latent.core.intensity import FULL_CT_MAX_HU, FULL_CT_MIN_HU
from latent.core.io import VolumeProperties

logger = logging.getLogger(__name__)

#: Stored value = HU - RESCALE_INTERCEPT, so -1024 HU is stored as 0.
RESCALE_INTERCEPT = int(FULL_CT_MIN_HU)
#: 12 bits hold 0..4095 = the full [-1024, 3071] HU range, the classic CT storage.
BITS_STORED = 12
#: Soft-tissue window for display.
WINDOW_CENTER, WINDOW_WIDTH = 40, 400
#: Tolerance on the orthonormality of the direction matrix.
DIRECTION_TOLERANCE = 1e-4
SYNTHETIC_NOTE = "Synthetic CT generated from MR by latent-sct; not an acquired CT image"


class DicomWriteError(InputError, ValueError):
    """The volume cannot be written as a DICOM CT series."""


def _ds(values: np.ndarray | list[float]) -> list[str]:
    """Decimal strings of at most 16 characters (the DS limit), as precise as that allows."""
    return [format_number_as_ds(float(v)) for v in np.ravel(values)]


def _direction_matrix(properties: VolumeProperties) -> np.ndarray:
    direction = np.asarray(properties.direction, dtype=float).reshape(3, 3)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=DIRECTION_TOLERANCE):
        raise DicomWriteError(f"direction {properties.direction} is not orthonormal; DICOM needs orthogonal axes")
    return direction


def hu_to_stored(hu: np.ndarray) -> np.ndarray:
    """HU -> stored uint16 pixel values (rounded, clipped to [-1024, 3071] HU first)."""
    clipped = np.clip(np.rint(np.asarray(hu, dtype=np.float64)), FULL_CT_MIN_HU, FULL_CT_MAX_HU)
    return (clipped - RESCALE_INTERCEPT).astype(np.uint16)


def stored_to_hu(stored: np.ndarray) -> np.ndarray:
    """Inverse of :func:`hu_to_stored` (slope 1)."""
    return np.asarray(stored, dtype=np.int32) + RESCALE_INTERCEPT


def _series_dataset(
    properties: VolumeProperties,
    direction: np.ndarray,
    patient_id: str,
    patient_name: str,
    patient_position: str | None,
    series_description: str,
    series_number: int,
    study_uid: str,
    series_uid: str,
    frame_of_reference_uid: str,
) -> Dataset:
    """Attributes shared by every slice of the series."""
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    size_x, size_y, _ = properties.size
    spacing_x, spacing_y, spacing_z = properties.spacing
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "latent-sct"
    ds.ManufacturerModelName = "latent-sct synthetic CT"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = series_description
    ds.DerivationDescription = SYNTHETIC_NOTE
    ds.ImageComments = SYNTHETIC_NOTE
    ds.BurnedInAnnotation = "NO"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.KVP = ""
    ds.SliceThickness = format_number_as_ds(float(spacing_z))
    ds.SpacingBetweenSlices = format_number_as_ds(float(spacing_z))
    # Type 2C for CT: left empty unless the caller knows it (e.g. copied from the MR series).
    ds.PatientPosition = patient_position or ""
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = ""
    ds.SeriesNumber = int(series_number)
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = _ds(np.concatenate([direction[:, 0], direction[:, 1]]))
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = int(size_y)
    ds.Columns = int(size_x)
    ds.PixelSpacing = _ds([spacing_y, spacing_x])  # [row spacing (between rows = y), column spacing (x)]
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = WINDOW_CENTER
    ds.WindowWidth = WINDOW_WIDTH
    ds.RescaleIntercept = RESCALE_INTERCEPT
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.LossyImageCompression = "00"
    return ds


def _slice_dataset(shared: Dataset, stored_slice: np.ndarray, index: int, position: np.ndarray, normal: np.ndarray) -> Dataset:
    ds = Dataset()
    ds.update(shared)
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = _ds(position)
    ds.SliceLocation = format_number_as_ds(float(position @ normal))
    ds.PixelData = np.ascontiguousarray(stored_slice, dtype="<u2").tobytes()
    return ds


def _write_slice(ds: Dataset, path: Path) -> None:
    """Write one slice file (module-level so tests can simulate a failure midway)."""
    ds.save_as(path, enforce_file_format=True)


def _move_into_place(temporary: Path, folder: Path, overwrite: bool) -> None:
    """Rename the finished temporary folder to ``folder`` (replacing an old series if allowed)."""
    os.chmod(temporary, output_mode(folder=True))  # mkdtemp makes 0700: the umask's mode instead
    if not folder.exists():
        os.rename(temporary, folder)
        return
    if not any(folder.iterdir()):
        folder.rmdir()
        os.rename(temporary, folder)
        return
    if not overwrite:
        raise FileExistsError(f"{folder}: folder exists and is not empty; pass overwrite=True to replace it")
    previous = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
    previous.rmdir()
    os.rename(folder, previous)
    try:
        os.rename(temporary, folder)
    except BaseException:
        os.rename(previous, folder)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def write_dicom_series(
    folder: str | os.PathLike,
    hu: np.ndarray,
    properties: VolumeProperties,
    patient_id: str,
    series_description: str = "synthetic CT",
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    *,
    patient_name: str | None = None,
    patient_position: str | None = None,
    series_number: int = 1,
    overwrite: bool = False,
) -> list[Path]:
    """Write a (z, y, x) HU volume as a DICOM CT series, one file per slice, atomically.

    Args:
        folder: destination folder (created; must be absent or empty unless ``overwrite``).
        hu: sCT in HU, shape (z, y, x) = ``properties.size`` reversed; rounded and clipped to
            [-1024, 3071].
        properties: native geometry (spacing, origin, direction in ITK's LPS world = DICOM's
            patient coordinate system).
        patient_id: PatientID (also PatientName unless ``patient_name`` is given).
        series_description: SeriesDescription; a DerivationDescription marks it synthetic.
        study_uid: StudyInstanceUID to join (e.g. the MR's study); a new one when ``None``.
        frame_of_reference_uid: FrameOfReferenceUID to share with the MR so the TPS registers
            them by identity; a new one when ``None``.
        patient_name: PatientName (default: ``patient_id``).
        patient_position: PatientPosition, e.g. ``"HFS"`` copied from the MR (empty when unknown).
        series_number: SeriesNumber.
        overwrite: replace a non-empty existing ``folder``.

    Returns:
        Paths of the written files in InstanceNumber order (slice k is instance k + 1).

    Raises:
        DicomWriteError: wrong shape, NaN voxels or a non-orthonormal direction.
        FileExistsError: ``folder`` is a file, or is not empty and ``overwrite`` is False.
    """
    folder = Path(folder)
    hu = np.asarray(hu)
    expected = tuple(reversed(properties.size))
    if hu.ndim != 3 or tuple(hu.shape) != expected:
        raise DicomWriteError(f"sCT shape {hu.shape} does not match the grid size (z, y, x) {expected}")
    if np.issubdtype(hu.dtype, np.floating) and not np.isfinite(hu).all():
        raise DicomWriteError(f"sCT holds {int((~np.isfinite(hu)).sum())} NaN/inf voxels")
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder}: exists and is not a folder")
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder}: folder exists and is not empty; pass overwrite=True to replace it")
    direction = _direction_matrix(properties)
    normal = np.cross(direction[:, 0], direction[:, 1])
    if float(normal @ direction[:, 2]) < 0:
        logger.warning("%s: left-handed direction; DICOM readers will index the slices in reverse z order", folder)
    shared = _series_dataset(
        properties, direction, patient_id, patient_name or patient_id, patient_position, series_description,
        series_number, study_uid or generate_uid(), generate_uid(), frame_of_reference_uid or generate_uid(),
    )
    stored = hu_to_stored(hu)
    origin = np.asarray(properties.origin, dtype=float)
    slice_step = direction[:, 2] * float(properties.spacing[2])
    names = [f"CT_{index + 1:04d}.dcm" for index in range(stored.shape[0])]
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        for index, name in enumerate(names):
            position = origin + slice_step * index
            _write_slice(_slice_dataset(shared, stored[index], index, position, normal), temporary / name)
        _move_into_place(temporary, folder, overwrite)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return [folder / name for name in names]
