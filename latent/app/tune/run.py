"""``latent tune``: check the recipe and the space, open (or resume, or join) the study, run the
trials in this process or in ``workers`` processes on the same storage, then write the outputs."""

from __future__ import annotations

import copy
import multiprocessing
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from latent.app.tune import study as studies
from latent.app.tune.outputs import write_outputs
from latent.app.tune.space import SearchSpace, check_against_recipe, load_space
from latent.app.tune.trial import TrialOutcome, TrialPlan, run_trial
from latent.core.errors import BadConfigError, BadFileError
from latent.core.recipes import apply_overrides, find_recipe, read_recipe

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass(frozen=True)
class TuneSettings:
    """The command line of ``latent tune``."""

    recipe: str
    space: Path
    out: Path
    trials: int
    #: dotted ``key=value`` changes to the recipe, as ``latent train`` takes them (data.cache=..., ...).
    overrides: tuple[str, ...] = ()
    trial_seconds: float | None = None
    storage: str | None = None
    study: str | None = None
    workers: int = 1
    pruner: str = "median"
    resume: bool = False
    seed: int = 0
    quiet: bool = False


@dataclass
class TuneOutcome:
    """What one ``latent tune`` did."""

    study: str
    storage: str
    outcomes: list[TrialOutcome] = field(default_factory=list)
    interrupted: list[int] = field(default_factory=list)
    written: dict[str, Path] = field(default_factory=dict)


def prepare(settings: TuneSettings) -> tuple[dict[str, Any], SearchSpace]:
    """The recipe (overrides applied) and the space, both checked before any trial.

    Raises:
        BadConfigError: a recipe ``latent tune`` cannot search (VAE, no cache, no native
            validation), or a space field the recipe refuses.
    """
    from latent.translate.train import parse_config

    studies.make_pruner(settings.pruner)
    raw = apply_overrides(read_recipe(settings.recipe), settings.overrides)
    config = parse_config(copy.deepcopy(raw))
    if config.is_vae:
        raise BadConfigError(f"{settings.recipe}: model.family: vae: latent tune searches translation recipes "
                             "(trained on a latent cache and validated on the native grid)")
    if not config.data.cache:
        raise BadConfigError(f"{settings.recipe}: data.cache: latent tune trains on a latent cache; give data.cache=...")
    if not Path(config.data.cache).exists():
        raise BadFileError(f"data.cache {config.data.cache}: no such cache (build it with latent encode)")
    if config.train.validator != "native":
        raise BadConfigError(f"{settings.recipe}: train.validator: {config.train.validator}: the objective is the "
                             "native-grid validation MAE in HU; set train.validator=native")
    space = load_space(settings.space)
    check_against_recipe(space, raw, parse_config, settings.space)
    return raw, space


def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _work(url: str, name: str, plan: TrialPlan, count: int, seed: int, trials: int, threads: int) -> list[TrialOutcome]:
    """One worker process: ``count`` trials of the study on ``url``."""
    import torch

    _quiet_optuna()
    torch.set_num_threads(threads)
    study = optuna.load_study(study_name=name, storage=studies.open_storage(url),
                              sampler=studies.make_sampler(seed, trials), pruner=studies.make_pruner(plan.pruner))
    return [run_trial(study, plan) for _ in range(count)]


def _progress(study: optuna.Study, bar: Any, outcome: TrialOutcome | None, quiet: bool) -> None:
    best = studies.best_trial(study)
    if best is not None:
        bar.set_postfix_str(f"best {best.value:.1f} HU (trial {best.number})")
    if outcome is not None and not quiet:
        bar.write(outcome.line(), file=sys.stderr)


def run_trials(study: optuna.Study, url: str, plan: TrialPlan, settings: TuneSettings, count: int) -> list[TrialOutcome]:
    """``count`` trials: here one after another, or split over ``settings.workers`` processes."""
    from tqdm.auto import tqdm

    workers = max(1, min(settings.workers, count))
    bar = tqdm(total=count, desc="tune", unit="trial", disable=settings.quiet, file=sys.stderr)
    outcomes: list[TrialOutcome] = []
    if workers == 1:
        for _ in range(count):
            outcomes.append(run_trial(study, plan))
            bar.update(1)
            _progress(study, bar, outcomes[-1], settings.quiet)
    else:
        shares = [count // workers + (index < count % workers) for index in range(workers)]
        threads = max(1, (os.cpu_count() or 1) // workers)
        before = len(study.get_trials(deepcopy=False, states=FINISHED))
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            jobs = [pool.apply_async(_work, (url, study.study_name, plan, share, settings.seed + 1 + index,
                                             settings.trials, threads)) for index, share in enumerate(shares)]
            while not all(job.ready() for job in jobs):
                time.sleep(2.0)
                done = len(study.get_trials(deepcopy=False, states=FINISHED)) - before
                bar.update(max(0, min(count, done) - bar.n))
                _progress(study, bar, None, settings.quiet)
            for job in jobs:
                for outcome in job.get():
                    outcomes.append(outcome)
                    _progress(study, bar, outcome, settings.quiet)
        bar.update(count - bar.n)
    bar.close()
    return outcomes


def run_tune(settings: TuneSettings) -> TuneOutcome:
    """Run ``latent tune`` (see :class:`TuneSettings`) and write its outputs into ``settings.out``."""
    _quiet_optuna()
    raw, space = prepare(settings)
    out = Path(settings.out)
    url = settings.storage or studies.default_storage(out)
    if settings.storage is None:
        out.mkdir(parents=True, exist_ok=True)
    storage = studies.open_storage(url)  # a shared storage that cannot be opened leaves --out untouched
    out.mkdir(parents=True, exist_ok=True)
    name = settings.study or find_recipe(settings.recipe).stem
    refuse = None if settings.storage else (f"--out {out}: already holds the study {name!r} ({studies.STUDY_FILE}); "
                                            "--resume continues it, or choose another --out")
    record = {"recipe": str(settings.recipe), "overrides": list(settings.overrides), "space": space.to_dict(),
              "trial_seconds": settings.trial_seconds}
    study = studies.open_study(storage, name, sampler=studies.make_sampler(settings.seed, settings.trials),
                               pruner=studies.make_pruner(settings.pruner), resume=settings.resume,
                               refuse_existing=refuse, record=record)
    outcome = TuneOutcome(name, studies.redact(url))
    count = settings.trials
    if settings.resume:
        outcome.interrupted = studies.mark_interrupted(study, storage)
        count = max(0, settings.trials - studies.counted_trials(study))
    plan = TrialPlan(raw=raw, space=space, out=out, trial_seconds=settings.trial_seconds, pruner=settings.pruner)
    outcome.outcomes = run_trials(study, url, plan, settings, count)
    described = {**asdict(settings), "storage": outcome.storage, "space": str(settings.space), "out": str(out)}
    described.pop("quiet")
    outcome.written = write_outputs(study, raw, space, out, described)
    return outcome
