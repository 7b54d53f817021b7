"""`latent predict --model RUN_DIR`: every input case -> sCT files + per-case timings JSON.

Inputs: a data set (``--data``), one MR file (``--mr [--mask]``), the Grand Challenge layout
(``--gc-io INPUT OUTPUT``) or the latents already in the run's cache (``--from-cache``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from decode.pipeline import (
    CasePrediction, TrainedRun, case_from_files, check_vae_matches, load_run, predict_cached, predict_prepared,
)
from decode.writers import write_prediction
from latent.cases import Case, CaseError
from latent.io import read_volume, write_volume
from latent.prepare import body_mask_from_mr, prepare_case, prepare_mr_only
from latent.runner import CaseRun, run_over_cases, select_cases


@dataclass
class PredictOptions:
    """How to predict: samples for stochastic models, seed, output format, decoder tile."""

    samples: int = 1
    seed: int = 0
    fmt: str = "mha"
    tile: Sequence[int] | None = None
    which: str = "best"


def load_run_and_vae(run_dir: str | os.PathLike, vae_spec: str | None, which: str = "best",
                     device: str = "cpu") -> tuple[TrainedRun, object | None]:
    """The run and, when it needs one, its VAE (``vae_spec`` or the one recorded in the run)."""
    from latent.vae import load_vae

    run = load_run(run_dir, which)
    run.model.to(device)
    if not run.needs_vae:
        return run, None
    location = run.record.get("vae_location", {})
    spec = vae_spec or location.get("path") or location.get("name")
    if not spec:
        raise CaseError(f"{run_dir}: the run does not record where its VAE is; pass --vae")
    vae = load_vae(str(spec), device=device)
    check_vae_matches(run, vae)
    return run, vae


def _write(out_dir: Path, pid: str, prediction: CasePrediction, properties, options: PredictOptions) -> Path:
    return write_prediction(out_dir, pid, prediction.hu, properties, std=prediction.std, fmt=options.fmt)


def _write_timings(out_dir: Path, run: CaseRun, timings: dict[str, dict[str, float]]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {stage: float(np.mean([t[stage] for t in timings.values()])) for stage in ("encode", "translate", "decode")} if timings else {}
    (out_dir / "timings.json").write_text(json.dumps(
        {"cases": timings, "mean_seconds": summary, "failures": run.failures}, indent=2) + "\n")


def predict_dataset(run: TrainedRun, vae, data_root: str | os.PathLike, out_dir: str | os.PathLike,
                    pids: Iterable[str] | None = None, options: PredictOptions | None = None,
                    quiet: bool = False) -> CaseRun[Path]:
    """Predict every case (or ``pids``) of a SynthRAD-layout data set from its raw MR files."""
    options = options or PredictOptions()
    out_dir = Path(out_dir)
    selection = select_cases(data_root, pids)
    timings: dict[str, dict[str, float]] = {}

    def work(case: Case) -> Path:
        prepared = prepare_case(case, run.grid, with_ct=False)
        prediction = predict_prepared(run, vae, prepared, options.samples, options.seed, options.tile)
        timings[case.pid] = prediction.seconds
        return _write(out_dir, case.pid, prediction, prepared.mapping.native, options)

    result = run_over_cases(None, work, "predict", quiet, selection=selection)
    _write_timings(out_dir, result, timings)
    return result


def predict_from_cache(run: TrainedRun, vae, cache_path: str | os.PathLike, out_dir: str | os.PathLike,
                       pids: Iterable[str] | None = None, options: PredictOptions | None = None,
                       quiet: bool = False) -> CaseRun[Path]:
    """Predict from the MR latents / pixels stored in the run's cache (no re-encoding)."""
    from cache import LatentCache

    options = options or PredictOptions()
    out_dir = Path(out_dir)
    cache = LatentCache.open(cache_path, run.record["producer_key"])
    wanted = list(pids) if pids is not None else cache.case_ids()
    cases = [Case(pid, str(cache.case_attrs(pid).get("region", "?")), str(cache.case_attrs(pid).get("centre", "?")),
                  Path(cache.case_attrs(pid).get("source_paths", {}).get("mr", pid))) for pid in wanted if cache.has_case(pid)]
    missing = sorted(set(wanted) - {case.pid for case in cases})
    timings: dict[str, dict[str, float]] = {}

    def work(case: Case) -> Path:
        prediction, mapping = predict_cached(run, vae, cache, case.pid, options.samples, options.seed, options.tile)
        timings[case.pid] = prediction.seconds
        return _write(out_dir, case.pid, prediction, mapping.native, options)

    result = run_over_cases(cases, work, "predict (cache)", quiet)
    result.failures.update({pid: f"{pid}: not in cache {cache_path}" for pid in missing})
    _write_timings(out_dir, result, timings)
    return result


def predict_files(run: TrainedRun, vae, mr: Path, mask: Path | None, out_dir: str | os.PathLike,
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
        if not mask_array.any():
            raise CaseError(f"{mask}: empty mask")
    else:
        mask_array = body_mask_from_mr(mr_array, min(properties.spacing[:2]))
    prepared = prepare_mr_only(mr_array, mask_array, properties, case, run.grid)
    prediction = predict_prepared(run, vae, prepared, options.samples, options.seed, options.tile)
    out_dir = Path(out_dir)
    if output_name is not None:  # Grand Challenge layout: nothing else in the output folder
        return write_volume(out_dir / output_name, prediction.hu, properties, dtype=np.int16)
    path = _write(out_dir, case.pid, prediction, properties, options)
    (out_dir / f"{case.pid}_timings.json").write_text(json.dumps(prediction.seconds, indent=2) + "\n")
    return path


def predict_grand_challenge(run: TrainedRun, vae, input_dir: str | os.PathLike, output_dir: str | os.PathLike,
                            options: PredictOptions | None = None, quiet: bool = False) -> CaseRun[Path]:
    """Grand Challenge algorithm layout: images/mri + images/body (+ region.json) -> images/synthetic-ct."""
    from decode.gc_io import gc_output_path, read_gc_inputs

    inputs = read_gc_inputs(input_dir)
    cases = [Case(item.mri_path.name, item.region, "?", item.mri_path, mask=item.mask_path) for item in inputs]

    def work(case: Case) -> Path:
        target = gc_output_path(output_dir, case.mr)
        return predict_files(run, vae, case.mr, case.mask, target.parent, options, output_name=target.name)

    return run_over_cases(cases, work, "predict (grand challenge)", quiet)
