"""Verify a volume file before it is read: inputs are verified, not trusted.

SimpleITK reads a corrupted compressed file without complaint and turns a ``nan`` in a
MetaImage header into 0. :func:`verify_volume_file` therefore checks, before the reader runs:

- gzip files (``.nii.gz``, ``.gz``): the whole stream inflates and every member's CRC-32 and
  length trailer match (zlib checks both);
- MetaImage (``.mha``/``.mhd``), from the header text only: origin, spacing and direction are
  finite numbers; the data file (``ElementDataFile``) lies in the header's own folder and
  exists; the voxel count fits in this machine's memory; uncompressed data holds the bytes the
  header asks for, and compressed data inflates completely (zlib's Adler-32 check) to exactly
  dims x components x element size bytes.

The cost is one extra inflate of the file (``benchmarks/bench_integrity.py``; README).
"""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path

from latent.core.errors import BadFileError, BadGeometryError

#: Bytes of compressed input fed to zlib at a time.
CHUNK_BYTES = 1 << 20
#: A MetaImage header is text before the data; more than this is not a header.
MAX_HEADER_BYTES = 1 << 16
#: MetaIO element types -> bytes per component (MET_LONG is 4 bytes in MetaIO).
ELEMENT_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}
#: Header keys holding geometry: origin, spacing, direction.
GEOMETRY_KEYS = ("Offset", "Origin", "Position", "ElementSpacing", "TransformMatrix", "Rotation", "Orientation")


class VolumeError(BadFileError, ValueError):
    """A volume file is missing, unreadable or not a usable 3D scalar image."""


class VolumeGeometryError(BadGeometryError, VolumeError):
    """A volume's origin, spacing or direction is not usable (NaN/inf, ...)."""


def verify_volume_file(path: Path) -> None:
    """Check a volume file's compressed stream and (MetaImage) header before it is read.

    Raises:
        VolumeError: corrupted or truncated compressed data, a data file outside the header's
            folder or missing, an impossible voxel count.
        VolumeGeometryError: non-finite origin, spacing or direction in a MetaImage header.
    """
    name = path.name.lower()
    if name.endswith(".gz"):
        _check_gzip(path)
    elif name.endswith((".mha", ".mhd")):
        _check_metaimage(path)


def _check_gzip(path: Path) -> None:
    """Inflate every gzip member to the end; zlib checks each CRC-32 and length trailer."""
    inflater = zlib.decompressobj(wbits=31)
    in_member = False
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            while chunk:
                in_member = True
                try:
                    inflater.decompress(chunk)
                except zlib.error as error:
                    raise VolumeError(f"{path}: corrupted compressed data ({_gzip_reason(error)})") from None
                if not inflater.eof:
                    break
                chunk = inflater.unused_data.lstrip(b"\0")  # a further member; some writers pad with zeros
                inflater, in_member = zlib.decompressobj(wbits=31), False
    if in_member:
        raise VolumeError(f"{path}: cannot be read as an image: truncated (the gzip stream ends early)")


def _gzip_reason(error: zlib.error) -> str:
    """zlib's own words in plain terms: a trailer mismatch is a failed CRC (or length) check."""
    text = str(error)
    if "incorrect data check" in text:
        return "gzip CRC check failed"
    if "incorrect length check" in text:
        return "gzip length check failed"
    return "the gzip stream is damaged"


def read_metaimage_header(path: Path) -> tuple[dict[str, str], int]:
    """The ``key -> value`` lines of a MetaImage header and the byte offset where its data starts.

    Returns ``({}, 0)`` when the file does not start like a MetaImage header (the reader says why).
    """
    with open(path, "rb") as handle:
        head = handle.read(MAX_HEADER_BYTES)
    fields: dict[str, str] = {}
    offset = 0
    for raw in head.split(b"\n"):
        offset += len(raw) + 1
        line = raw.decode("latin-1").strip()
        key, sep, value = line.partition("=")
        if not sep:
            return {}, 0
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            return fields, offset
        if offset >= len(head):
            break
    return {}, 0


