"""One training loop for every model the project trains: the translation families and the VAE.

A model plugs in as a :class:`TrainingTask` (how to run one micro-batch, validate, save the best
weights); :func:`run_loop` owns everything that must behave the same for all of them:

- budgets: ``max_steps`` optimiser steps and/or ``max_seconds`` of this call's loop, the stop
  decided collectively so that every process stops at the same step;
- seeding: every micro-batch reseeds the RNGs from (seed, micro-step), and the data order is a
  function of (seed, epoch) only, so a resumed run logs the same losses as an uninterrupted one;
- checkpoints: ``run_dir/checkpoints/step_NNNNNNN/`` (``accelerator.save_state`` plus
  ``trainer_state.json``, written last: a folder without it is incomplete and never resumed),
  the oldest removed beyond ``keep_checkpoints``;
- resume: ``False`` refuses a folder that holds a run (:mod:`latent.core.run_folder`; ``overwrite``
  replaces it), ``True`` continues from the latest complete checkpoint (fresh when the folder holds
  no run), a path continues from that folder; every checkpoint file is read before anything is written;
- logging: ``run_dir/metrics.jsonl`` (window means of the losses, validation metrics; records
  past the resumed step are dropped) and optionally TensorBoard through Accelerate;
- validation: every ``val_every`` steps and at the end; the lowest ``selection_metric`` wins
  and the task saves those weights; an optional ``on_validation(step, metrics)`` callback sees
  each validation and may stop the run there (a hyperparameter search's pruner, ``latent tune``).

The loop lives in the core because the VAE (core) and the translation models (a stage) share it;
it knows no model, data set or file format (docs/architecture.md).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch

from latent.core.errors import BadConfigError, BadFileError
from latent.core.run_folder import (  # noqa: F401 - re-exported: the loop's names for run folders
    CHECKPOINT_DIR, TRAINER_STATE, NoCheckpointError, RunExistsError, check_resume_flags, clear_run_records,
    read_trainer_state, refuse_finished_run, run_records, validate_checkpoint,
)

METRICS_FILE = "metrics.jsonl"
#: Checkpoint folders sort by step when zero-padded to this width.
STEP_DIGITS = 7


class NonFiniteLossError(BadConfigError, ArithmeticError):
    """A training loss became NaN or infinite; the run stops before saving that step."""


def scheduled_lr(base_lr: float, step: int, *, warmup_steps: int, schedule: str, max_steps: int | None,
                 min_lr_ratio: float) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warmup, then constant or cosine.

    The cosine runs from ``base_lr`` down to ``base_lr * min_lr_ratio`` at ``max_steps``; without
    ``max_steps`` (a time budget only) the rate stays constant after the warmup.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "none" or max_steps is None:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    floor = base_lr * min_lr_ratio
    return floor + 0.5 * (base_lr - floor) * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LRSchedule:
    """Every model's learning-rate schedule (the translation families and the VAE): peak ``lr``,
    linear warmup, then constant or cosine down to ``min_lr_ratio`` x ``lr`` at ``max_steps``."""

    lr: float
    warmup_steps: int = 0
    schedule: str = "none"
    max_steps: int | None = None
    min_lr_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (0-based)."""
        return scheduled_lr(self.lr, step, warmup_steps=self.warmup_steps, schedule=self.schedule,
                            max_steps=self.max_steps, min_lr_ratio=self.min_lr_ratio)


def micro_step_seed(seed: int, micro_step: int) -> int:
    """RNG seed of one micro-batch (noise, crops, timesteps): a function of the position in the run only."""
    return (seed * 1_000_003 + micro_step * 7_919) % (2**31 - 1)


