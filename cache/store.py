"""Zarr v3 latent cache: one store per data set, one group per producer, atomic cases.

Layout on disk (a zarr v3 ``LocalStore`` directory tree; no consolidated metadata)::

    <store>/zarr.json                        root, attrs {"latent_sct_cache": {...}}
    <store>/producers/<key>/zarr.json        attrs {"producer": record, "latent_stats": ...}
    <store>/producers/<key>/cases/<pid>/     complete cases only (attrs status "complete")
        mr_mu, ct_mu        (C, d, h, w)  float16 | float32  posterior means
        mask_latent         (d, h, w)     uint8              mask at latent resolution
        mr_pixels, ct_pixels (D, H, W)    float16 | float32  normalised canonical grid
        mask_pixels         (D, H, W)     uint8              (D, H, W) = f * (d, h, w)
    <store>/producers/<key>/staging/<pid>.<procid>.<uuid>.<host>/   writes in flight, deletions
    <store>/producers/<key>/trash/<pid>.<procid>.<uuid>.<host>/     complete old case while
                                                                    it is being replaced

The pixel-to-latent factor ``f`` (4 for MAISI) is fixed per producer by the first case
that has pixel volumes (producer attribute ``latent_downsample``) and enforced after that.
A case is written into ``staging/`` and then moved into ``cases/`` with one ``rename``,
so readers see either the whole case or nothing. Replacing a case swaps the two
directories atomically (Linux ``renameat2(RENAME_EXCHANGE)``), or, where that is not
available, moves the old case to ``trash/`` first; leftovers of dead writers are removed,
and a moved-away old case restored, when the store is next opened for writing.
Arrays are one chunk each (one read per sample), Blosc zstd + byte shuffle, plus a
CRC32C so that a flipped bit fails loudly instead of decoding to wrong numbers.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from cache.chunk_read import array_layout, read_chunk
from cache.producer import canonical_value, is_sha256, key_of_record, sha256_file
from latent.errors import InputError

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
    present = list_producers(path)
    listed = ", ".join(present) or "none"
    if not Path(path).exists():
        raise ProducerNotFoundError(f"{path}: cache not found")
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


class LatentCache:
    """Latent cache of one producer inside a zarr v3 store.

    Args:
        path: store directory (local file system; created in mode ``"a"``).
        producer: a producer record (from :func:`cache.producer.producer_record`) or a
            producer key. A record creates its group in mode ``"a"``; a key must exist.
        mode: ``"a"`` read/write, ``"r"`` read only.
        float_dtype: storage dtype of latents and pixel volumes, ``"float16"`` or
            ``"float32"``. Reads always return float32.
    """

    def __init__(self, path: str | Path, producer: dict | str, *, mode: str = "a",
                 float_dtype: str = "float16") -> None:
        if mode not in ("a", "r"):
            raise ValueError(f"mode must be 'a' or 'r', got {mode!r}")
        if float_dtype not in ("float16", "float32"):
            raise ValueError(f"float_dtype must be 'float16' or 'float32', got {float_dtype!r}")
        if "://" in str(path):
            raise CacheError(f"{path}: the latent cache needs a local directory (atomic rename)")
        self.path = Path(path)
        self.mode = mode
        # Parsed array metadata per (pid, write_id, key): a published case is never edited in
        # place (a rewrite gets a new write_id), so an entry stays valid for its write_id.
        self._layouts: dict[tuple[str, str, str], tuple | None] = {}
        self.float_dtype = np.dtype(float_dtype)
        if isinstance(producer, str):
            self.key = producer
            self.record = self._stored_record()  # before _open_root: never create a store here
            self._open_root()
        elif isinstance(producer, dict):
            self._open_root()
            self.key = key_of_record(producer)
            if producer.get("producer_key", self.key) != self.key:
                raise CacheError(
                    f"producer record says key {producer['producer_key']!r} but its content "
                    f"hashes to {self.key!r}: the record was edited"
                )
            self.record = self._ensure_producer_group(producer)
        else:
            raise TypeError(f"producer must be a record dict or a key, got {type(producer).__name__}")
        if self.writable:
            self.clean_stale()

    @classmethod
    def open(cls, path: str | Path, producer: dict | str, mode: str = "r", **kwargs) -> LatentCache:
        """Open an existing producer group (read only by default)."""
        return cls(path, producer, mode=mode, **kwargs)

    @property
    def writable(self) -> bool:
        return self.mode == "a"

    @property
    def group_dir(self) -> Path:
        return self.path / "producers" / self.key

    @property
    def downsample(self) -> int | None:
        """Pixel-to-latent factor per axis (4 for MAISI); None until a case has pixels."""
        return (_node_attrs(self.group_dir) or {}).get("latent_downsample")

    def _update_producer_attrs(self, **values: Any) -> None:
        # A fresh handle: zarr rewrites zarr.json from the handle's cached attributes, so a
        # long-lived one would drop attributes another process wrote since.
        zarr.open_group(self.group_dir, mode="a", use_consolidated=False).attrs.update(values)

    # ------------------------------------------------------------------ opening

    def _open_root(self) -> None:
        root_meta = self.path / "zarr.json"
        if self.mode == "r" and not root_meta.is_file():
            raise CacheError(f"{self.path}: no latent cache store here (no zarr.json)")
        if not root_meta.is_file() and self.path.is_dir() and any(self.path.iterdir()):
            raise CacheError(f"{self.path}: directory is not empty and not a zarr store")
        root = zarr.open_group(self.path, mode=self.mode, use_consolidated=False)
        if _STORE_TAG not in root.attrs:
            if root.attrs.asdict() or not self.writable:
                raise CacheError(f"{self.path}: zarr store is not a latent cache")
            root.attrs.update({_STORE_TAG: {"layout": "producers/<key>/cases/<pid>"}})

    def _stored_record(self) -> dict:
        attrs = _node_attrs(self.group_dir)
        if attrs is None or "producer" not in attrs:
            existing = list_producers(self.path)
            listing = "; ".join(
                f"{key} (vae {rec['vae_weights_sha256'][:12]}, grid {rec['grid']})"
                for key, rec in existing.items()
            ) or "none"
            raise ProducerNotFoundError(
                f"{self.path}: no latents for producer {self.key!r}; producers present: {listing}"
            )
        return attrs["producer"]

    def _ensure_producer_group(self, record: dict) -> dict:
        record = canonical_value({**record, "producer_key": self.key}, "producer", for_key=False)
        if (self.group_dir / "zarr.json").is_file():
            stored = self._stored_record()
            if key_of_record(stored) != self.key:
                raise CacheError(f"{self.group_dir}: stored producer record does not hash to its key")
            return stored
        if not self.writable:
            self._stored_record()  # raises ProducerNotFoundError with the listing
        group = zarr.open_group(self.path, mode="a", use_consolidated=False).require_group(
            f"producers/{self.key}")
        group.attrs.update({"producer": record})
        for sub in ("cases", "staging", "trash"):
            group.require_group(sub)
        return record

    def clean_stale(self) -> list[str]:
        """Remove leftovers of dead writers; restore a case a dead writer had moved aside.

        Returns:
            Names of the staging/trash entries removed or restored.
        """
        self._require_writable()
        handled = []
        for sub in ("trash", "staging"):
            for entry in _entries(self.group_dir / sub):
                if not _is_stale(entry):
                    continue
                pid = entry.name.split(".", 1)[0]
                target = self.group_dir / "cases" / pid
                if sub == "trash" and not target.exists():
                    os.rename(entry, target)  # the replacement never landed: keep the old case
                else:
                    shutil.rmtree(entry, ignore_errors=True)
                handled.append(f"{sub}/{entry.name}")
        return handled

    # ------------------------------------------------------------------ writing

    def write_case(self, pid: str, arrays: dict[str, np.ndarray], attrs: dict, *,
                   overwrite: bool = False) -> None:
        """Write one case atomically: it is visible only once every array is on disk.

        Args:
            pid: case id (letters, digits, ``_`` and ``-``).
            arrays: ``mr_mu`` (required) and any of ``ct_mu``, ``mask_latent``,
                ``mr_pixels``, ``ct_pixels``, ``mask_pixels`` (shapes in the module doc).
            attrs: ``region`` (required), ``centre``, ``geometry`` (dict),
                ``source_sha256`` ({name: hex digest}) and any other JSON values.
            overwrite: replace an existing case (atomically) instead of raising.

        Raises:
            CaseExistsError: the case exists and ``overwrite`` is False.
            ValueError: unknown keys, bad shapes, non-finite values, masks not 0/1.
        """
        self._require_writable()
        _check_pid(pid)
        prepared = self._prepare_arrays(arrays)
        case_attrs = _prepare_attrs(attrs)
        if not overwrite and self.has_case(pid, need=()):
            raise CaseExistsError(f"case {pid} exists in producer {self.key}; pass overwrite=True")
        factor = _pixel_factor({key: data.shape for key, data in prepared.items()})
        if factor is not None and self.downsample is None:  # before any case can be visible
            self._update_producer_attrs(latent_downsample=factor)
        staging = self.group_dir / "staging" / _leftover_name(pid)
        try:
            group = zarr.open_group(staging, mode="w-", use_consolidated=False,
                                    attributes={**case_attrs, "status": "writing"})
            for name, data in prepared.items():
                self._write_array(group, name, data)
            group.attrs.update({"status": "complete"})
            self._publish(pid, staging, overwrite)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _write_array(self, group: zarr.Group, name: str, data: np.ndarray) -> None:
        dims = ("c", "z", "y", "x")[-data.ndim:]
        array = group.create_array(
            name, shape=data.shape, chunks=data.shape, dtype=data.dtype, compressors=CODECS,
            fill_value=0, dimension_names=dims,
            # An all-zero mask must still get its chunk file: a missing chunk reads as
            # fill value without error, so verify() treats it as damage.
            config={"write_empty_chunks": True},
        )
        array[...] = data

    def _publish(self, pid: str, staging: Path, overwrite: bool) -> None:
        target = self.group_dir / "cases" / pid
        try:
            os.rename(staging, target)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if not overwrite:
            raise CaseExistsError(f"case {pid} was written concurrently in producer {self.key}")
        if _exchange_dirs(staging, target):  # old case now sits at `staging`
            shutil.rmtree(staging, ignore_errors=True)
            return
        old = self.group_dir / "trash" / _leftover_name(pid)
        os.rename(target, old)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(old, target)  # put the old case back; clean_stale does it after a kill
            raise
        shutil.rmtree(old, ignore_errors=True)

    def delete_case(self, pid: str) -> None:
        """Remove a case atomically (it disappears with one rename)."""
        self._require_writable()
        self.case_attrs(pid)
        # staging/, not trash/: a deletion killed half-way must never be restored
        doomed = self.group_dir / "staging" / _leftover_name(pid)
        os.rename(self.group_dir / "cases" / pid, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def _prepare_arrays(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        unknown = sorted(set(arrays) - set(ARRAY_KEYS))
        if unknown:
            raise ValueError(f"unknown array keys {unknown}; allowed: {list(ARRAY_KEYS)}")
        missing = [key for key in REQUIRED_KEYS if key not in arrays]
        if missing:
            raise ValueError(f"arrays lack required {missing}")
        out = {}
        for key in ARRAY_KEYS:
            if key not in arrays:
                continue
            data = np.asarray(arrays[key])
            if key in MASK_KEYS:
                if np.any((data != 0) & (data != 1)):
                    raise ValueError(f"{key} must hold only 0 and 1")
                out[key] = np.ascontiguousarray(data, dtype=np.uint8)
                continue
            if not np.all(np.isfinite(data)):
                raise ValueError(f"{key} holds NaN or inf")
            limit = np.finfo(self.float_dtype).max
            if data.size and np.abs(data).max() > limit:
                raise ValueError(f"{key} exceeds the {self.float_dtype} range (|x| <= {limit})")
            out[key] = np.ascontiguousarray(data, dtype=self.float_dtype)
        problems = shape_problems({k: v.shape for k, v in out.items()}, self._latent_channels(),
                                  self.downsample)
        if problems:
            raise ValueError("; ".join(problems))
        return out

    def _latent_channels(self) -> int | None:
        return self.record.get("vae_config", {}).get("latent_channels")

    # ------------------------------------------------------------------ reading

    def _case_dir(self, pid: str) -> Path:
        return self.group_dir / "cases" / pid

    def case_attrs(self, pid: str) -> dict:
        """Attributes of a complete case (region, centre, geometry, source_sha256, ...)."""
        attrs = _node_attrs(self._case_dir(pid)) if _PID_RE.match(pid) else None
        if attrs is None or attrs.get("status") != "complete":
            raise CaseNotFoundError(f"no complete case {pid!r} in producer {self.key} of {self.path}")
        return attrs

    def array_keys(self, pid: str) -> list[str]:
        """Array keys stored for a case, in :data:`ARRAY_KEYS` order."""
        case_dir = self._case_dir(pid)
        return [key for key in ARRAY_KEYS if (case_dir / key / "zarr.json").is_file()]

    def has_case(self, pid: str, need: Iterable[str] = REQUIRED_KEYS) -> bool:
        """True when a complete case exists and holds every array in ``need``."""
        try:
            self.case_attrs(pid)
        except CaseNotFoundError:
            return False
        return set(need) <= set(self.array_keys(pid))

    def case_ids(self, region: str | None = None) -> list[str]:
        """Sorted ids of the complete cases (of one region when given)."""
        out = []
        for entry in _entries(self.group_dir / "cases"):
            attrs = _node_attrs(entry)
            if attrs is None or attrs.get("status") != "complete":
                continue
            if region is None or attrs.get("region") == region:
                out.append(entry.name)
        return out

    def source_hashes(self, pid: str) -> dict[str, str]:
        """``{name: sha256}`` of the source files the case was made from."""
        return dict(self.case_attrs(pid).get("source_sha256", {}))

    def read_case(self, pid: str, keys: Iterable[str] | None = None, *,
                  as_float32: bool = True) -> dict[str, np.ndarray]:
        """Read arrays of one case (all it holds when ``keys`` is None).

        Float arrays come back as float32 (as stored when ``as_float32`` is False), masks as
        uint8. A read that overlaps a replacement of the case is retried, so the arrays
        returned always belong to one write.

        Raises:
            CaseNotFoundError, or KeyError naming the arrays the case does hold.
        """
        keys = None if keys is None else list(keys)
        case_dir = str(self._case_dir(pid))
        for _ in range(_READ_ATTEMPTS):
            write_id = self.case_attrs(pid)["write_id"]
            wanted = self.array_keys(pid) if keys is None else keys
            try:
                out = {key: self._read_array(pid, write_id, os.path.join(case_dir, key)) for key in wanted}
            except Exception:
                if self.case_attrs(pid)["write_id"] != write_id:
                    continue  # replaced while we read: read the new version
                present = self.array_keys(pid)
                absent = [key for key in wanted if key not in present]
                if absent:
                    raise KeyError(f"case {pid} has no {absent}; it holds {present}") from None
                raise
            if self.case_attrs(pid)["write_id"] == write_id:
                if as_float32:
                    out = {k: v.astype(np.float32) if v.dtype.kind == "f" else v
                           for k, v in out.items()}
                return out
        raise CacheError(f"case {pid} kept changing during {_READ_ATTEMPTS} reads")

    def _read_array(self, pid: str, write_id: str, array_dir: str) -> np.ndarray:
        """One array of a case: from its chunk file in the cache's layout, else via zarr."""
        index = (pid, write_id, os.path.basename(array_dir))
        if index not in self._layouts:
            if len(self._layouts) > _MAX_LAYOUTS:
                self._layouts.clear()
            self._layouts[index] = array_layout(array_dir)
        layout = self._layouts[index]
        return read_chunk(array_dir, layout) if layout is not None else zarr.open_array(array_dir, mode="r")[...]

    # ------------------------------------------------------------------ statistics

    def update_latent_stats(self, pids: Iterable[str]) -> dict:
        """Per-channel mean/std and scale factor 1/std of ``mr_mu`` and ``ct_mu``.

        Pooled over every latent voxel of the given (training) cases, in float64. A modality
        no given case holds is stored as None. The result is stored in the producer group.
        """
        self._require_writable()
        pids = sorted(set(pids))
        if not pids:
            raise ValueError("update_latent_stats needs at least one case id")
        write_ids = {pid: self.case_attrs(pid)["write_id"] for pid in pids}
        stats: dict[str, Any] = {}
        for key in LATENT_KEYS:
            holders = [pid for pid in pids if key in self.array_keys(pid)]
            blocks = (self.read_case(pid, [key])[key] for pid in holders)
            stats[key] = latent_statistics(blocks) if holders else None
            if stats[key] is not None:
                stats[key]["pids"] = holders
        stats["fingerprint"] = _fingerprint(write_ids)
        stats["computed_at"] = _now()
        self._update_producer_attrs(latent_stats=stats)
        return stats

    def latent_stats(self) -> dict | None:
        """The stored statistics (see :meth:`update_latent_stats`), or None."""
        return (_node_attrs(self.group_dir) or {}).get("latent_stats")

    # ------------------------------------------------------------------ reports

    def size_report(self, pids: Iterable[str] | None = None,
                    keys: Iterable[str] | None = None) -> dict[str, dict]:
        """Stored (compressed chunk) bytes against raw bytes, per array key and ``total``.

        Returns:
            ``{key: {"n_arrays", "stored_bytes", "raw_bytes", "raw_float32_bytes", "ratio",
            "ratio_stored_dtype"}}``: ``raw_bytes`` counts the stored dtype,
            ``raw_float32_bytes`` 4 bytes per value; ``ratio`` is stored / raw float32,
            ``ratio_stored_dtype`` stored / raw bytes (what compression alone achieves).
        """
        keys = list(ARRAY_KEYS if keys is None else keys)
        fields = ("n_arrays", "stored_bytes", "raw_bytes", "raw_float32_bytes")
        rows = {key: dict.fromkeys(fields, 0) for key in [*keys, "total"]}
        for pid in self.case_ids() if pids is None else pids:
            for key in set(keys) & set(self.array_keys(pid)):
                meta = _node_meta(self._case_dir(pid) / key)
                numel = int(np.prod(meta["shape"]))
                sizes = (1, _dir_bytes(self._case_dir(pid) / key / "c"),
                         numel * np.dtype(meta["data_type"]).itemsize, numel * 4)
                for row in (rows[key], rows["total"]):
                    for field, size in zip(fields, sizes):
                        row[field] += size
        for row in rows.values():
            row["ratio"] = row["stored_bytes"] / row["raw_float32_bytes"] if row["n_arrays"] else None
            row["ratio_stored_dtype"] = row["stored_bytes"] / row["raw_bytes"] if row["n_arrays"] else None
        return rows

    def compression_ratio(self, keys: Iterable[str] | None = None,
                          pids: Iterable[str] | None = None, reference: str = "stored") -> float | None:
        """Compressed / raw bytes over the given arrays (None if there are none).

        ``reference="stored"`` compares with the raw bytes of the stored dtype (compression
        alone), ``"float32"`` with 4 bytes per value (float16 storage and compression).
        """
        if reference not in ("stored", "float32"):
            raise ValueError(f"reference must be 'stored' or 'float32', got {reference!r}")
        total = self.size_report(pids, keys)["total"]
        return total["ratio_stored_dtype"] if reference == "stored" else total["ratio"]

    def info(self) -> dict:
        """Summary of the producer group.

        Returns:
            ``{"path", "producer_key", "producer" (record), "cases" (count),
            "cases_per_region", "arrays" ({key: cases holding it}), "sizes" (the ``total``
            row of :meth:`size_report` plus ``per_key`` rows), "latent_downsample",
            "scale_factor" ({"mr_mu", "ct_mu"}: 1/std or None), "latent_stats",
            "writes_in_flight"}``.
        """
        per_region: dict[str, int] = {}
        for pid in self.case_ids():
            region = str(self.case_attrs(pid).get("region"))
            per_region[region] = per_region.get(region, 0) + 1
        rows = self.size_report()
        total = rows.pop("total")
        stats = self.latent_stats() or {}
        return {
            "path": str(self.path),
            "producer_key": self.key,
            "producer": self.record,
            "cases": sum(per_region.values()),
            "cases_per_region": dict(sorted(per_region.items())),
            "arrays": {key: row["n_arrays"] for key, row in rows.items()},
            "sizes": {**total, "per_key": rows},
            "latent_downsample": self.downsample,
            "scale_factor": {key: (stats.get(key) or {}).get("scale_factor") for key in LATENT_KEYS},
            "latent_stats": stats or None,
            "writes_in_flight": len(list(_entries(self.group_dir / "staging"))),
        }

    def verify(self, source_paths: dict[str, dict[str, str | Path]] | None = None) -> list[str]:
        """Check every complete case; return the problems found (empty when all is well).

        Checks: producer record hashes to its key; each case readable, its chunks present,
        values finite, masks 0/1; shapes consistent (latent = pixels / 4, one channel count
        and one grid for all cases); source hashes well formed and, for cases named in
        ``source_paths`` (``{pid: {name: path}}``), equal to the files' current hashes;
        stored latent statistics computed from the current cases.
        """
        problems = []
        if key_of_record(self.record) != self.key:
            problems.append(f"producer record does not hash to key {self.key}")
        shapes = {}
        for pid in self.case_ids():
            attrs = self.case_attrs(pid)
            case_shapes, case_issues = case_problems(self._case_dir(pid), self.array_keys(pid))
            problems += [f"{pid}: {msg}" for msg in case_issues]
            problems += [f"{pid}: {msg}" for msg in shape_problems(
                case_shapes, self._latent_channels(), self.downsample)]
            shapes[pid] = case_shapes
            hashes = attrs.get("source_sha256", {})
            if not isinstance(hashes, dict) or not all(
                    isinstance(k, str) and is_sha256(v) for k, v in hashes.items()):
                problems.append(f"{pid}: malformed source_sha256 {hashes!r}")
        problems += _cross_case_problems(shapes)
        for pid, files in (source_paths or {}).items():
            problems += self._source_problems(pid, files)
        stats = self.latent_stats()
        if stats is not None:
            pids = sorted({p for key in LATENT_KEYS for p in (stats.get(key) or {}).get("pids", [])})
            try:
                current = _fingerprint({pid: self.case_attrs(pid)["write_id"] for pid in pids})
            except CaseNotFoundError:
                current = None
            if current != stats.get("fingerprint"):
                problems.append("latent_stats are stale: their cases were rewritten or removed")
        return problems

    def _source_problems(self, pid: str, files: dict[str, str | Path]) -> list[str]:
        if not self.has_case(pid, need=()):
            return [f"{pid}: source paths given but the case is not in the cache"]
        stored = self.source_hashes(pid)
        problems = []
        for name, path in files.items():
            if name not in stored:
                problems.append(f"{pid}: no stored hash for source {name!r}")
            elif not Path(path).is_file():
                problems.append(f"{pid}: source {name} missing at {path}")
            elif sha256_file(path) != stored[name]:
                problems.append(f"{pid}: source {name} ({path}) changed since it was cached")
        return problems

    def _require_writable(self) -> None:
        if not self.writable:
            raise CacheError(f"{self.path} is open read-only")