def _check_metaimage(path: Path) -> None:
    fields, data_offset = read_metaimage_header(path)
    if not fields:
        return
    _check_finite_geometry(path, fields)
    expected = _expected_bytes(path, fields)
    data_path, data_offset = _data_file(path, fields["ElementDataFile"], data_offset)
    if data_path is None or expected is None:
        return
    available = data_path.stat().st_size - data_offset
    if fields.get("CompressedData", "False").lower() == "true":
        size = fields.get("CompressedDataSize", "")
        limit = int(size) if size.isdigit() and int(size) > 0 else available
        _check_zlib(path, data_path, data_offset, min(limit, available), expected)
    elif available < expected:
        raise VolumeError(f"{path}: cannot be read as an image: truncated (the header asks for {expected} bytes of "
                          f"data; {data_path.name} holds {max(available, 0)})")


def _check_finite_geometry(path: Path, fields: dict[str, str]) -> None:
    for key in GEOMETRY_KEYS:
        if key not in fields:
            continue
        try:
            values = [float(token) for token in fields[key].split()]
        except ValueError:
            continue  # not numbers: the reader refuses the header itself
        if not all(math.isfinite(value) for value in values):
            raise VolumeGeometryError(f"{path}: {key} = {fields[key]}: non-finite geometry; origin, spacing and "
                                      "direction must be finite numbers")


def _expected_bytes(path: Path, fields: dict[str, str]) -> int | None:
    """Bytes of voxel data the header asks for (None when the header does not say)."""
    try:
        dims = [int(token) for token in fields.get("DimSize", "").split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
    except ValueError:
        return None
    element = ELEMENT_BYTES.get(fields.get("ElementType", ""))
    if not dims or element is None or min(dims + [channels]) < 1:
        return None
    voxels = math.prod(dims)
    expected = voxels * channels * element
    memory = _physical_memory()
    if memory and expected > memory:
        raise VolumeError(f"{path}: header asks for {voxels} voxels (DimSize = {fields['DimSize']}, "
                          f"{expected / 1e9:,.1f} GB), more than this machine's {memory / 1e9:,.1f} GB of memory; "
                          "is the header damaged?")
    return expected


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _data_file(path: Path, reference: str, data_offset: int) -> tuple[Path | None, int]:
    """The file holding the voxel data and where they start; None for a list or a pattern of files
    (each name is still checked to lie in the header's folder)."""
    if reference == "LOCAL":
        return path, data_offset
    folder = path.parent
    names = [reference.split()[0]] if reference.split() else []
    for name in names:
        target = Path(name)
        inside = not target.is_absolute() and os.path.normpath(folder / target).startswith(
            os.path.normpath(folder) + os.sep)
        if not inside or ".." in target.parts:
            raise VolumeError(f"{path}: ElementDataFile {reference} lies outside {folder}; a header may only name a "
                              "data file in its own folder")
    if reference.startswith("LIST") or "%" in reference or len(reference.split()) > 1:
        return None, 0
    data_path = folder / reference
    if not data_path.is_file():
        raise VolumeError(f"{path}: its data file {data_path} is missing (ElementDataFile = {reference})")
    return data_path, 0


def _check_zlib(path: Path, data_path: Path, offset: int, length: int, expected: int) -> None:
    """Inflate ``length`` bytes at ``offset`` of ``data_path``: a complete zlib stream of ``expected`` bytes."""
    inflater = zlib.decompressobj()
    produced = 0
    with open(data_path, "rb") as handle:
        handle.seek(offset)
        remaining = length
        while remaining > 0 and not inflater.eof:
            chunk = handle.read(min(CHUNK_BYTES, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            try:
                produced += len(inflater.decompress(chunk))
            except zlib.error:
                raise VolumeError(f"{path}: corrupted compressed data (the zlib stream of the voxel data is "
                                  "damaged)") from None
            if produced > expected:
                break
    if produced > expected:
        raise VolumeError(f"{path}: corrupted compressed data (inflates to more than the {expected} bytes the "
                          "header asks for)")
    if not inflater.eof:
        raise VolumeError(f"{path}: cannot be read as an image: truncated (the compressed data ends after "
                          f"{produced} of {expected} bytes)")
    if produced != expected:
        raise VolumeError(f"{path}: corrupted compressed data (inflates to {produced} bytes; the header asks for "
                          f"{expected})")
