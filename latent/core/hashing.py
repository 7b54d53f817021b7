"""File digests: the one SHA-256 helper that weights, sources and cache entries are pinned with."""

from __future__ import annotations

import hashlib
import os

_BLOCK_BYTES = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Lower-case hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()
