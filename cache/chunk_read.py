"""Fast read of the cache's own single-chunk zarr v3 arrays, straight from the chunk file.

Every array the cache writes is one chunk (``chunks == shape``) encoded as
``bytes(little) -> blosc -> crc32c`` (:data:`latent.cache.store.CODECS`). For that exact layout a read
is: parse ``zarr.json``, read ``c/0/.../0``, check the CRC32C, Blosc-decode. Going through
``zarr.open_array(...)[...]`` costs several times more per array (async machinery, store
abstraction), which dominated reading the small latent arrays. Anything else (another codec
chain, several chunks, a big-endian array) returns ``None`` and the caller reads it with zarr,
so the fast path can only ever be an optimisation, never a second format.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import google_crc32c
import numpy as np
from numcodecs import Blosc

from latent.core.errors import BadFileError

_CRC_BYTES = 4
_BLOSC_HEADER = 16
_BLOSC = Blosc()  # decoding reads the codec settings from the Blosc frame header


class ChunkError(BadFileError, ValueError):
    """A chunk file is missing or damaged (checksum mismatch, wrong decoded size)."""


def _fast_layout(meta: dict) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) when ``meta`` describes a single-chunk bytes/blosc/crc32c array."""
    try:
        shape = tuple(int(s) for s in meta["shape"])
        grid = meta["chunk_grid"]
        codecs = [codec["name"] for codec in meta["codecs"]]
        endian = meta["codecs"][0].get("configuration", {}).get("endian", "little")
        encoding = meta["chunk_key_encoding"]
        dtype = np.dtype(meta["data_type"])
    except (KeyError, TypeError, IndexError, ValueError):
        return None
    if (meta.get("node_type") != "array" or meta.get("zarr_format") != 3
            or grid.get("name") != "regular"
            or tuple(grid.get("configuration", {}).get("chunk_shape", ())) != shape
            or codecs != ["bytes", "blosc", "crc32c"] or endian != "little"
            or encoding.get("name") != "default"
            or encoding.get("configuration", {}).get("separator", "/") != "/"
            or meta.get("storage_transformers") or dtype.kind not in "fiub" or not shape):
        return None
    return shape, dtype.newbyteorder("<")


def array_layout(array_dir: str | Path) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) of the array in ``array_dir`` when in the fast-path layout, else ``None``."""
    with open(os.path.join(os.fspath(array_dir), "zarr.json"), encoding="utf-8") as handle:
        return _fast_layout(json.load(handle))


def read_chunk(array_dir: str | Path, layout: tuple[tuple[int, ...], np.dtype]) -> np.ndarray:
    """Decode the single chunk of an array whose :func:`array_layout` is ``layout``.

    Raises:
        ChunkError: the chunk file is missing, fails its CRC32C or decodes to the wrong number
            of bytes (message names the file).
    """
    shape, dtype = layout
    chunk = os.path.join(os.fspath(array_dir), "c", *(["0"] * len(shape)))
    try:
        with open(chunk, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise ChunkError(f"{chunk}: chunk file missing") from None
    payload, stored = data[:-_CRC_BYTES], data[-_CRC_BYTES:]
    if len(data) <= _CRC_BYTES or np.uint32(google_crc32c.value(payload)).tobytes() != stored:
        raise ChunkError(f"{chunk}: CRC32C checksum mismatch (damaged chunk)")
    out = np.empty(shape, dtype=dtype)
    # Blosc1 frame header: bytes 4-8 hold the decoded size, 12-16 the frame size (little endian).
    size = int.from_bytes(payload[4:8], "little") if len(payload) >= _BLOSC_HEADER else -1
    if size != out.nbytes or int.from_bytes(payload[12:16], "little") != len(payload):
        raise ChunkError(f"{chunk}: Blosc frame holds {size} bytes, expected {out.nbytes}")
    _BLOSC.decode(payload, out=out)
    return out


def read_single_chunk(array_dir: str | Path) -> np.ndarray | None:
    """The array stored in ``array_dir``, or ``None`` when it is not in the fast-path layout.

    Raises:
        ChunkError: see :func:`read_chunk`.
    """
    layout = array_layout(array_dir)
    return None if layout is None else read_chunk(array_dir, layout)
