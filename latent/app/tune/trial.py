"""One trial of ``latent tune``: the recipe with the sampled values, trained by the project's one
training loop (``latent train``'s entry, :func:`latent.app.validation.train_run`) into
``<out>/trials/NNNN/``; its value is the native-grid validation MAE in HU that selects ``best/``.

Each validation's MAE is reported to Optuna; when the pruner says so the loop stops at that step
and the trial is PRUNED. Any error fails the trial (its reason recorded) and the study goes on.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from latent.app.tune.space import SearchSpace, with_values
from latent.app.tune.study import INTERRUPTED
from latent.core.errors import BadConfigError, one_line, user_message


@dataclass(frozen=True)
class TrialPlan:
    """What every trial of a study shares."""

    #: the recipe as a dict, the command line's dotted overrides applied.
    raw: dict[str, Any]
    space: SearchSpace
    out: Path
    #: ``train.max_seconds`` of each trial (None: the recipe's budget).
    trial_seconds: float | None = None
    pruner: str = "median"


@dataclass(frozen=True)
class TrialOutcome:
    """How one trial ended (for the progress line)."""

    number: int
    state: TrialState
    value: float | None
    reason: str
    seconds: float

    def line(self) -> str:
        """``trial 3: complete, val MAE 131.2 HU (45 s)`` or the reason it was pruned / failed."""
        what = (f"complete, val MAE {self.value:.1f} HU" if self.state == TrialState.COMPLETE
                else f"{self.state.name.lower()}: {self.reason}")
        return f"trial {self.number}: {what} ({self.seconds:.0f} s)"


def trial_dir(out: Path, number: int) -> Path:
    """``<out>/trials/NNNN``: the trial's run folder."""
    return Path(out) / "trials" / f"{number:04d}"


def trial_config(plan: TrialPlan, values: dict[str, Any], run_dir: Path):
    """The validated ``TrainConfig`` of one trial."""
    from latent.translate.train import parse_config

    budget = {} if plan.trial_seconds is None else {"train.max_seconds": plan.trial_seconds}
    return parse_config(with_values(plan.raw, {**values, **budget, "run_dir": str(run_dir)}))


def best_validation_mae(run_dir: Path) -> float:
    """The lowest validation MAE of a finished run (``final/trainer_state.json``).

    Raises:
        BadConfigError: the run never validated (no validation cases).
    """
    state = json.loads((run_dir / "final" / "trainer_state.json").read_text())
    if state.get("best_metric") is None:
        raise BadConfigError(f"{run_dir}: no validation MAE (the split has no validation cases, or the run "
                             "stopped before its first validation)")
    return float(state["best_metric"])


def run_trial(study: optuna.Study, plan: TrialPlan) -> TrialOutcome:
    """Ask the study for a trial, train it, tell the study how it ended."""
    from latent.app.validation import train_run

    trial = study.ask()
    run_dir = trial_dir(plan.out, trial.number)
    trial.set_user_attr("run_dir", str(run_dir))
    started = time.monotonic()
    stopped: dict[str, float] = {}

    def on_validation(step: int, metrics: dict[str, float]) -> bool:
        trial.report(metrics["mae"], step)
        if trial.should_prune():
            stopped.update(step=step, mae=metrics["mae"])
            return True
        return False

    value, state, reason = None, TrialState.COMPLETE, ""
    try:
        config = trial_config(plan, plan.space.suggest(trial), run_dir)
        train_run(config, quiet=True, on_validation=on_validation)
        if stopped:
            state = TrialState.PRUNED
            reason = (f"pruned by the {plan.pruner} pruner at step {int(stopped['step'])} "
                      f"(val MAE {stopped['mae']:.1f} HU)")
        else:
            value = best_validation_mae(run_dir)
    except KeyboardInterrupt:
        _tell(study, trial, TrialState.FAIL, None, INTERRUPTED, time.monotonic() - started)
        raise
    except Exception as error:  # noqa: BLE001 - a failed trial never stops the study; its reason is kept
        state, reason = TrialState.FAIL, user_message(error) or f"{type(error).__name__}: {one_line(error)}"
    seconds = time.monotonic() - started
    _tell(study, trial, state, value, reason, seconds)
    return TrialOutcome(trial.number, state, value, reason, seconds)


def _tell(study: optuna.Study, trial: optuna.Trial, state: TrialState, value: float | None, reason: str,
          seconds: float) -> None:
    trial.set_user_attr("seconds", round(seconds, 3))
    if reason:
        trial.set_user_attr("reason", reason)
    if state == TrialState.COMPLETE:
        study.tell(trial, value)
    else:
        study.tell(trial, state=state)
