"""`latent predict --model RUN_DIR`: every input case -> sCT files + per-case timings JSON.

Inputs: a data set (``--data``), one MR file (``--mr [--mask]``), the Grand Challenge layout
(``--gc-io INPUT OUTPUT``) or the latents already in the run's cache (``--from-cache``).
``--ensemble RUN1,RUN2,...`` predicts with every run (each through its own VAE and latent
statistics) and averages in HU on the native grid; the std across members, samples and flips
(``--tta flip``) goes to ``<pid>_std.mha`` like the std of ``--samples K``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from latent.decode.pipeline import (
    CasePrediction, TrainedRun, attach_decoder, case_from_files, check_vae_matches, combine_predictions, load_run,
    predict_cached, predict_prepared,
)
from latent.decode.writers import write_prediction
from latent.cases import Case, CaseError
from latent.errors import BadConfigError
from latent.grid import CanonicalGrid
from latent.intensity import check_mask_values
from latent.io import read_volume, write_volume
from latent.prepare import PreparedCase, body_mask_from_mr, prepare_case, prepare_mr_only
from latent.runner import CaseRun, run_over_cases, select_cases


@dataclass
class PredictOptions:
    """How to predict: samples for stochastic models, seed, flip TTA, output format, decoder tile."""

    samples: int = 1
    seed: int = 0
    fmt: str = "mha"
    tile: Sequence[int] | None = None
    which: str = "best"
    #: "none" or "flip" (mirror along the family's ``flip_axes``; latent.decode.combine.TTA_MODES).
    tta: str = "none"
    #: keep a case whose body the run's fixed grid cuts (warned, and its share in timings.json).
    allow_truncation: bool = False


#: One trained run and the VAE it predicts through (None for pixel models).
Member = tuple[TrainedRun, Any]


@dataclass
class Ensemble:
    """Runs whose native-grid predictions are averaged in HU (each with its own VAE and statistics)."""

    members: list[Member]


def load_run_and_vae(run_dir: str | os.PathLike, vae_spec: str | None, which: str = "best",
                     device: str = "cpu", decoder: str | os.PathLike | None = None) -> tuple[TrainedRun, object | None]:
    """The run and, when it needs one, its VAE (``vae_spec`` or the one recorded in the run);
    ``decoder``: an adapted decoder run (``latent vae adapt``) that decodes the run's CT latents."""
    from latent.vae import load_vae

    run = load_run(run_dir, which)
    run.model.to(device)
    if decoder is not None:
        run = attach_decoder(run, decoder)
    if not run.needs_vae:
        return run, None
    location = run.record.get("vae_location", {})
    spec = vae_spec or location.get("path") or location.get("name")
    if not spec:
        raise CaseError(f"{run_dir}: the run does not record where its VAE is; pass --vae")
    vae = load_vae(str(spec), device=device)
    check_vae_matches(run, vae)
    return run, vae


def parse_ensemble(text: str) -> list[Path]:
    """``RUN1,RUN2,...`` -> run folders (at least two, no repeats).

    Raises:
        BadConfigError: naming ``--ensemble`` and the problem.
    """
    names = [name.strip() for name in text.split(",")]
    if any(not name for name in names):
        raise BadConfigError(f"--ensemble: empty run name in {text!r}; expected RUN1,RUN2,...")
    if len(names) < 2:
        raise BadConfigError(f"--ensemble: {text!r} names one run; an ensemble needs at least two (or use --model)")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise BadConfigError(f"--ensemble: {repeated[0]} is named twice")
    return [Path(name) for name in names]


def load_ensemble(text: str, vae_spec: str | None, which: str = "best", device: str = "cpu") -> Ensemble:
    """The runs of ``--ensemble RUN1,RUN2,...``, each with its own VAE (``vae_spec`` applies to all)."""
    return Ensemble([load_run_and_vae(run_dir, vae_spec, which, device) for run_dir in parse_ensemble(text)])


def _members(run: TrainedRun | Ensemble, vae) -> list[Member]:
    return run.members if isinstance(run, Ensemble) else [(run, vae)]


def _predict_members(members: Sequence[Member], prepare: Callable[[CanonicalGrid], PreparedCase],
                     options: PredictOptions) -> tuple[CasePrediction, PreparedCase]:
    """Every member's prediction of one case (prepared once per canonical grid), combined in HU."""
    prepared: dict[str, PreparedCase] = {}
    predictions = []
    for run, vae in members:
        key = run.grid.spec()
        if key not in prepared:
            prepared[key] = prepare(run.grid)
        predictions.append(predict_prepared(run, vae, prepared[key], options.samples, options.seed, options.tile,
                                            options.tta))
    return combine_predictions(predictions), next(iter(prepared.values()))


def _write(out_dir: Path, pid: str, prediction: CasePrediction, properties, options: PredictOptions) -> Path:
    return write_prediction(out_dir, pid, prediction.hu, properties, std=prediction.std, fmt=options.fmt)


