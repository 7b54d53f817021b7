"""`latent predict`: one dispatch from a method (baseline, grid floor, VAE floor, trained run,
ensemble) and an input (``--data``, ``--mr [--mask]``, ``--from-cache``, ``--gc-io``) to the one
predictor loop of the decode stage (:func:`latent.decode.predictors.predict_cases`). The CLI, the
demo and ``latent bench`` call these functions.

``--ensemble RUN1,RUN2,...`` predicts with every run (each through its own VAE and latent
statistics) and averages in HU on the native grid; the std across members, samples and flips
(``--tta flip``) goes to ``<pid>_std.mha`` like the std of ``--samples K``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from latent.core.atomic import write_text_atomic
from latent.core.cases import Case, CaseError
from latent.decode.baseline_predict import baseline_predictor
from latent.decode.grid_floor import GridFloorPredictor, Window
from latent.decode.pipeline import TrainedRun, attach_decoder, case_from_files, check_vae_matches, load_run
from latent.decode.predictors import Predictor, folder_writer, predict_cases
from latent.decode.run_predictor import Member, RunPredictor, VAEFloorPredictor
from latent.core.errors import BadConfigError
from latent.core.grid import CanonicalGrid
from latent.core.io import write_volume
from latent.core.runner import CaseRun, Selection, select_cases


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


@dataclass
class Ensemble:
    """Runs whose native-grid predictions are averaged in HU (each with its own VAE and statistics)."""

    members: list[Member]


def load_run_and_vae(run_dir: str | os.PathLike, vae_spec: str | None, which: str = "best",
                     device: str = "cpu", decoder: str | os.PathLike | None = None) -> tuple[TrainedRun, object | None]:
    """The run and, when it needs one, its VAE (``vae_spec`` or the one recorded in the run);
    ``decoder``: an adapted decoder run (``latent vae adapt``) that decodes the run's CT latents."""
    from latent.core.vae.loading import load_vae

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


def run_predictor(run: TrainedRun | Ensemble, vae, options: PredictOptions, cache=None) -> RunPredictor:
    """The predictor of a run (with its VAE) or an ensemble; ``cache``: read inputs from this cache."""
    members = run.members if isinstance(run, Ensemble) else [(run, vae)]
    return RunPredictor(members, samples=options.samples, seed=options.seed, tta=options.tta, tile=options.tile,
                        allow_truncation=options.allow_truncation, cache=cache,
                        label="predict (cache)" if cache is not None else "predict")


def write_predictions(predictor: Predictor, selection: Selection, out_dir: str | os.PathLike, fmt: str = "mha",
                      quiet: bool = False) -> CaseRun[Path]:
    """Every selected case through ``predictor`` into ``out_dir`` (``--format fmt``) with ``timings.json``."""
    out_dir = Path(out_dir)
    return predict_cases(predictor, None, folder_writer(out_dir, fmt), selection=selection,
                         timings=out_dir / "timings.json", quiet=quiet)


def predict_dataset(run: TrainedRun | Ensemble, vae, data_root: str | os.PathLike, out_dir: str | os.PathLike,
                    pids: Iterable[str] | None = None, options: PredictOptions | None = None,
                    quiet: bool = False) -> CaseRun[Path]:
    """Predict every case (or ``pids``) of a SynthRAD-layout data set from its raw MR files."""
    options = options or PredictOptions()
    return write_predictions(run_predictor(run, vae, options), select_cases(data_root, pids), out_dir, options.fmt,
                             quiet)


def cache_selection(cache_path: str | os.PathLike, producer_key: str, pids: Iterable[str] | None,
                    need: Sequence[str] = ()) -> Selection:
    """The cases of a cache's producer group (``pids`` only, when given) as a selection: a case
    the cache lacks (or holds without ``need``) counts as failed."""
    from latent.cache import LatentCache

    cache = LatentCache.open(cache_path, producer_key)
    wanted = list(pids) if pids is not None else cache.case_ids()
    present = [pid for pid in wanted if (cache.has_case(pid, need=list(need)) if need else cache.has_case(pid))]
    cases = []
    for pid in present:
        attrs = cache.case_attrs(pid)
        sources = attrs.get("source_paths", {})
        cases.append(Case(pid, str(attrs.get("region", "?")), str(attrs.get("centre", "?")),
                          Path(sources.get("mr", pid)), ct=Path(sources["ct"]) if sources.get("ct") else None,
                          mask=Path(sources["mask"]) if sources.get("mask") else None))
    missing = {pid: f"{pid}: not in cache {cache_path}" for pid in sorted(set(wanted) - set(present))}
    return Selection(cases, found=cases, missing=missing)


def predict_from_cache(run: TrainedRun | Ensemble, vae, cache_path: str | os.PathLike, out_dir: str | os.PathLike,
                       pids: Iterable[str] | None = None, options: PredictOptions | None = None,
                       quiet: bool = False) -> CaseRun[Path]:
    """Predict from the MR latents / pixels stored in the cache, in each member's own producer group
    (no re-encoding)."""
    options = options or PredictOptions()
    predictor = run_predictor(run, vae, options, cache=cache_path)
    first = predictor.members[0][0].record["producer_key"]
    return write_predictions(predictor, cache_selection(cache_path, first, pids), out_dir, options.fmt, quiet)


