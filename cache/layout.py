"""Layout of the latent cache on disk: array keys and codecs, errors, producer groups, node
metadata, case ids and attributes, staging names and the atomic directory exchange.

The layout itself is described in :mod:`latent.cache.store` and docs/cache.md.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import socket
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable
from zarr.codecs import BloscCodec, Crc32cCodec

from latent.cache.producer import canonical_value, is_sha256
from latent.core.errors import InputError


LATENT_KEYS = ("mr_mu", "ct_mu")


MASK_KEYS = ("mask_latent", "mask_pixels")


PIXEL_KEYS = ("mr_pixels", "ct_pixels", "mask_pixels")


ARRAY_KEYS = ("mr_mu", "ct_mu", "mask_latent", "mr_pixels", "ct_pixels", "mask_pixels")


REQUIRED_KEYS = ("mr_mu",)


#: Reserved case attributes, set by the cache itself.
_RESERVED_ATTRS = ("status", "write_id", "written_at")


#: Byte shuffle beats bitshuffle on float16 latents (docs/cache.md); CRC32C catches bit rot,
#: which Blosc alone decodes silently into wrong values.
CODECS = (BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"), Crc32cCodec())


#: Leftovers written by another host are only presumed dead after this long.
STALE_FOREIGN_S = 24 * 3600


_STORE_TAG = "latent_sct_cache"


_PID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


_HOST = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "host"


_READ_ATTEMPTS = 3


#: Bound on the memoised array layouts (about 6 per case).
_MAX_LAYOUTS = 100_000


class CacheError(InputError):
    """The store is unusable as asked (wrong producer, missing case, bad input)."""


class ProducerNotFoundError(CacheError, LookupError):
    """The store holds no group for the requested producer key."""


class CaseNotFoundError(CacheError, LookupError):
    """The producer group holds no complete case with that id."""


class CaseExistsError(CacheError, FileExistsError):
    """A complete case exists and ``overwrite`` was not asked for."""


def pick_producer(path: str | Path, producer: str | None, option: str = "--producer") -> tuple[str, dict]:
    """``(key, record)`` of a producer group: ``producer`` itself, or with None / ``"auto"`` the
    store's only one.

    Raises:
        ProducerNotFoundError: no store, an unknown key, or none / several to choose from
            automatically (the message names ``option`` and lists the present keys).
    """
    if not Path(path).exists():
        raise ProducerNotFoundError(f"{path}: cache not found")
    present = list_producers(path)
    listed = ", ".join(present) or "none"
    if producer in (None, "auto"):
        if len(present) != 1:
            raise ProducerNotFoundError(f"{option}: {path} holds {len(present)} producers ({listed}); name one")
        producer = next(iter(present))
    if producer not in present:
        raise ProducerNotFoundError(f"{option}: {producer!r} is not in {path}; present: {listed}")
    return producer, present[producer]


def list_producers(path: str | Path) -> dict[str, dict]:
    """Producer records in the store at ``path``, by key (empty if there is no store)."""
    producers_dir = Path(path) / "producers"
    if not producers_dir.is_dir():
        return {}
    out = {}
    for entry in sorted(producers_dir.iterdir()):
        meta = _node_attrs(entry)
        if meta is not None and "producer" in meta:
            out[entry.name] = meta["producer"]
    return out


def _check_pid(pid: str) -> None:
    if not isinstance(pid, str) or not _PID_RE.match(pid):
        raise ValueError(f"case id {pid!r} must be letters, digits, '_' or '-'")


def _prepare_attrs(attrs: dict) -> dict:
    if not isinstance(attrs, dict) or not isinstance(attrs.get("region"), str):
        raise ValueError("attrs must be a dict with a string 'region'")
    reserved = sorted(set(attrs) & set(_RESERVED_ATTRS))
    if reserved:
        raise ValueError(f"attrs {reserved} are set by the cache")
    out = canonical_value({"centre": None, "geometry": {}, "source_sha256": {}, **attrs}, "attrs",
                          for_key=False)
    bad = {k: v for k, v in out["source_sha256"].items() if not is_sha256(v)} \
        if isinstance(out["source_sha256"], dict) else out["source_sha256"]
    if bad:
        raise ValueError(f"attrs.source_sha256 needs hex SHA-256 digests, got {bad!r}")
    return {**out, "write_id": uuid.uuid4().hex, "written_at": _now()}


def _node_meta(node_dir: Path) -> dict | None:
    # zarr v3 keeps a node's metadata, attributes included, in <node>/zarr.json.
    try:
        with open(node_dir / "zarr.json", encoding="utf-8") as handle:
            return json.load(handle)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def _node_attrs(node_dir: Path) -> dict | None:
    meta = _node_meta(node_dir)
    return None if meta is None else meta.get("attributes", {})


def _entries(directory: Path) -> Iterable[Path]:
    if not directory.is_dir():
        return []
    return sorted(entry for entry in directory.iterdir() if entry.is_dir())


def _dir_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def _leftover_name(pid: str) -> str:
    """A staging / trash name: a short digest of the pid (so a long pid does not overflow the file
    name), the writer's process id, a random part and the host (what :func:`_is_stale` reads)."""
    digest = hashlib.sha256(pid.encode()).hexdigest()[:12]
    return f"{digest}.{os.getpid()}.{uuid.uuid4().hex[:12]}.{_HOST}"


def _is_stale(entry: Path) -> bool:
    """A staging/trash entry whose writer is gone (dead process here, or old elsewhere)."""
    parts = entry.name.split(".", 3)
    if len(parts) != 4 or not parts[1].isdigit():
        return False
    if parts[3] != _HOST:
        return time.time() - entry.stat().st_mtime > STALE_FOREIGN_S
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _exchange_dirs(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2  # from <fcntl.h> and <linux/fs.h>
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


def _fingerprint(write_ids: dict[str, str]) -> str:
    text = json.dumps(sorted(write_ids.items()), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
