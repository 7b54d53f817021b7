"""Case folders that hold one MR twice: a folder linked to another, linked files, or byte-identical copies.

Such folders would count as two patients and could land in train and test at once. The check
costs one ``stat`` per case; when another MR has exactly its size (compressed SynthRAD volumes
almost never do), three 64 KiB samples of the file are compared, and only files whose samples
also agree are hashed whole.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from pathlib import Path
from typing import Mapping

from latent.core.hashing import sha256_file


def _why_linked(first: Path, second: Path) -> str:
    if os.path.realpath(first) == os.path.realpath(second):
        return "one folder is a link to the other"
    return "their mr files are one file (a link)"


_SAMPLE_BYTES = 1 << 16


def _sample_digest(path: Path, size: int) -> str:
    """Digest of three blocks (start, middle, end): files that differ there differ."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for start in (0, max(0, size // 2 - _SAMPLE_BYTES // 2), max(0, size - _SAMPLE_BYTES)):
            handle.seek(start)
            digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def _identical(folders: list[Path], mrs: Mapping[Path, Path], digest_of) -> list[list[Path]]:
    """``folders`` grouped by ``digest_of(mr)`` (unreadable files left out); groups of one dropped."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for folder in folders:
        try:
            groups[digest_of(mrs[folder])].append(folder)
        except OSError:
            continue
    return [group for group in groups.values() if len(group) > 1]


def same_volumes(mrs: Mapping[Path, Path]) -> list[tuple[Path, Path, str]]:
    """Pairs of case folders whose MR files are one file or byte-identical copies.

    Args:
        mrs: case folder -> its MR file, in discovery order.

    Returns:
        ``(first folder, second folder, why)`` per duplicate; the first comes first in ``mrs``.
        Unreadable and empty files are left out (reading them names them later).
    """
    by_identity: dict[tuple[int, int], Path] = {}
    by_size: dict[int, list[Path]] = defaultdict(list)
    pairs: list[tuple[Path, Path, str]] = []
    for folder, mr in mrs.items():
        try:
            status = os.stat(mr)
        except OSError:
            continue
        identity = (status.st_dev, status.st_ino)
        if identity in by_identity:
            pairs.append((by_identity[identity], folder, _why_linked(by_identity[identity], folder)))
            continue
        by_identity[identity] = folder
        if status.st_size > 0:
            by_size[status.st_size].append(folder)
    for size, folders in by_size.items():
        if len(folders) < 2:
            continue
        for alike in _identical(folders, mrs, lambda path, size=size: _sample_digest(path, size)):
            for first, *others in _identical(alike, mrs, sha256_file):
                pairs += [(first, other, "their mr files are identical (same SHA-256)") for other in others]
    return pairs
