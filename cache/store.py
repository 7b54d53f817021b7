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

import errno
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import zarr

from latent.cache.checks import _pixel_factor, case_problems, latent_statistics, shape_problems
from latent.cache.chunk_read import array_layout, read_chunk
from latent.cache.layout import (  # noqa: F401 - _HOST: the staging names' host part (tests read it here)
    _HOST, _MAX_LAYOUTS, _PID_RE, _READ_ATTEMPTS, _STORE_TAG, ARRAY_KEYS, CODECS, LATENT_KEYS,
    MASK_KEYS, PIXEL_KEYS, REQUIRED_KEYS, STALE_FOREIGN_S, CacheError, CaseExistsError, CaseNotFoundError,
    ProducerNotFoundError, _check_pid, _entries, _exchange_dirs, _is_stale, _leftover_name,
    _node_attrs, _prepare_attrs, list_producers, pick_producer,
)
from latent.cache.producer import canonical_value, key_of_record
from latent.cache.reports import CacheReports

#: Re-exported: what callers import from ``latent.cache.store`` (the class and the layout's names).
__all__ = [
    "ARRAY_KEYS", "CODECS", "LATENT_KEYS", "MASK_KEYS", "PIXEL_KEYS", "REQUIRED_KEYS", "STALE_FOREIGN_S", "CacheError",
    "CaseExistsError", "CaseNotFoundError", "LatentCache", "ProducerNotFoundError", "case_problems",
    "latent_statistics", "list_producers", "pick_producer", "shape_problems",
]















class LatentCache(CacheReports):
    """Latent cache of one producer inside a zarr v3 store.

    Args:
        path: store directory (local file system; created in mode ``"a"``).
        producer: a producer record (from :func:`latent.cache.producer.producer_record`) or a
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


    def _require_writable(self) -> None:
        if not self.writable:
            raise CacheError(f"{self.path} is open read-only")