# ---------------------------------------------------------------------- helpers


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


def latent_statistics(blocks: Iterable[np.ndarray]) -> dict:
    """Per-channel and overall mean/std of (C, d, h, w) blocks, merged exactly in float64.

    Uses the pairwise (Chan et al.) update, so no block is held longer than it is read.
    """
    count, mean, m2, n_cases = 0, None, None, 0
    for block in blocks:
        values = np.asarray(block, dtype=np.float64).reshape(block.shape[0], -1)
        if mean is None:
            mean, m2 = np.zeros(values.shape[0]), np.zeros(values.shape[0])
        elif values.shape[0] != mean.shape[0]:
            raise ValueError(f"channel counts differ: {values.shape[0]} vs {mean.shape[0]}")
        n, block_mean = values.shape[1], values.mean(axis=1)
        block_m2 = ((values - block_mean[:, None]) ** 2).sum(axis=1)
        delta, total = block_mean - mean, count + n
        mean = mean + delta * n / total
        m2 = m2 + block_m2 + delta**2 * count * n / total
        count, n_cases = total, n_cases + 1
    if mean is None:
        raise ValueError("no latents to compute statistics from")
    std = np.sqrt(m2 / count)
    mean_all = float(mean.mean())
    std_all = float(np.sqrt((m2.sum() + count * ((mean - mean_all) ** 2).sum()) / (count * mean.size)))
    if not np.all(std > 0):
        raise ValueError(f"a latent channel is constant (std {std.tolist()}): cannot standardise")
    return {"mean": mean.tolist(), "std": std.tolist(), "mean_overall": mean_all,
            "std_overall": std_all, "scale_factor": 1.0 / std_all, "n_cases": n_cases,
            "n_voxels_per_channel": count}