def _complete_checkpoints(run_dir: Path) -> list[Path]:
    folders = sorted((Path(run_dir) / CHECKPOINT_DIR).glob("step_*"))
    return [folder for folder in folders if (folder / TRAINER_STATE).is_file()]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Newest complete checkpoint (one whose ``trainer_state.json`` was written) or None."""
    complete = _complete_checkpoints(run_dir)
    return complete[-1] if complete else None


def resume_point(resume: bool | str, run_dir: Path, *, overwrite: bool = False, inexact: bool = False) -> Path | None:
    """The checkpoint to continue from (None: start fresh), its files read whole; nothing is written.

    Args:
        resume: False (a fresh run), True (the latest complete checkpoint of ``run_dir``) or a folder.
        overwrite: a fresh run may replace the run ``run_dir`` holds (see :func:`clear_run_records`).
        inexact: accept a checkpoint whose random state cannot be restored (warned).

    Raises:
        NoCheckpointError: ``resume`` names a folder without a complete checkpoint.
        RunExistsError: a fresh run would overwrite a run (or ``--resume`` finds only a finished one).
        DamagedCheckpointError: a checkpoint file cannot be read.
    """
    check_resume_flags(resume, overwrite)
    if isinstance(resume, str):
        folder = Path(resume)
        if not (folder / TRAINER_STATE).is_file():
            raise NoCheckpointError(f"resume: {folder} is not a complete checkpoint (no {TRAINER_STATE})")
        validate_checkpoint(folder, inexact=inexact)
        return folder
    if not resume:
        refuse_finished_run(run_dir, overwrite=overwrite)
        return None
    found = latest_checkpoint(run_dir)
    if found is None:
        held = run_records(run_dir)
        if held:
            raise RunExistsError(f"{run_dir}: --resume: no complete checkpoint to continue from, but the folder holds "
                                 f"a run ({', '.join(held)}); choose another folder, or --overwrite to replace it")
        return None
    try:
        validate_checkpoint(found, inexact=inexact)
    except BadFileError as error:
        older = [c for c in _complete_checkpoints(run_dir) if c != found]
        hint = f"; an older checkpoint can be resumed with train.resume={older[-1]}" if older else ""
        raise type(error)(f"{error}{hint}") from None
    return found


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON record as a line."""
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records logged after ``last_step`` (by an interrupted run past its last checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


@dataclass
class LoopState:
    """Where a run stands; written into every checkpoint's ``trainer_state.json``."""

    step: int = 0
    micro_step: int = 0
    epoch: int = 0
    position: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    num_processes: int = 1
    #: the task's own state (loss history, architecture, ...), from :meth:`TrainingTask.extra_state`.
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, checkpoint: Path) -> "LoopState":
        """The state stored in a checkpoint folder."""
        values = read_trainer_state(checkpoint)
        values.setdefault("best_metric", values.get("best_mae"))  # checkpoints written before the shared loop
        known = {name: values[name] for name in cls.__dataclass_fields__ if name in values}
        return cls(**known)


@dataclass(frozen=True)
class LoopSettings:
    """What :func:`run_loop` needs from a model's typed config."""

    run_dir: Path
    seed: int = 0
    max_steps: int | None = 1000
    max_seconds: float | None = None
    log_every: int = 10
    checkpoint_every: int = 500
    #: also a checkpoint once this many seconds have passed since the last one (runs under a
    #: wall-clock limit lose at most this much); None = by steps only.
    checkpoint_seconds: float | None = None
    keep_checkpoints: int = 2
    #: validation period in steps; None = only at the end.
    val_every: int | None = None
    #: the validation metric whose lowest value selects the weights the task saves as best.
    selection_metric: str = "mae"
    tensorboard: bool = False
    #: a fresh run removes the earlier run's records first (``--overwrite``; :func:`clear_run_records`).
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.max_steps is None and self.max_seconds is None:
            raise ValueError("max_steps and max_seconds are both unset: set at least one")


