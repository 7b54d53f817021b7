"""Write sCT volumes: one entry point for image files and DICOM series, and the prediction folder.

Prediction folder convention (what ``latent evaluate`` reads): ``out_dir/<pid>.mha`` holds the
sCT on the case's native grid (int16 HU) and ``out_dir/<pid>_std.mha`` beside it the optional
per-voxel standard deviation (float32 HU) of sampled predictions. With ``fmt="dicom"`` the sCT
is the series folder ``out_dir/<pid>/`` and the uncertainty map stays a ``.mha`` file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from latent.decode.dicom import write_dicom_series
from latent.core.intensity import FULL_CT_MAX_HU, FULL_CT_MIN_HU
from latent.core.io import WRITE_SUFFIXES, VolumeError, VolumeProperties, write_volume

#: Values of ``fmt`` for :func:`write_prediction`: image suffixes without the dot, or DICOM.
PREDICTION_FORMATS = ("mha", "nii.gz", "nii", "nrrd", "dicom")
STD_SUFFIX = "_std"


def _sct_int16(hu: np.ndarray) -> np.ndarray:
    """HU rounded to int16 within the SynthRAD range."""
    return np.clip(np.rint(np.asarray(hu, dtype=np.float32)), FULL_CT_MIN_HU, FULL_CT_MAX_HU).astype(np.int16)


def _image_suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((suffix for suffix in WRITE_SUFFIXES if name.endswith(suffix)), None)


def write_sct(
    path: str | os.PathLike,
    hu: np.ndarray,
    properties: VolumeProperties,
    format: str | None = None,
    **dicom_options: Any,
) -> Path:
    """Write an sCT (z, y, x) in HU as an image file or a DICOM series, chosen by the path.

    - ``.mha`` / ``.nii.gz`` / ``.nii`` / ``.nrrd``: one compressed file, int16 HU (rounded,
      clipped to [-1024, 3071]), via :func:`latent.core.io.write_volume`.
    - an existing folder, a path ending in a separator, or ``format="dicom"``: a DICOM CT series
      via :func:`latent.decode.dicom.write_dicom_series` (``patient_id`` defaults to the folder name;
      other keyword arguments are passed on).

    Args:
        path: destination.
        hu: sCT (z, y, x) in HU on ``properties``' grid.
        properties: native geometry.
        format: ``"dicom"`` to force a DICOM series; ``None`` = decide from ``path``.
        **dicom_options: ``patient_id``, ``study_uid``, ``frame_of_reference_uid``, ... (DICOM only).

    Returns:
        The written file or series folder.

    Raises:
        VolumeError: a suffix-less path without ``format="dicom"``, an unknown suffix, or an
            sCT with NaN or infinite voxels (nothing is written).
    """
    is_folder = str(path).endswith(("/", os.sep))
    path = Path(path)
    bad = int(np.size(hu) - np.count_nonzero(np.isfinite(hu)))
    if bad:
        # A cast to int16 would turn them silently into 0 HU (docs/models.md, "bf16 on a CPU").
        raise VolumeError(f"{path}: the sCT has {bad} of {np.size(hu)} voxels NaN or infinite; nothing written "
                          "(the model's output is broken: check its training log)")
    if format not in (None, "dicom"):
        raise VolumeError(f"{path}: unknown format {format!r}; use 'dicom' or leave it out to use the suffix")
    if format == "dicom" or is_folder or path.is_dir():
        options = dict(dicom_options)
        patient_id = options.pop("patient_id", None) or path.name
        write_dicom_series(path, hu, properties, patient_id, **options)
        return path
    if dicom_options:
        raise VolumeError(f"{path}: {', '.join(sorted(dicom_options))} only apply to DICOM output")
    if _image_suffix(path) is None:
        raise VolumeError(
            f"{path}: unsupported output; use a suffix ({', '.join(WRITE_SUFFIXES)}) or format='dicom' for a DICOM series folder"
        )
    return write_volume(path, _sct_int16(hu), properties, dtype=np.int16)


def prediction_paths(out_dir: str | os.PathLike, pid: str, fmt: str = "mha") -> tuple[Path, Path]:
    """``(sct_path, std_path)`` of case ``pid`` in a prediction folder (see the module docstring)."""
    if fmt not in PREDICTION_FORMATS:
        raise VolumeError(f"prediction format {fmt!r}: expected one of {', '.join(PREDICTION_FORMATS)}")
    out_dir = Path(out_dir)
    std_suffix = "mha" if fmt == "dicom" else fmt
    sct = out_dir / pid if fmt == "dicom" else out_dir / f"{pid}.{fmt}"
    return sct, out_dir / f"{pid}{STD_SUFFIX}.{std_suffix}"


def write_prediction(
    out_dir: str | os.PathLike,
    pid: str,
    hu: np.ndarray,
    properties: VolumeProperties,
    std: np.ndarray | None = None,
    fmt: str = "mha",
    **dicom_options: Any,
) -> Path:
    """Write one case's sCT (and optional uncertainty map) into a prediction folder.

    Args:
        out_dir: prediction folder (created).
        pid: patient id, e.g. ``"1ABA005"``.
        hu: native-grid sCT (z, y, x) in HU.
        properties: native geometry.
        std: optional native-grid standard deviation map (z, y, x) in HU, written float32.
        fmt: one of :data:`PREDICTION_FORMATS`.
        **dicom_options: passed to the DICOM writer when ``fmt="dicom"`` (``patient_id`` defaults
            to ``pid``); ``overwrite`` defaults to True there, as files are overwritten too.

    Returns:
        Path of the sCT file (or DICOM series folder).
    """
    sct_path, std_path = prediction_paths(out_dir, pid, fmt)
    sct_path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "dicom":
        dicom_options.setdefault("patient_id", pid)
        dicom_options.setdefault("overwrite", True)
        write_sct(sct_path, hu, properties, format="dicom", **dicom_options)
    else:
        write_sct(sct_path, hu, properties, **dicom_options)
    if std is not None:
        write_volume(std_path, np.asarray(std, dtype=np.float32), properties, dtype=np.float32)
    return sct_path
