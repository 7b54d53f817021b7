"""One method on one test split: predict (training it first where it learns), then score.

The steps that ``latent demo`` and ``latent bench`` share. Every function writes under a work
folder ``out`` in one layout: ``out/predictions/<method>/`` (one sCT per case on its native
grid, ``timings.json`` for trained runs), ``out/scores/<method>.csv`` (+ ``.json``) and, for
trained methods, the run folder the caller names. Stage packages are imported lazily.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from latent.evaluation.scoring import evaluate_predictions

logger = logging.getLogger(__name__)

#: The oracles: the true CT through the canonical grid and back, full range and in the VAE window.
GRID_FLOORS = {"grid_floor": "full", "grid_floor_vae": "vae"}


@dataclass
class MethodResult:
    """One method's evaluation on the test split plus its compute."""

    name: str
    rows: list[dict]
    seconds_per_volume: float
    train_seconds: float = 0.0
    parameters: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    pred_dir: Path | None = None
    dose: dict[str, float] = field(default_factory=dict)
    #: StructB per region of the scored cases (latent.evaluation.structb.structb_by_region)
    structural_bias: dict | None = None


def score_method(name: str, data: Path, pred_dir: Path, out: Path, test: list[str], seconds: float,
                 **extra) -> MethodResult:
    """Score ``pred_dir`` on the ``test`` cases into ``out/scores/<name>.csv``; failures are logged."""
    evaluation = evaluate_predictions(pred_dir, data, out / "scores" / f"{name}.csv", pids=test, quiet=True)
    for message in evaluation.run.failures.values():
        logger.error("%s: %s", name, message)
    return MethodResult(name, evaluation.rows, seconds, pred_dir=pred_dir,
                        structural_bias=evaluation.structural_bias, **extra)


def baseline_result(method: str, data: Path, out: Path, splits: dict[str, list[str]]) -> MethodResult:
    """Water or bulk (classes fitted on the training split) on the test split."""
    from latent.app.predict_run import predict_baseline

    started = time.perf_counter()
    pred_dir = out / "predictions" / method
    run = predict_baseline(method, data, pred_dir, pids=splits["test"], fit_pids=splits["train"], quiet=True)
    seconds = (time.perf_counter() - started) / max(1, len(run.results))
    return score_method(method, data, pred_dir, out, splits["test"], seconds)


def grid_floor_result(name: str, data: Path, out: Path, grid: str, test: list[str]) -> MethodResult:
    """``grid_floor`` or ``grid_floor_vae`` (:data:`GRID_FLOORS`) on the canonical grid ``grid``."""
    from latent.app.predict_run import predict_grid_floor
    from latent.core.grid import parse_grid_spec

    started = time.perf_counter()
    pred_dir = out / "predictions" / name
    run = predict_grid_floor(data, pred_dir, parse_grid_spec(grid), GRID_FLOORS[name], pids=test, quiet=True)
    seconds = (time.perf_counter() - started) / max(1, len(run.results))
    return score_method(name, data, pred_dir, out, test, seconds)


def vae_floor_result(data: Path, out: Path, vae_spec: str, cache_path: Path, test: list[str],
                     vae_seconds: float, decoder: Path | None = None, name: str = "vae_floor") -> MethodResult:
    """decode(encode(CT)) on the native grid: the floor of latent-to-latent methods (through the
    adapted decoder run ``decoder`` of ``latent vae adapt`` when given)."""
    from latent.cache import LatentCache, pick_producer
    from latent.app.vae_check import vae_check
    from latent.decode.pipeline import load_adapted_decoder
    from latent.core.vae.loading import load_vae

    cache = LatentCache.open(cache_path, pick_producer(cache_path, None)[0])
    vae = load_vae(vae_spec) if decoder is None else load_adapted_decoder(decoder, cache.key)
    started = time.perf_counter()
    evaluation = vae_check(cache, vae, data, out / "predictions" / name, pids=test, quiet=True)
    seconds = (time.perf_counter() - started) / max(1, len(evaluation.rows))
    parameters = sum(p.numel() for p in (vae.network if decoder is None else vae).parameters())
    return MethodResult(name, evaluation.rows, seconds, vae_seconds, parameters, pred_dir=out / "predictions" / name,
                        structural_bias=evaluation.structural_bias)


def train_recipe(recipe: str | Path, run_dir: Path, cache: Path, split_file: Path, seconds: float | None,
                 overrides: list[str] = (), quiet: bool = True) -> float:
    """Train ``recipe`` on ``cache`` into a fresh ``run_dir``; returns the training seconds.

    ``seconds`` sets ``train.max_seconds`` (None keeps the recipe's budget); ``overrides`` are
    dotted ``key=value`` changes applied after the data paths and the budget.
    """
    from latent.app.validation import train_run
    from latent.translate.train import load_config

    if run_dir.exists():
        shutil.rmtree(run_dir)
    budget = [] if seconds is None else [f"train.max_seconds={seconds}"]
    config = load_config(recipe, [f"data.cache={cache}", f"data.split_file={split_file}", f"run_dir={run_dir}",
                                  *budget, *overrides])
    started = time.perf_counter()
    train_run(config, quiet=quiet)
    return time.perf_counter() - started


def train_method(name: str, recipe: Path, out: Path, seconds: float, overrides: list[str] = ()) -> tuple[Path, float]:
    """Train one recipe on ``out/cache.zarr`` into ``out/runs/<name>``; returns (run dir, training seconds)."""
    run_dir = out / "runs" / name
    seconds_taken = train_recipe(recipe, run_dir, out / "cache.zarr", out / "splits.json", seconds, list(overrides))
    return run_dir, seconds_taken


def predict_method(name: str, run_dir: Path | list[Path], data: Path, out: Path, test: list[str],
                   train_seconds: float, samples: int = 1, vae_spec: str | None = None, steps: int | None = None,
                   tta: str = "none", quiet: bool = True, decoder: Path | None = None) -> MethodResult:
    """Predict the test split from raw MR files with a trained run (or an ensemble of runs) and score it.

    ``steps`` overrides a diffusion model's sampling steps (the DDIM step sweep); ``samples > 1``
    averages that many samples, ``tta="flip"`` the mirrored passes, a list of runs their
    predictions in HU; each of these writes ``<pid>_std.mha``. ``decoder``: an adapted decoder run
    (``latent vae adapt``) that decodes a latent-to-latent run's CT latents.
    """
    from latent.app.predict_run import Ensemble, PredictOptions, load_run_and_vae, predict_dataset

    members = [load_run_and_vae(folder, vae_spec, decoder=decoder)
               for folder in (run_dir if isinstance(run_dir, list) else [run_dir])]
    for run, _ in members:
        if steps is not None:
            run.model.config.num_inference_steps = steps  # read by the sampler at every translate call
    run, vae = members[0] if len(members) == 1 else (Ensemble(members), None)
    pred_dir = out / "predictions" / name
    predict_dataset(run, vae, data, pred_dir, pids=test, options=PredictOptions(samples=samples, tta=tta),
                    quiet=quiet)
    timings = json.loads((pred_dir / "timings.json").read_text())["mean_seconds"]
    parameters = sum(p.numel() for member, _ in members for p in member.model.parameters())
    return score_method(name, data, pred_dir, out, test, sum(timings.values()), train_seconds=train_seconds,
                        parameters=parameters, stage_seconds=timings)
