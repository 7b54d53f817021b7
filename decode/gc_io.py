"""Grand Challenge algorithm container layout (SynthRAD2025 Task 1).

Layout, as used by the SynthRAD2025 algorithm template (github.com/SynthRAD2025/algorithm-template,
``base_algorithm.py``: ``DEFAULT_IMAGE_PATH = /input/images/<task type "mri">``,
``DEFAULT_MASK_PATH = /input/images/body``, ``DEFAULT_REGION_PATH = /input/region.json``,
``DEFAULT_OUTPUT_PATH = /output/images/synthetic-ct``; output written as
``output_path / <input image file name>``; also seen in participants' containers built on it):

- ``<input>/images/mri/<name>.mha``: the MR (Grand Challenge names files by a UUID);
- ``<input>/images/body/<name>.mha``: the body mask, on the MR's grid;
- ``<input>/region.json``: a JSON string naming the anatomy, e.g. ``"Head and Neck"``,
  ``"Thorax"`` or ``"Abdomen"`` (short codes ``"HN"`` / ``"TH"`` / ``"AB"`` are accepted too,
  as is an object with a ``"region"`` or ``"organ"`` key);
- ``<output>/images/synthetic-ct/<same file name as the MR>``: the sCT, a ``.mha`` file (GC's
  inputs are ``.mha``, so the name is the input's own; other local inputs get ``.mha`` too).

Pairing: the template zips the sorted MR files with the sorted mask files, because the
platform's UUID names of the two inputs need not match. :func:`read_gc_inputs` does the same:
masks are paired with MRs by sorted file name (identical names pair identically either way).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from latent.core.errors import BadFileError
from latent.core.io import is_volume_path, strip_volume_suffix

MRI_FOLDER = Path("images") / "mri"
BODY_FOLDER = Path("images") / "body"
REGION_FILE = "region.json"
OUTPUT_FOLDER = Path("images") / "synthetic-ct"
OUTPUT_SUFFIX = ".mha"
REGIONS = ("AB", "HN", "TH")
#: Region spellings (lower case, letters only) -> SynthRAD2025 region code.
REGION_ALIASES = {
    "hn": "HN", "headandneck": "HN", "headneck": "HN",
    "th": "TH", "thorax": "TH", "thoracic": "TH", "chest": "TH",
    "ab": "AB", "abdomen": "AB", "abdominal": "AB",
}


class GCInputError(BadFileError, ValueError):
    """The Grand Challenge input folder does not have the expected layout."""


@dataclass(frozen=True)
class GCInput:
    """One case of a Grand Challenge job: MR and body-mask files and the anatomical region."""

    mri_path: Path
    mask_path: Path
    region: str


def parse_region(value: object, source: str = REGION_FILE) -> str:
    """Region code (AB, HN or TH) from a region.json value.

    Args:
        value: the decoded JSON: a string (``"Head and Neck"``, ``"Thorax"``, ``"Abdomen"``,
            ``"HN"``, ...) or an object holding one under ``"region"`` or ``"organ"``.
        source: named in error messages.

    Raises:
        GCInputError: naming the value and the accepted spellings.
    """
    if isinstance(value, dict):
        key = next((k for k in ("region", "organ") if k in value), None)
        if key is None:
            raise GCInputError(f"{source}: JSON object without a 'region' key: {value!r}")
        value = value[key]
    if not isinstance(value, str):
        raise GCInputError(f"{source}: expected a JSON string naming the region, got {value!r}")
    code = REGION_ALIASES.get(re.sub(r"[^a-z]", "", value.lower()))
    if code is None:
        raise GCInputError(
            f"{source}: unknown region {value!r}; expected 'Head and Neck', 'Thorax', 'Abdomen' or {'/'.join(REGIONS)}"
        )
    return code


def _volume_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise GCInputError(f"{folder}: folder not found (expected the Grand Challenge input layout)")
    return sorted(p for p in folder.iterdir() if p.is_file() and is_volume_path(p))


def read_gc_inputs(input_dir: str | os.PathLike) -> list[GCInput]:
    """Find the cases of a Grand Challenge input folder.

    Args:
        input_dir: the container's input folder (``/input`` on the platform).

    Returns:
        One :class:`GCInput` per MR file, in sorted file-name order; masks paired by sorted
        order (see the module docstring).

    Raises:
        GCInputError: missing folders or region.json, no MR, or MR and mask counts differ.
    """
    input_dir = Path(input_dir)
    mri_files = _volume_files(input_dir / MRI_FOLDER)
    mask_files = _volume_files(input_dir / BODY_FOLDER)
    if not mri_files:
        raise GCInputError(f"{input_dir / MRI_FOLDER}: no MR volume found")
    if len(mri_files) != len(mask_files):
        raise GCInputError(
            f"{input_dir}: {len(mri_files)} MR volumes in {MRI_FOLDER} but {len(mask_files)} masks in {BODY_FOLDER}"
        )
    region_path = input_dir / REGION_FILE
    if not region_path.is_file():
        raise GCInputError(f"{region_path}: file not found")
    try:
        region = parse_region(json.loads(region_path.read_text(encoding="utf-8")), str(region_path))
    except json.JSONDecodeError as error:
        raise GCInputError(f"{region_path}: not valid JSON ({error.msg})") from None
    return [GCInput(mri, mask, region) for mri, mask in zip(mri_files, mask_files)]


def gc_output_path(output_dir: str | os.PathLike, input_mri_path: str | os.PathLike) -> Path:
    """``output_dir/images/synthetic-ct/<input MR file name>`` with a ``.mha`` suffix.

    The template writes the sCT under the input MR's file name; GC inputs are ``.mha``, so that
    name is kept unchanged (a local ``x.nii.gz`` input gives ``x.mha``).
    """
    stem = strip_volume_suffix(Path(input_mri_path).name)
    return Path(output_dir) / OUTPUT_FOLDER / f"{stem}{OUTPUT_SUFFIX}"
