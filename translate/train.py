"""Train any translation model: one loop, Accelerate for devices, precision, checkpoints and resume.

    accelerate launch translate/train.py --config configs/l2l_ddim_demo.yaml train.max_steps=20
    python translate/train.py --config configs/l2sct_demo.yaml --resume model.lr=1e-4

run ``latent train`` with the same arguments (as a script this file only hands over to that
command, in the same process, so Accelerate's environment is kept); in-process:
``train(load_config("configs/x.yaml", ["train.max_steps=20"]))``. The loop is the
project's one training loop (:mod:`latent.core.training`, shared with ``latent vae fit``); this module
builds the data, the model and one optimizer per phase and hands the loop a task that, for each
phase in turn, zeroes that phase's optimizer, calls ``model(batch, phase=...)``,
back-propagates ``losses["loss"]`` and steps. It knows nothing of a model's maths.

A fresh run refuses a ``run_dir`` that already holds a run (a model or a run record, see
:mod:`latent.core.run_folder`) unless ``--overwrite`` is given; ``--resume`` reads the checkpoint whole
before anything is written. A run directory holds ``config.yaml`` / ``config.json`` (the resolved
config), ``producer.json`` (the cache producer the latents came from), ``metrics.jsonl`` (losses
and validation metrics),
``checkpoints/step_NNNNNNN/`` (``accelerator.save_state`` + ``trainer_state.json``), ``best/``
(lowest validation MAE) and ``final/`` (both ``save_pretrained`` folders), and TensorBoard logs.
With ``train.ema_decay`` an exponential moving average of the weights is kept beside them (in
every checkpoint too); validation scores the average, and ``best/`` and ``final/`` hold it.

Resume is exact: the data order depends only on (seed, epoch), the batches already consumed in
the interrupted epoch are skipped, and every micro-batch reseeds the RNGs from (seed, micro-step),
so a resumed run logs the same losses as an uninterrupted one.
"""

from __future__ import annotations

if __name__ == "__main__":  # `accelerate launch translate/train.py ...`: the one `latent train` command
    import os
    import sys

    os.execv(sys.executable, [sys.executable, "-m", "latent", "train", *sys.argv[1:]])

import json
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch.utils.data import Dataset

from latent.core.accelerator import make_accelerator
from latent.core.training import LoopSettings, LRSchedule, resume_point, run_loop
from latent.core.weight_average import update_average, weight_average
from latent.translate.data import build_cache_datasets, model_batch_keys, model_config_for_grid, train_loader, val_loader
from latent.translate.init_from import init_from_run
from latent.translate.models.base import build_model, model_class
from latent.translate.train_config import (  # noqa: F401 - re-exported: the config API lives with the trainer
    ConfigError,
    DataConfig,
    TrainConfig,
    TrainSection,
    apply_overrides,
    load_config,
    parse_config,
)
from latent.translate.validation import Validator, builtin_validator, describe_validator

logger = logging.getLogger("latent.translate.train")

#: Other processes wait at a barrier while the main process validates; NCCL's default 10 minutes
#: is shorter than a diffusion validation with K samples per case.
PROCESS_GROUP_TIMEOUT = timedelta(hours=2)


def group_learning_rate(lr: float, group: dict[str, Any], step: int) -> float:
    """A parameter group's lr: 0 before its ``frozen_steps``, then ``lr_scale`` x the scheduled lr."""
    return 0.0 if step < group.get("frozen_steps", 0) else lr * group.get("lr_scale", 1.0)


