"""What a latent cache can say about itself: latent statistics, sizes, a summary and a full
verification. A mixin of :class:`latent.cache.store.LatentCache` (it uses the store's own readers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from latent.cache.checks import _cross_case_problems, case_problems, latent_statistics, shape_problems
from latent.cache.layout import ARRAY_KEYS, LATENT_KEYS, CaseNotFoundError, _dir_bytes, _entries, _fingerprint, _node_attrs, _node_meta, _now
from latent.cache.producer import is_sha256, key_of_record, sha256_file


class CacheReports:
    """Statistics, size and verification methods of :class:`latent.cache.store.LatentCache`."""

    # ------------------------------------------------------------------ statistics

    def update_latent_stats(self, pids: Iterable[str], split: str | None = None) -> dict:
        """Per-channel mean/std and scale factor 1/std of ``mr_mu`` and ``ct_mu``.

        Pooled over every latent voxel of the given (training) cases, in float64. A modality
        no given case holds is stored as None. The result is stored in the producer group with
        ``split`` (where the training cases came from); statistics it replaces are appended to
        the group's ``latent_stats_history`` (``{"replaced_at", "latent_stats"}``), so the values
        earlier runs were trained with stay on record (a run's ``producer.json`` holds the
        ``computed_at`` of the statistics it used).
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
        stats["split"] = split
        stats["computed_at"] = _now()
        changes: dict[str, Any] = {"latent_stats": stats}
        old = self.latent_stats()
        if old is not None:
            history = list((_node_attrs(self.group_dir) or {}).get("latent_stats_history", []))
            changes["latent_stats_history"] = [*history, {"replaced_at": stats["computed_at"], "latent_stats": old}]
        self._update_producer_attrs(**changes)
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
        problems += self._unreadable_cases()
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

    def _unreadable_cases(self) -> list[str]:
        """Case folders whose metadata cannot be read: invisible to every reader, so named here."""
        listed, problems = set(self.case_ids()), []
        for entry in _entries(self.group_dir / "cases"):
            if entry.name in listed:
                continue
            meta = entry / "zarr.json"
            attrs = _node_attrs(entry) if meta.is_file() else None
            reason = ("missing" if not meta.is_file() else "not valid JSON (truncated?)" if attrs is None
                      else f"status {attrs.get('status')!r}, not 'complete'")
            problems.append(f"{entry.name}: case metadata unreadable: {meta} is {reason}; "
                            "the case is skipped by every reader (encode again to rewrite it)")
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