def _pixel_factor(shapes: dict[str, tuple]) -> int | None:
    """Pixel-to-latent factor suggested by a case's first pixel volume (None without one)."""
    pixel = next((shapes[key] for key in PIXEL_KEYS if key in shapes), None)
    if pixel is None or "mr_mu" not in shapes or len(pixel) != 3 or len(shapes["mr_mu"]) != 4:
        return None
    return max(1, pixel[0] // max(1, shapes["mr_mu"][1]))


def shape_problems(shapes: dict[str, tuple], latent_channels: int | None = None,
                   downsample: int | None = None) -> list[str]:
    """Shape rules of one case: ``{key: shape}`` -> messages (empty when consistent).

    Pixel volumes must be ``downsample`` times the latent grid on every axis; without a
    known factor the case's own z ratio is used (so the other axes and keys must agree).
    """
    problems = []
    for key, shape in shapes.items():
        want = 4 if key in LATENT_KEYS else 3
        if len(shape) != want:
            problems.append(f"{key} has {len(shape)} axes, expected {want}")
    if problems or "mr_mu" not in shapes:
        return problems
    mr_mu = tuple(shapes["mr_mu"])
    if "ct_mu" in shapes and tuple(shapes["ct_mu"]) != mr_mu:
        problems.append(f"ct_mu shape {tuple(shapes['ct_mu'])} != mr_mu shape {mr_mu}")
    if latent_channels is not None and mr_mu[0] != latent_channels:
        problems.append(f"mr_mu has {mr_mu[0]} channels, the VAE makes {latent_channels}")
    if "mask_latent" in shapes and tuple(shapes["mask_latent"]) != mr_mu[1:]:
        problems.append(f"mask_latent shape {tuple(shapes['mask_latent'])} != latent grid {mr_mu[1:]}")
    factor = downsample or _pixel_factor(shapes)
    if factor is None:
        return problems
    pixel_grid = tuple(factor * n for n in mr_mu[1:])
    for key in PIXEL_KEYS:
        if key in shapes and tuple(shapes[key]) != pixel_grid:
            problems.append(f"{key} shape {tuple(shapes[key])} != {factor} x latent "
                            f"grid {mr_mu[1:]} = {pixel_grid}")
    return problems


def case_problems(case_dir: Path, keys: list[str]) -> tuple[dict[str, tuple], list[str]]:
    """Open and fully read every array of a case directory.

    Returns:
        ``({key: shape}, problems)``: unreadable or corrupt chunks (CRC32C), missing chunk
        files (which zarr would silently read as zeros), wrong dtypes, non-finite values,
        masks other than 0/1, a missing ``mr_mu``.
    """
    shapes, problems = {}, []
    if "mr_mu" not in keys:
        problems.append("mr_mu is missing")
    for key in keys:
        try:
            array = zarr.open_array(case_dir / key, mode="r")
            shapes[key] = tuple(array.shape)
            if array.nchunks_initialized != array.nchunks:
                problems.append(f"{key}: chunk file missing (would read as zeros)")
                continue
            data = array[...]
        except Exception as exc:  # noqa: BLE001 - any failure to decode is the finding
            problems.append(f"{key}: unreadable ({type(exc).__name__}: {exc})")
            continue
        if key in MASK_KEYS:
            if data.dtype != np.uint8 or np.any(data > 1):
                problems.append(f"{key}: expected uint8 0/1, got {data.dtype} max {data.max()}")
        elif data.dtype not in (np.float16, np.float32):
            problems.append(f"{key}: dtype {data.dtype}, expected float16 or float32")
        elif not np.all(np.isfinite(data)):
            problems.append(f"{key}: holds NaN or inf")
    return shapes, problems


def _cross_case_problems(shapes: dict[str, dict[str, tuple]]) -> list[str]:
    """Every case of one producer shares one channel count and one latent grid."""
    problems = []
    for label, pick in (("latent channel count", lambda s: s["mr_mu"][0]),
                        ("latent grid", lambda s: tuple(s["mr_mu"][1:]))):
        groups: dict[Any, list[str]] = {}
        for pid, case_shapes in shapes.items():
            if "mr_mu" in case_shapes:
                groups.setdefault(pick(case_shapes), []).append(pid)
        if len(groups) > 1:
            majority = max(groups, key=lambda value: len(groups[value]))
            for value, pids in groups.items():
                if value != majority:
                    problems += [f"{pid}: {label} {value} differs from the other cases' {majority}"
                                 for pid in pids]
    return problems


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
    return f"{pid}.{os.getpid()}.{uuid.uuid4().hex[:12]}.{_HOST}"


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