def _write_timings(out_dir: Path, run: CaseRun, timings: dict[str, dict[str, float]],
                   outside: dict[str, float] | None = None) -> None:
    """``timings.json``: seconds per stage and case, failures, and the share of each body that the
    canonical grid cut off (``body_outside_fraction``, only cases kept with ``allow_truncation``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {stage: float(np.mean([t[stage] for t in timings.values()])) for stage in ("encode", "translate", "decode")} if timings else {}
    (out_dir / "timings.json").write_text(json.dumps(
        {"cases": timings, "mean_seconds": summary, "failures": run.failures,
         "body_outside_fraction": dict(sorted((outside or {}).items()))}, indent=2) + "\n")


def _note_outside(outside: dict[str, float], pid: str, fraction: float) -> None:
    if fraction > 0:
        outside[pid] = fraction


def predict_dataset(run: TrainedRun | Ensemble, vae, data_root: str | os.PathLike, out_dir: str | os.PathLike,
                    pids: Iterable[str] | None = None, options: PredictOptions | None = None,
                    quiet: bool = False) -> CaseRun[Path]:
    """Predict every case (or ``pids``) of a SynthRAD-layout data set from its raw MR files."""
    options = options or PredictOptions()
    members = _members(run, vae)
    out_dir = Path(out_dir)
    selection = select_cases(data_root, pids)
    timings: dict[str, dict[str, float]] = {}
    outside: dict[str, float] = {}

    def work(case: Case) -> Path:
        prediction, prepared = _predict_members(
            members, lambda grid: prepare_case(case, grid, with_ct=False, allow_truncation=options.allow_truncation),
            options)
        timings[case.pid] = prediction.seconds
        _note_outside(outside, case.pid, prepared.mapping.mask_fraction_outside)
        return _write(out_dir, case.pid, prediction, prepared.mapping.native, options)

    result = run_over_cases(None, work, "predict", quiet, selection=selection)
    _write_timings(out_dir, result, timings, outside)
    return result


def predict_from_cache(run: TrainedRun | Ensemble, vae, cache_path: str | os.PathLike, out_dir: str | os.PathLike,
                       pids: Iterable[str] | None = None, options: PredictOptions | None = None,
                       quiet: bool = False) -> CaseRun[Path]:
    """Predict from the MR latents / pixels stored in the cache, in each member's own producer group
    (no re-encoding)."""
    from latent.cache import LatentCache

    options = options or PredictOptions()
    members = _members(run, vae)
    out_dir = Path(out_dir)
    caches = [LatentCache.open(cache_path, member.record["producer_key"]) for member, _ in members]
    cache = caches[0]
    wanted = list(pids) if pids is not None else cache.case_ids()
    present = [pid for pid in wanted if all(store.has_case(pid) for store in caches)]
    cases = [Case(pid, str(cache.case_attrs(pid).get("region", "?")), str(cache.case_attrs(pid).get("centre", "?")),
                  Path(cache.case_attrs(pid).get("source_paths", {}).get("mr", pid))) for pid in present]
    missing = sorted(set(wanted) - set(present))
    timings: dict[str, dict[str, float]] = {}
    outside: dict[str, float] = {}

    def work(case: Case) -> Path:
        predictions = [predict_cached(member, member_vae, store, case.pid, options.samples, options.seed,
                                      options.tile, options.tta) for (member, member_vae), store in zip(members, caches)]
        prediction = combine_predictions([item[0] for item in predictions])
        timings[case.pid] = prediction.seconds
        _note_outside(outside, case.pid, predictions[0][1].mask_fraction_outside)
        return _write(out_dir, case.pid, prediction, predictions[0][1].native, options)

    result = run_over_cases(cases, work, "predict (cache)", quiet)
    result.failures.update({pid: f"{pid}: not in cache {cache_path}" for pid in missing})
    _write_timings(out_dir, result, timings, outside)
    return result


def predict_files(run: TrainedRun | Ensemble, vae, mr: Path, mask: Path | None, out_dir: str | os.PathLike,
                  options: PredictOptions | None = None, output_name: str | None = None) -> Path:
    """Predict one MR file (with its mask, or a mask derived from the MR)."""
    options = options or PredictOptions()
    case = case_from_files(Path(mr), mask)
    mr_array, properties = read_volume(mr, dtype=np.float32)
    if mask is not None:
        mask_array, mask_properties = read_volume(mask)
        differences = properties.grid_differences(mask_properties)
        if differences:
            raise CaseError(f"{mask}: mask is on another grid than {mr}: {'; '.join(differences)}")
        check_mask_values(mask, mask_array)
        if not mask_array.any():
            raise CaseError(f"{mask}: empty mask")
    else:
        mask_array = body_mask_from_mr(mr_array, min(properties.spacing[:2]))
    prediction, _ = _predict_members(
        _members(run, vae), lambda grid: prepare_mr_only(mr_array, mask_array, properties, case, grid, options.allow_truncation),
        options)
    out_dir = Path(out_dir)
    if output_name is not None:  # Grand Challenge layout: nothing else in the output folder
        return write_volume(out_dir / output_name, prediction.hu, properties, dtype=np.int16)
    path = _write(out_dir, case.pid, prediction, properties, options)
    (out_dir / f"{case.pid}_timings.json").write_text(json.dumps(prediction.seconds, indent=2) + "\n")
    return path


def predict_grand_challenge(run: TrainedRun | Ensemble, vae, input_dir: str | os.PathLike,
                            output_dir: str | os.PathLike, options: PredictOptions | None = None,
                            quiet: bool = False) -> CaseRun[Path]:
    """Grand Challenge algorithm layout: images/mri + images/body (+ region.json) -> images/synthetic-ct."""
    from latent.decode.gc_io import gc_output_path, read_gc_inputs

    inputs = read_gc_inputs(input_dir)
    cases = [Case(item.mri_path.name, item.region, "?", item.mri_path, mask=item.mask_path) for item in inputs]

    def work(case: Case) -> Path:
        target = gc_output_path(output_dir, case.mr)
        return predict_files(run, vae, case.mr, case.mask, target.parent, options, output_name=target.name)

    return run_over_cases(cases, work, "predict (grand challenge)", quiet)