def predict_files(run: TrainedRun | Ensemble, vae, mr: Path, mask: Path | None, out_dir: str | os.PathLike,
                  options: PredictOptions | None = None) -> Path:
    """Predict one MR file (with its mask, or a mask derived from the MR) into ``out_dir``, with
    ``<pid>_timings.json`` (seconds per stage) beside it."""
    options = options or PredictOptions()
    case = case_from_files(Path(mr), mask)
    out_dir = Path(out_dir)
    seconds: dict[str, float] = {}
    write = folder_writer(out_dir, options.fmt)

    def writer(case: Case, prediction) -> Path:
        seconds.update(prediction.seconds)
        return write(case, prediction)

    result = predict_cases(run_predictor(run, vae, options), [case], writer, quiet=True)
    if result.failures:
        raise CaseError(next(iter(result.failures.values())))
    write_text_atomic(out_dir / f"{case.pid}_timings.json", json.dumps(seconds, indent=2) + "\n")
    return result.results[case.pid]


def predict_grand_challenge(run: TrainedRun | Ensemble, vae, input_dir: str | os.PathLike,
                            output_dir: str | os.PathLike, options: PredictOptions | None = None,
                            quiet: bool = False) -> CaseRun[Path]:
    """Grand Challenge algorithm layout: images/mri + images/body (+ region.json) -> images/synthetic-ct."""
    from latent.decode.gc_io import gc_output_path, read_gc_inputs

    inputs = read_gc_inputs(input_dir)
    cases = [Case(item.mri_path.name, item.region, "?", item.mri_path, mask=item.mask_path) for item in inputs]

    def writer(case: Case, prediction) -> Path:
        target = gc_output_path(output_dir, case.mr)
        return write_volume(target, prediction.hu, prediction.properties, dtype=np.int16)

    return predict_cases(run_predictor(run, vae, options or PredictOptions()), cases, writer, quiet=quiet)


def predict_baseline(method: str, data_root: str | os.PathLike, out_dir: str | os.PathLike,
                     pids: Iterable[str] | None = None, fit_pids: Iterable[str] | None = None, quiet: bool = False,
                     fmt: str = "mha") -> CaseRun[Path]:
    """``water`` or ``bulk`` (classes fitted on ``fit_pids``, by default the cases not predicted) for every
    case (or ``pids``); ``bulk_model.json`` records the fit."""
    selection = select_cases(data_root, pids)
    predictor = baseline_predictor(method, selection, fit_pids, record_dir=out_dir)
    return write_predictions(predictor, selection, out_dir, fmt, quiet)


def predict_grid_floor(data_root: str | os.PathLike, out_dir: str | os.PathLike, grid: CanonicalGrid,
                       window: Window = "full", pids: Iterable[str] | None = None, quiet: bool = False,
                       allow_truncation: bool = False, fmt: str = "mha") -> CaseRun[Path]:
    """The grid floor of every case with a CT (or only ``pids``)."""
    selection = select_cases(data_root, pids, need_ct=True)
    return write_predictions(GridFloorPredictor(grid, window, allow_truncation), selection, out_dir, fmt, quiet)


def predict_vae_floor(cache_path: str | os.PathLike, vae, out_dir: str | os.PathLike,
                      pids: Iterable[str] | None = None, tile: Sequence[int] | None = None, fmt: str = "mha",
                      quiet: bool = False, producer: str | None = None) -> CaseRun[Path]:
    """decode(cached CT latent) of every cached case (or ``pids``) with a CT latent, on its native grid."""
    from latent.cache import LatentCache, pick_producer

    key = producer or pick_producer(cache_path, None)[0]
    selection = cache_selection(cache_path, key, pids, need=["ct_mu"])
    predictor = VAEFloorPredictor(LatentCache.open(cache_path, key), vae, tile)
    return write_predictions(predictor, selection, out_dir, fmt, quiet)


#: ``latent predict --method`` names: the baselines, the grid floors and the VAE floor.
METHODS = ("water", "bulk", "grid_floor", "grid_floor_vae", "vae_floor")


def predict_with_method(method: str, out_dir: str | os.PathLike, data: Path | None = None, cache: Path | None = None,
                        grid: str | None = None, vae_spec: str | None = None, pids: Iterable[str] | None = None,
                        fit_pids: Iterable[str] | None = None, fmt: str = "mha", allow_truncation: bool = False,
                        quiet: bool = False) -> CaseRun[Path]:
    """``latent predict --method``: a method without a trained run, through the one predictor loop.

    Raises:
        BadConfigError: an unknown method, or one without the input it needs (named).
    """
    if method not in METHODS:
        raise BadConfigError(f"--method: unknown method {method!r}; known: {', '.join(METHODS)}")
    if method == "vae_floor":
        if cache is None:
            raise BadConfigError("--method vae_floor needs --from-cache CACHE (its CT latents are decoded)")
        from latent.cache import pick_producer
        from latent.core.vae.loading import load_vae

        key, record = pick_producer(cache, None)
        location = record.get("vae_location", {})
        spec = vae_spec or location.get("path") or location.get("name")
        if not spec:
            raise BadConfigError(f"--method vae_floor: {cache} does not record where its VAE is; pass --vae")
        return predict_vae_floor(cache, load_vae(str(spec)), out_dir, pids, fmt=fmt, quiet=quiet, producer=key)
    if data is None:
        raise BadConfigError(f"--method {method} needs --data ROOT")
    if method in ("grid_floor", "grid_floor_vae"):
        from latent.core.grid import parse_grid_spec

        if grid is None:
            raise BadConfigError(f"--method {method} needs --grid (the canonical grid whose round trip is measured)")
        window = "vae" if method == "grid_floor_vae" else "full"
        return predict_grid_floor(data, out_dir, parse_grid_spec(grid), window, pids, quiet, allow_truncation, fmt)
    return predict_baseline(method, data, out_dir, pids, fit_pids, quiet, fmt)
