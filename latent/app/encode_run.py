"""`latent encode`: every case -> canonical grid -> normalise -> frozen VAE -> latent cache.

Resumable (a case already in the cache with the same source hashes is skipped), shardable
(``--shard i/n`` for array jobs; under ``accelerate launch`` each process takes its share),
and tolerant: a bad case is written to a failure manifest and the others are encoded.

The latent statistics are computed once, when every case is first in the cache, from a stated
training split (``--split-file``, else the data set's default split), and then frozen: encoding
more cases never changes them. ``recompute_stats`` (``--recompute-stats``) recomputes them and keeps
the old values in the producer group's ``latent_stats_history``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from latent.core.atomic import remove_stale_temporaries, write_text_atomic
from latent.cache import LatentCache, list_producers, producer_record, sha256_file
from latent.encode.latents import encode_prepared, grid_record, shard_cases, source_hashes
from latent.core.cases import Case, check_split_ids, discover_cases, load_splits, make_splits, read_split
from latent.core.grid import CanonicalGrid
from latent.core.intensity import normalisation_record
from latent.core.errors import user_message
from latent.core.prepare import prepare_case, resolve_grid
from latent.core.runner import INPUT_ERRORS
from latent.core.vae.loading import LoadedVAE

logger = logging.getLogger(__name__)


@dataclass
class EncodeReport:
    """What one encode run did."""

    producer_key: str
    grid: CanonicalGrid
    encoded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    #: cases kept with ``allow_truncation`` although the grid cuts their body: share cut off.
    truncated: dict[str, float] = field(default_factory=dict)
    coverage: float = 1.0
    seconds: float = 0.0
    manifest: Path | None = None
    #: set when Ctrl-C stopped the walk: (cases done, cases planned).
    interrupted: tuple[int, int] | None = None


def _is_current(cache: LatentCache, case: Case, hashes: dict[str, str]) -> bool:
    need = ["mr_mu"] + (["ct_mu"] if case.ct is not None else [])
    return cache.has_case(case.pid, need=need) and cache.source_hashes(case.pid) == hashes


def _process_share(index: int, count: int) -> tuple[int, int]:
    """Fold ``accelerate launch`` processes into the shard: each process takes its share."""
    from accelerate import PartialState

    state = PartialState()
    return index * state.num_processes + state.process_index, count * state.num_processes


def encode_dataset(
    data_root: str | os.PathLike,
    cache_path: str | os.PathLike,
    vae: LoadedVAE,
    grid_spec: str = "auto",
    *,
    max_shape: tuple[int, int, int] | None = None,
    shard: tuple[int, int] = (0, 1),
    split_file: str | os.PathLike | None = None,
    tile: Sequence[int] | None = None,
    bf16: bool = False,
    allow_truncation: bool = False,
    recompute_stats: bool = False,
    quiet: bool = False,
) -> EncodeReport:
    """Encode every case of ``data_root`` into the cache at ``cache_path``.

    Args:
        data_root: SynthRAD-layout data set.
        cache_path: zarr store (created when missing).
        vae: the frozen VAE (:func:`latent.core.vae.loading.load_vae`).
        grid_spec: ``auto``, a preset name, ``'SXxSYxSZ:DxHxW'`` or ``'SXxSYxSZ:fit'`` (each case
            gets the shape covering its body).
        max_shape: cap for ``auto`` (z, y, x).
        shard: ``(i, n)``: encode only every n-th case starting at i.
        split_file: split JSON; its ``train`` cases define the latent statistics.
        tile: encoder window (z, y, x) in voxels, or None for one pass.
        bf16: bfloat16 autocast.
        allow_truncation: keep cases whose body the grid cuts (warned; recorded in the report, the
            manifest and each case's geometry) instead of failing them.
        recompute_stats: recompute frozen latent statistics from this run's split (the old values
            are kept in the producer's ``latent_stats_history``).

    Returns:
        An :class:`EncodeReport`; failures are also written to a JSON manifest beside the cache.
    """
    started = time.perf_counter()
    cases = discover_cases(data_root)
    grid, coverage = resolve_grid(grid_spec, cases, max_shape)
    record = producer_record(vae.producer_info(), grid_record(grid), normalisation_record())
    _check_split(split_file, cases, data_root, Path(cache_path), record["producer_key"])
    cache = LatentCache(cache_path, record)
    report = EncodeReport(cache.key, grid, coverage=coverage)
    index, count = _process_share(*shard)
    mine = shard_cases(cases, index, count)
    logger.info("encode: %d of %d cases in shard %d/%d, grid %s, producer %s", len(mine), len(cases), index, count, grid.spec(), cache.key)
    remove_stale_temporaries(_manifest_folder(Path(cache_path)))
    for done, case in enumerate(tqdm(mine, desc="encode", unit="case", disable=quiet)):
        try:
            _encode_case(cache, vae, case, grid, report, tile, bf16, allow_truncation)
        except INPUT_ERRORS as error:
            message = user_message(error)
            if message is None:
                raise
            report.failures[case.pid] = message if case.pid in message else f"{case.pid}: {message}"
            logger.error(report.failures[case.pid])
        except KeyboardInterrupt:
            # Ctrl-C: the case being written is dropped whole (LatentCache.write_case is atomic).
            report.interrupted = (done, len(mine))
            break
    report.seconds = time.perf_counter() - started  # the manifest records the encoding time
    report.manifest = _write_manifest(Path(cache_path), report, index, count)
    if report.interrupted is None:
        _update_statistics(cache, cases, split_file, set(report.failures), Path(cache_path),
                           recompute=recompute_stats, encoded=set(report.encoded))
    report.seconds = time.perf_counter() - started
    return report


def _encode_case(cache: LatentCache, vae: LoadedVAE, case: Case, grid: CanonicalGrid, report: EncodeReport,
                 tile: Sequence[int] | None, bf16: bool, allow_truncation: bool) -> None:
    """Encode one case into the cache (skipped when it is there with the same source hashes)."""
    hashes = source_hashes(case)
    if _is_current(cache, case, hashes):
        report.skipped.append(case.pid)
        return
    prepared = prepare_case(case, grid, allow_truncation=allow_truncation)
    if prepared.mapping.mask_fraction_outside > 0:
        report.truncated[case.pid] = prepared.mapping.mask_fraction_outside
    arrays = encode_prepared(vae, prepared, tile, bf16)
    attrs = {
        "region": case.region, "centre": case.centre, "geometry": prepared.mapping.to_dict(),
        "mr_scaling": prepared.scaling.to_dict(), "source_sha256": hashes,
        "source_paths": {role: str(getattr(case, role)) for role in hashes},
    }
    cache.write_case(case.pid, arrays, attrs, overwrite=True)
    report.encoded.append(case.pid)


def _manifest_folder(cache_path: Path) -> Path:
    return cache_path.with_name(cache_path.name + ".manifests")


def _write_manifest(cache_path: Path, report: EncodeReport, index: int, count: int) -> Path:
    folder = _manifest_folder(cache_path)
    path = folder / f"encode_{report.producer_key}_shard{index}of{count}.json"
    write_text_atomic(path, json.dumps({
        "producer_key": report.producer_key, "grid": report.grid.to_dict(), "coverage": report.coverage,
        "encoded": report.encoded, "skipped": report.skipped, "failures": report.failures,
        "body_outside_fraction": report.truncated, "seconds": round(report.seconds, 3),
        **({"interrupted": {"done": report.interrupted[0], "planned": report.interrupted[1]}}
           if report.interrupted is not None else {}),
    }, indent=2) + "\n")
    return path


def _recorded_failures(cache_path: Path, producer_key: str) -> set[str]:
    """Cases that some shard or process of this producer recorded as failed in its manifest."""
    folder = _manifest_folder(cache_path)
    failed: set[str] = set()
    for path in folder.glob(f"encode_{producer_key}_shard*.json"):
        try:
            failed |= set(json.loads(path.read_text()).get("failures", {}))
        except (OSError, json.JSONDecodeError):
            continue  # an unreadable manifest only makes the statistics wait
    return failed


def _check_split(split_file: str | os.PathLike | None, cases: Sequence[Case], data_root: str | os.PathLike,
                 cache_path: Path, key: str) -> None:
    """Before anything is written: the split file is valid and each of its train ids is a case of
    ``data_root`` or already of the cache (:func:`latent.core.cases.check_split_ids`)."""
    if not split_file:
        return
    read_split(split_file, "train")
    known = {case.pid for case in cases}
    if key in list_producers(cache_path):
        known |= set(LatentCache.open(cache_path, key).case_ids())
    check_split_ids(split_file, load_splits(split_file), ["train"], known, f"{data_root} or {cache_path}")


def _split_label(split_file: str | os.PathLike | None) -> str:
    """How the statistics' training cases were chosen, as recorded with them."""
    if split_file is None:
        return "default split of the data set (latent split --seed 0, 70/10/20 by region and centre)"
    return f"{Path(split_file).resolve()} (sha256 {sha256_file(split_file)[:16]})"


def _scales(stats: dict) -> str:
    return ", ".join(f"{key} scale {stats[key]['scale_factor']:.4g}" for key in ("mr_mu", "ct_mu") if stats.get(key))


def _update_statistics(cache: LatentCache, cases: Sequence[Case], split_file: str | os.PathLike | None,
                       failed: set[str], cache_path: Path, *, recompute: bool = False,
                       encoded: set[str] = frozenset()) -> None:
    """Compute latent statistics once every usable case with a CT is in the cache (main process).

    Statistics already stored are frozen: kept as they are (whatever cases were added, whatever
    split is passed) unless ``recompute``. A case another shard or process failed on (its manifest
    says so) does not count as missing, so the outcome does not depend on which shard finishes last.
    """
    from accelerate import PartialState

    state = PartialState()
    state.wait_for_everyone()
    if not state.is_main_process:
        return
    frozen, label = cache.latent_stats(), _split_label(split_file)
    if frozen is not None and not recompute:
        used = {pid for key in ("mr_mu", "ct_mu") for pid in (frozen.get(key) or {}).get("pids", [])}
        if split_file is not None and frozen.get("split") != label:
            logger.warning("latent statistics kept as computed on %s from %s: --split-file %s is not used for them "
                           "(--recompute-stats recomputes them)", frozen.get("computed_at"),
                           frozen.get("split") or "an unrecorded split", split_file)
        if used & encoded:
            logger.warning("latent statistics are stale: %d of their cases were encoded again (--recompute-stats "
                           "recomputes them)", len(used & encoded))
        logger.info("latent statistics frozen (%s, computed %s)", _scales(frozen), frozen.get("computed_at"))
        return
    with_ct = [case.pid for case in cases if case.ct is not None and case.pid not in failed]
    if split_file:
        training = set(load_splits(split_file)["train"])
    else:
        # Never the test cases: without a split file the statistics come from the train part of
        # the default split (`latent split` with its defaults gives the same one).
        training = set(make_splits(cases)["train"])
        logger.warning("latent statistics: no --split-file, so computed on the %d train cases of the default "
                       "split (latent split --seed 0, 70/10/20 by region and centre)", len(training))
    pids = [pid for pid in with_ct if pid in training and cache.has_case(pid, need=["ct_mu"])]
    failed_elsewhere = _recorded_failures(cache_path, cache.key)
    complete = all(cache.has_case(pid, need=["ct_mu"]) or pid in failed_elsewhere for pid in with_ct)
    if pids and complete:
        stats = cache.update_latent_stats(pids, split=label)
        if frozen is not None:
            logger.warning("latent statistics recomputed (--recompute-stats): %s -> %s; the old values (computed %s) "
                           "are kept in the producer's latent_stats_history", _scales(frozen), _scales(stats),
                           frozen.get("computed_at"))
    elif not complete:
        logger.info("latent statistics not updated: some cases are not encoded yet (other shards?)")