class TrainingTask(Protocol):
    """A model as the loop sees it. Validation and saving are called on the main process only."""

    def epoch_length(self) -> int | None:
        """Micro-batches per epoch; None when the task samples its own batches without end."""

    def batches(self, epoch: int, position: int) -> Iterable[Any]:
        """The micro-batches of ``epoch`` from index ``position`` on (a function of seed and epoch)."""

    def train_micro_batch(self, batch: Any, step: int) -> tuple[dict[str, float], bool]:
        """Forward, backward and (when gradients sync) optimiser steps; losses and whether a step ended."""

    def learning_rate(self, step: int) -> float:
        """The learning rate of optimiser step ``step`` (for the log)."""

    def validate(self, step: int) -> dict[str, float] | None:
        """Validation metrics (must hold the selection metric); None when nothing validates."""

    def save_best(self, step: int, metrics: dict[str, float]) -> None:
        """Save the weights that just scored the lowest selection metric."""

    def extra_state(self) -> dict[str, Any]:
        """JSON-able state to keep in the checkpoint beside the loop's."""

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        """Restore :meth:`extra_state` from a checkpoint."""


def run_loop(accelerator: Any, task: TrainingTask, settings: LoopSettings, checkpoint: Path | None = None, *,
             quiet: bool = False, desc: str = "train", before_start: Callable[[], None] | None = None,
             on_validation: Callable[[int, dict[str, float]], bool] | None = None) -> LoopState:
    """Train ``task`` until its step or time budget is spent; return the final state.

    Args:
        accelerator: the run's ``accelerate.Accelerator`` (model and optimisers prepared, anything
            else to checkpoint registered with ``register_for_checkpointing``).
        task: the model's side of the loop.
        settings: budgets, periods and the run folder.
        checkpoint: a complete checkpoint to continue from (see :func:`resume_point`), or None.
        quiet: no progress bar.
        desc: progress-bar label.
        before_start: called on the main process once the checkpoint has loaded (and, with
            ``settings.overwrite``, the earlier run's records are gone), before the loop writes
            anything: the task writes its run records here, so a failed resume leaves them untouched.
        on_validation: called on the main process after each validation with the step and the
            metrics; True stops the run at this step on every process (checkpointed as at the end).

    Returns:
        The state after the last step; a checkpoint of it is in ``run_dir/checkpoints``. The
        caller saves its final weights, then calls ``accelerator.end_training()`` (which also
        ends the process group of a launched run).
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    run_dir, is_main = Path(settings.run_dir), accelerator.is_main_process
    state = LoopState(num_processes=accelerator.num_processes)
    if checkpoint is not None:
        try:
            accelerator.load_state(str(checkpoint))
        except (OSError, RuntimeError, ValueError, KeyError, EOFError) as error:  # files were read whole before
            raise BadFileError(f"{checkpoint}: cannot be loaded into this run ({type(error).__name__}); "
                               "the checkpoint does not fit the recipe") from error
        state = LoopState.read(checkpoint)
        task.load_extra_state(state.extra)
    metrics_path = run_dir / METRICS_FILE
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if checkpoint is None and settings.overwrite:
            clear_run_records(run_dir)
        if before_start is not None:
            before_start()
        if checkpoint is None:
            metrics_path.write_text("")
        else:
            truncate_metrics(metrics_path, state.step)
    accelerator.wait_for_everyone()
    if settings.tensorboard:
        accelerator.init_trackers("tensorboard")
    best = math.inf if state.best_metric is None else state.best_metric
    start = time.monotonic()

    def log(record: dict[str, Any]) -> None:
        if is_main:
            append_jsonl(metrics_path, record)
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def save_checkpoint() -> None:
        folder = run_dir / CHECKPOINT_DIR / f"step_{state.step:0{STEP_DIGITS}d}"
        accelerator.save_state(str(folder))
        accelerator.wait_for_everyone()
        if is_main:
            state.best_metric = None if math.isinf(best) else best
            state.num_processes = accelerator.num_processes
            state.extra = task.extra_state()
            (folder / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=2) + "\n")  # marks it complete
            complete = [f for f in sorted((run_dir / CHECKPOINT_DIR).glob("step_*")) if (f / TRAINER_STATE).is_file()]
            for old in complete[:-settings.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def validate() -> bool:
        nonlocal best
        stop = False
        if is_main:
            metrics = task.validate(state.step)
            if metrics is not None:
                metrics = {k: float(v) for k, v in metrics.items()}
                log({"step": state.step, "elapsed_s": round(time.monotonic() - start, 3),
                     **{f"val/{k}": v for k, v in metrics.items()}})
                if metrics[settings.selection_metric] < best:
                    best, state.best_step = metrics[settings.selection_metric], state.step
                    task.save_best(state.step, metrics)
                stop = on_validation is not None and bool(on_validation(state.step, metrics))
        if on_validation is not None:  # every process stops at the same step
            stop = bool(accelerator.reduce(torch.tensor([float(stop)], device=accelerator.device), "max").item())
        accelerator.wait_for_everyone()
        return stop

    max_steps = math.inf if settings.max_steps is None else settings.max_steps
    progress = tqdm(total=settings.max_steps, initial=state.step, disable=quiet or not is_main, desc=desc)
    window: dict[str, float] = {}
    window_micro = window_steps = 0
    diverged: str | None = None  # the first non-finite loss of this process
    last_checkpoint, done = state.step, state.step >= max_steps
    last_checkpoint_time = time.monotonic()
    while not done:
        length = task.epoch_length()
        if length is not None and state.position >= length:  # resumed exactly at the end of an epoch
            state.epoch, state.position = state.epoch + 1, 0
        for batch in task.batches(state.epoch, state.position):
            set_seed(micro_step_seed(settings.seed, state.micro_step), device_specific=True)
            state.position, state.micro_step = state.position + 1, state.micro_step + 1
            losses, stepped = task.train_micro_batch(batch, state.step)
            for name, value in losses.items():
                window[name] = window.get(name, 0.0) + float(value)
                if name.split("/")[-1] == "loss" and not math.isfinite(value) and diverged is None:
                    diverged = f"{name} = {value}"
            window_micro += 1
            if not stepped:
                continue
            state.step += 1
            window_steps += 1
            progress.update(1)
            now = time.monotonic()
            elapsed = now - start
            time_up = settings.max_seconds is not None and elapsed >= settings.max_seconds
            save_due = (settings.checkpoint_seconds is not None
                        and now - last_checkpoint_time >= settings.checkpoint_seconds)
            # Every process must stop (and save) at the same step: take the decisions collectively.
            flags = accelerator.reduce(torch.tensor([float(time_up), float(diverged is not None), float(save_due)],
                                                    device=accelerator.device), "max").tolist()
            if flags[1]:
                kept = latest_checkpoint(run_dir)
                raise NonFiniteLossError(
                    f"{run_dir}: training loss is not finite at step {state.step} ({diverged or 'on another process'}); "
                    f"{f'{kept.name} is the last checkpoint' if kept else 'no checkpoint was written'} "
                    "(try train.mixed_precision: no, or a lower model.lr)")
            time_up = bool(flags[0])
            done = state.step >= max_steps or time_up
            if state.step % settings.log_every == 0 or done:
                names = sorted(window)
                means = accelerator.reduce(torch.tensor([window[n] / window_micro for n in names],
                                                        device=accelerator.device), "mean")
                record = {"step": state.step, "epoch": state.epoch, "lr": task.learning_rate(state.step - 1),
                          "mixed_precision": accelerator.mixed_precision, "elapsed_s": round(elapsed, 3),
                          **dict(zip(names, means.tolist()))}
                log(record)
                progress.set_postfix({name: f"{record[name]:.4g}" for name in names if name.split("/")[-1] == "loss"})
                window, window_micro, window_steps = {}, 0, 0
            if done or (settings.val_every and state.step % settings.val_every == 0):
                done = validate() or done
            if state.step % settings.checkpoint_every == 0 or done or flags[2]:
                save_checkpoint()
                last_checkpoint, last_checkpoint_time = state.step, time.monotonic()
            if done:
                break
        else:
            state.epoch, state.position = state.epoch + 1, 0
    progress.close()
    if last_checkpoint != state.step or latest_checkpoint(run_dir) is None:  # nothing ran (resumed at the end)
        save_checkpoint()
    state.best_metric = None if math.isinf(best) else best
    accelerator.wait_for_everyone()
    return state