def write_run_records(run_dir: Path, config: TrainConfig, producer: dict[str, Any], precision: str) -> None:
    """``config.yaml`` / ``config.json`` (resolved; ``train.mixed_precision`` as run) and ``producer.json``."""
    resolved = config.model_dump(mode="json")
    resolved["train"]["mixed_precision"] = precision
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    (run_dir / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
    (run_dir / "producer.json").write_text(json.dumps(producer, indent=2) + "\n")


def loop_settings(config: TrainConfig, overwrite: bool = False) -> LoopSettings:
    """The shared loop's settings from a translation recipe."""
    section = config.train
    return LoopSettings(run_dir=Path(config.run_dir), seed=section.seed, max_steps=section.max_steps,
                        max_seconds=section.max_seconds, log_every=section.log_every,
                        checkpoint_every=section.checkpoint_every, checkpoint_seconds=section.checkpoint_seconds,
                        keep_checkpoints=section.keep_checkpoints,
                        val_every=section.val_every, selection_metric="mae", tensorboard=section.tensorboard,
                        overwrite=overwrite)


class TranslationTask:
    """A translation model as the shared loop sees it: one optimizer per phase, phases in order."""

    def __init__(self, config: TrainConfig, accelerator: Any, model: Any, loader: Any, epoch_sampler: Any,
                 optimizers: dict[str, torch.optim.Optimizer], phase_params: dict[str, list],
                 validator: Validator | None, val_batches: Any, average: Any = None) -> None:
        self.config, self.accelerator, self.model, self.loader = config, accelerator, model, loader
        self.epoch_sampler, self.optimizers, self.phase_params = epoch_sampler, optimizers, phase_params
        self.validator, self.val_batches, self.average = validator, val_batches, average
        self.unwrapped = accelerator.unwrap_model(model)
        self.run_dir = Path(config.run_dir)

    def kept_model(self) -> Any:
        """The weights that are validated and saved: the EMA when on, else the trained ones."""
        return self.unwrapped if self.average is None else self.average.module

    def epoch_length(self) -> int:
        return len(self.loader)

    def batches(self, epoch: int, position: int) -> Any:
        batches = self.accelerator.skip_first_batches(self.loader, position) if position else self.loader
        batches.set_epoch(epoch)  # the loader's own epoch counter, passed on to dataset crops
        self.epoch_sampler.set_epoch(epoch)
        return batches

    def learning_rate(self, step: int) -> float:
        section = self.config.train
        return LRSchedule(self.config.model.lr, section.warmup_steps, section.lr_schedule, section.max_steps,
                          section.min_lr_ratio)(step)

    def train_micro_batch(self, batch: Any, step: int) -> tuple[dict[str, float], bool]:
        section, losses_out = self.config.train, {}
        with self.accelerator.accumulate(self.model):
            for phase, optimizer in self.optimizers.items():
                for group in optimizer.param_groups:
                    group["lr"] = group_learning_rate(self.learning_rate(step), group, step)
                optimizer.zero_grad(set_to_none=True)
                losses = self.model(batch, phase=phase)
                self.accelerator.backward(losses["loss"])
                if self.accelerator.sync_gradients and section.grad_clip is not None:
                    self.accelerator.clip_grad_norm_(self.phase_params[phase], section.grad_clip)
                optimizer.step()
                prefix = "" if len(self.optimizers) == 1 else f"{phase}/"
                losses_out.update({prefix + name: float(value.detach()) for name, value in losses.items()})
        if self.average is not None and self.accelerator.sync_gradients:
            update_average(self.average, self.unwrapped)
        return losses_out, bool(self.accelerator.sync_gradients)

    def validate(self, step: int) -> dict[str, float] | None:
        if self.validator is None or self.val_batches is None:
            return None
        kept = self.kept_model()
        kept.eval()
        with self.accelerator.autocast():
            metrics = {k: float(v) for k, v in self.validator(kept, self.val_batches).items()}
        kept.train()
        return metrics

    def save_best(self, step: int, metrics: dict[str, float]) -> None:
        self.kept_model().save_pretrained(self.run_dir / "best")
        record = {"step": step, "selected_by": describe_validator(self.validator, self.unwrapped), **metrics}
        (self.run_dir / "best" / "validation.json").write_text(json.dumps(record, indent=2) + "\n")

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        return None


# ----------------------------------------------------------------------------- the run
def train(config: TrainConfig, *, train_dataset: Dataset | None = None, val_dataset: Dataset | None = None,
          validator: Validator | None = None, quiet: bool = False, overwrite: bool = False,
          resume_inexact: bool = False, on_validation: Callable[[int, dict[str, float]], bool] | None = None) -> Path:
    """Train ``config.model`` on the cache (or on the given datasets) and return the run directory.

    Args:
        config: the resolved training config.
        train_dataset / val_dataset: in-memory datasets of batch-contract items, instead of the
            cache named in ``config.data`` (tests, demos).
        validator: overrides ``config.train.validator``.
        quiet: no progress bar.
        overwrite: a fresh run may replace the run ``run_dir`` holds (its records are removed
            just before training starts); without it such a folder is refused.
        resume_inexact: resume even when the checkpoint's random state cannot be restored (warned).
        on_validation: ``(step, metrics) -> stop?`` after each validation (see
            :func:`latent.core.training.run_loop`; ``latent tune`` reports to its pruner here).

    Returns:
        ``Path(config.run_dir)`` holding ``final/`` (and ``best/`` when validation ran).

    Raises:
        RunExistsError: ``run_dir`` holds a run, and neither resume nor ``overwrite`` is asked for.
        DamagedCheckpointError: the checkpoint to resume cannot be read (nothing was written).
    """
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed

    section, run_dir = config.train, Path(config.run_dir)
    model_cls = model_class(config.model.family)
    accelerator = make_accelerator(
        section.mixed_precision,
        gradient_accumulation_steps=section.grad_accum,
        log_with="tensorboard" if section.tensorboard else None,
        project_dir=str(run_dir),
        # Multi-phase models (GANs) leave the other phases' parameters without gradients.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=len(model_cls.phases) > 1),
                         InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT)],
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(f"{launched} processes were launched but Accelerate runs {accelerator.num_processes}: "
                           "they would train independently and overwrite each other's run_dir")
    checkpoint = resume_point(section.resume, run_dir, overwrite=overwrite, inexact=resume_inexact)
    set_seed(section.seed)

    # -- data
    keys = model_batch_keys(model_cls, config.model)
    val_keys = tuple(dict.fromkeys(keys + tuple(config.data.extra_val_keys)))
    producer: dict[str, Any] = {"producer_key": None, "source": "datasets passed to train()"}
    if train_dataset is None:
        train_dataset, cached_val, producer = build_cache_datasets(config.data, keys, val_keys, section.seed)
        val_dataset = val_dataset if val_dataset is not None else cached_val
    loader = train_loader(train_dataset, config.data.batch_size, section.seed, section.num_workers)
    epoch_sampler = loader.sampler
    val_batches = None if val_dataset is None else val_loader(val_dataset, config.data.val_batch_size, section.num_workers)
    if validator is None and val_batches is not None:
        validator = builtin_validator(config)

    # -- model and one optimizer per phase
    model = build_model(model_config_for_grid(config.model, config.data, model_cls, producer))
    if config.init_from is not None:  # a resumed run starts from its checkpoint instead
        producer["init_from"] = str(config.init_from if checkpoint is not None
                                    else init_from_run(model, config.init_from))
    model.prepare_training()
    average = None if section.ema_decay is None else weight_average(model, section.ema_decay)  # before prepare()
    optimizer_class = torch.optim.AdamW if section.optimizer == "adamw" else torch.optim.Adam
    phase_params = {phase: model.phase_parameters(phase) for phase in model.phases}
    optimizers = [optimizer_class([group for group in model.optimizer_groups(phase) if group["params"]],
                                  lr=config.model.lr, betas=config.model.betas, weight_decay=section.weight_decay)
                  for phase in model.phases]
    model, loader, *optimizers = accelerator.prepare(model, loader, *optimizers)
    if average is not None:
        average.to(accelerator.device)
        accelerator.register_for_checkpointing(average)  # a resumed run continues the same average
    task = TranslationTask(config, accelerator, model, loader, epoch_sampler, dict(zip(model_cls.phases, optimizers)),
                           phase_params, validator, val_batches, average)
    if checkpoint is not None:
        logger.info("resuming from %s", checkpoint)
    state = run_loop(accelerator, task, loop_settings(config, overwrite), checkpoint, quiet=quiet, desc="train",
                     before_start=lambda: write_run_records(run_dir, config, producer, accelerator.mixed_precision),
                     on_validation=on_validation)
    if state.num_processes != accelerator.num_processes:
        logger.warning("checkpoint written by %d processes, resumed with %d: the data order differs from an "
                       "uninterrupted run", state.num_processes, accelerator.num_processes)
    if accelerator.is_main_process:
        task.kept_model().save_pretrained(run_dir / "final")
        (run_dir / "final" / "trainer_state.json").write_text(json.dumps(
            {"step": state.step, "best_step": state.best_step, "best_metric": state.best_metric}, indent=2) + "\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir
