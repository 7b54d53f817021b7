"""Train any translation model: one loop, Accelerate for devices, precision, checkpoints and resume.

    accelerate launch translate/train.py --config configs/l2l_ddim_demo.yaml train.max_steps=20
    python translate/train.py --config configs/l2sct_demo.yaml --resume model.lr=1e-4

or in-process: ``train(load_config("configs/x.yaml", ["train.max_steps=20"]))``. The loop knows
nothing of a model's maths: for every step and each of the model's phases it zeroes that phase's
optimizer, calls ``model(batch, phase=...)``, back-propagates ``losses["loss"]`` and steps.

A run directory holds ``config.yaml`` / ``config.json`` (the resolved config), ``producer.json``
(the cache producer the latents came from), ``metrics.jsonl`` (losses and validation metrics),
``checkpoints/step_NNNNNNN/`` (``accelerator.save_state`` + ``trainer_state.json``), ``best/``
(lowest validation MAE) and ``final/`` (both ``save_pretrained`` folders), and TensorBoard logs.

Resume is exact: the data order depends only on (seed, epoch), the batches already consumed in
the interrupted epoch are skipped, and every micro-batch reseeds the RNGs from (seed, micro-step),
so a resumed run logs the same losses as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: `translate/` is sys.path[0], the repo root is not
    sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import torch
import yaml
from torch.utils.data import Dataset

from latent.accelerator import make_accelerator
from latent.errors import InputError, one_line
from translate.data import build_cache_datasets, model_batch_keys, model_config_for_grid, train_loader, val_loader
from translate.models.base import build_model, model_class
from translate.train_config import (  # noqa: F401 - re-exported: the config API lives with the trainer
    ConfigError,
    DataConfig,
    TrainConfig,
    TrainSection,
    apply_overrides,
    load_config,
    parse_config,
)
from translate.validation import Validator, describe_validator, load_validator

logger = logging.getLogger("translate.train")

CHECKPOINT_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"
#: Checkpoint folders sort by step when zero-padded to this width.
STEP_DIGITS = 7
#: Other processes wait at a barrier while the main process validates; NCCL's default 10 minutes
#: is shorter than a diffusion validation with K samples per case.
PROCESS_GROUP_TIMEOUT = timedelta(hours=2)


# ----------------------------------------------------------------------------- helpers
def learning_rate(base_lr: float, step: int, section: TrainSection) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then constant or cosine."""
    if step < section.warmup_steps:
        return base_lr * (step + 1) / section.warmup_steps
    if section.lr_schedule == "none":
        return base_lr
    progress = (step - section.warmup_steps) / max(1, section.max_steps - section.warmup_steps)
    floor = base_lr * section.min_lr_ratio
    return floor + 0.5 * (base_lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def micro_step_seed(seed: int, micro_step: int) -> int:
    """RNG seed of one micro-batch (noise, timesteps): a function of the position in the run only."""
    return (seed * 1_000_003 + micro_step * 7_919) % (2**31 - 1)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Newest complete checkpoint (one whose ``trainer_state.json`` was written) or None."""
    folders = sorted((run_dir / CHECKPOINT_DIR).glob("step_*"))
    complete = [folder for folder in folders if (folder / TRAINER_STATE).is_file()]
    return complete[-1] if complete else None


def resume_point(resume: bool | str, run_dir: Path) -> Path | None:
    """The checkpoint to continue from (None: start fresh).

    Raises:
        FileNotFoundError: ``resume`` names a folder without a complete checkpoint.
        FileExistsError: a fresh run would overwrite a run that has checkpoints.
    """
    if isinstance(resume, str):
        folder = Path(resume)
        if not (folder / TRAINER_STATE).is_file():
            raise FileNotFoundError(f"train.resume: {folder} is not a complete checkpoint (no {TRAINER_STATE})")
        return folder
    found = latest_checkpoint(run_dir)
    if resume:
        return found
    if found is not None:
        raise FileExistsError(f"run_dir {run_dir} already has checkpoints: resume (--resume / train.resume=true) "
                              "or choose another run_dir")
    return None


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records logged after ``last_step`` (by an interrupted run past its last checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def write_run_records(run_dir: Path, config: TrainConfig, producer: dict[str, Any], precision: str) -> None:
    """``config.yaml`` / ``config.json`` (resolved; ``train.mixed_precision`` as run) and ``producer.json``."""
    resolved = config.model_dump(mode="json")
    resolved["train"]["mixed_precision"] = precision
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    (run_dir / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
    (run_dir / "producer.json").write_text(json.dumps(producer, indent=2) + "\n")


# ----------------------------------------------------------------------------- the loop
def train(config: TrainConfig, *, train_dataset: Dataset | None = None, val_dataset: Dataset | None = None,
          validator: Validator | None = None, quiet: bool = False) -> Path:
    """Train ``config.model`` on the cache (or on the given datasets) and return the run directory.

    Args:
        config: the resolved training config.
        train_dataset / val_dataset: in-memory datasets of batch-contract items, instead of the
            cache named in ``config.data`` (tests, demos).
        validator: overrides ``config.train.validator``.
        quiet: no progress bar.

    Returns:
        ``Path(config.run_dir)`` holding ``final/`` (and ``best/`` when validation ran).
    """
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed
    from tqdm.auto import tqdm

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
    is_main = accelerator.is_main_process
    checkpoint = resume_point(section.resume, run_dir)
    set_seed(section.seed)

    # -- data
    keys = model_batch_keys(model_cls)
    val_keys = tuple(dict.fromkeys(keys + tuple(config.data.extra_val_keys)))
    producer: dict[str, Any] = {"producer_key": None, "source": "datasets passed to train()"}
    if train_dataset is None:
        train_dataset, cached_val, producer = build_cache_datasets(config.data, keys, val_keys, section.seed)
        val_dataset = val_dataset if val_dataset is not None else cached_val
    loader = train_loader(train_dataset, config.data.batch_size, section.seed, section.num_workers)
    epoch_sampler = loader.sampler
    val_batches = None if val_dataset is None else val_loader(val_dataset, config.data.val_batch_size, section.num_workers)
    if validator is None and val_batches is not None:
        validator = load_validator(section.validator, config)

    # -- model and one optimizer per phase
    model = build_model(model_config_for_grid(config.model, config.data, model_cls, producer))
    model.prepare_training()
    optimizer_class = torch.optim.AdamW if section.optimizer == "adamw" else torch.optim.Adam
    phase_params = {phase: model.phase_parameters(phase) for phase in model.phases}
    optimizers = [optimizer_class(phase_params[phase], lr=config.model.lr, betas=config.model.betas,
                                  weight_decay=section.weight_decay) for phase in model.phases]
    model, loader, *optimizers = accelerator.prepare(model, loader, *optimizers)
    optimizer_of = dict(zip(model_cls.phases, optimizers))
    unwrapped = accelerator.unwrap_model(model)

    # -- run directory and resume state
    step, micro_step, epoch, position, best_mae, best_step = 0, 0, 0, 0, math.inf, None
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
        step, micro_step, epoch, position = state["step"], state["micro_step"], state["epoch"], state["position"]
        best_mae = math.inf if state["best_mae"] is None else state["best_mae"]
        best_step = state["best_step"]
        if state.get("num_processes", accelerator.num_processes) != accelerator.num_processes:
            logger.warning("checkpoint written by %d processes, resumed with %d: the data order differs from an "
                           "uninterrupted run", state["num_processes"], accelerator.num_processes)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", checkpoint, step, epoch, position)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_records(run_dir, config, producer, accelerator.mixed_precision)
        metrics_path = run_dir / "metrics.jsonl"
        if checkpoint is None:
            metrics_path.write_text("")
        else:
            truncate_metrics(metrics_path, step)
    accelerator.wait_for_everyone()
    if section.tensorboard:
        accelerator.init_trackers("tensorboard")

    def log(record: dict[str, Any]) -> None:
        if is_main:
            append_jsonl(run_dir / "metrics.jsonl", record)
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def save_checkpoint() -> None:
        folder = run_dir / CHECKPOINT_DIR / f"step_{step:0{STEP_DIGITS}d}"
        accelerator.save_state(str(folder))
        accelerator.wait_for_everyone()
        if is_main:
            state = {"step": step, "micro_step": micro_step, "epoch": epoch, "position": position,
                     "best_mae": None if math.isinf(best_mae) else best_mae, "best_step": best_step,
                     "num_processes": accelerator.num_processes}
            (folder / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")  # marks it complete
            complete = [f for f in sorted((run_dir / CHECKPOINT_DIR).glob("step_*")) if (f / TRAINER_STATE).is_file()]
            for old in complete[:-section.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def validate() -> None:
        nonlocal best_mae, best_step
        if validator is not None and is_main:
            unwrapped.eval()
            with accelerator.autocast():
                metrics = {k: float(v) for k, v in validator(unwrapped, val_batches).items()}
            unwrapped.train()
            log({"step": step, "elapsed_s": round(time.monotonic() - start, 3),
                 **{f"val/{k}": v for k, v in metrics.items()}})
            if metrics["mae"] < best_mae:
                best_mae, best_step = metrics["mae"], step
                unwrapped.save_pretrained(run_dir / "best")
                record = {"step": step, "selected_by": describe_validator(validator, unwrapped), **metrics}
                (run_dir / "best" / "validation.json").write_text(json.dumps(record, indent=2) + "\n")
        accelerator.wait_for_everyone()

    # -- the loop
    model.train()
    start, last_checkpoint = time.monotonic(), step
    window: dict[str, float] = {}
    window_steps = 0
    progress = tqdm(total=section.max_steps, initial=step, disable=quiet or not is_main, desc="train")
    done = step >= section.max_steps
    while not done:
        if position >= len(loader):  # resumed exactly at the end of an epoch
            epoch, position = epoch + 1, 0
        batches = accelerator.skip_first_batches(loader, position) if position else loader
        batches.set_epoch(epoch)  # the loader's own epoch counter, passed on to dataset crops
        epoch_sampler.set_epoch(epoch)
        for batch in batches:
            set_seed(micro_step_seed(section.seed, micro_step), device_specific=True)
            position, micro_step = position + 1, micro_step + 1
            with accelerator.accumulate(model):
                for phase, optimizer in optimizer_of.items():
                    for group in optimizer.param_groups:
                        group["lr"] = learning_rate(config.model.lr, step, section)
                    optimizer.zero_grad(set_to_none=True)
                    losses = model(batch, phase=phase)
                    accelerator.backward(losses["loss"])
                    if accelerator.sync_gradients and section.grad_clip is not None:
                        accelerator.clip_grad_norm_(phase_params[phase], section.grad_clip)
                    optimizer.step()
                    prefix = "" if len(optimizer_of) == 1 else f"{phase}/"
                    for name, value in losses.items():
                        window[prefix + name] = window.get(prefix + name, 0.0) + float(value.detach()) / section.grad_accum
            if not accelerator.sync_gradients:
                continue
            step += 1
            window_steps += 1
            progress.update(1)
            elapsed = time.monotonic() - start
            time_up = section.max_seconds is not None and elapsed >= section.max_seconds
            # Every process must stop at the same step: take the decision collectively.
            time_up = bool(accelerator.reduce(torch.tensor([float(time_up)], device=accelerator.device), "max").item())
            done = step >= section.max_steps or time_up
            if step % section.log_every == 0 or done:
                names = sorted(window)
                means = accelerator.reduce(torch.tensor([window[n] / window_steps for n in names],
                                                        device=accelerator.device), "mean")
                record = {"step": step, "epoch": epoch, "lr": learning_rate(config.model.lr, step - 1, section),
                          "mixed_precision": accelerator.mixed_precision,
                          "elapsed_s": round(elapsed, 3), **dict(zip(names, means.tolist()))}
                log(record)
                progress.set_postfix(loss=f"{record.get('loss', float('nan')):.4g}")
                window, window_steps = {}, 0
            if val_batches is not None and (done or (section.val_every and step % section.val_every == 0)):
                validate()
            if step % section.checkpoint_every == 0 or done:
                save_checkpoint()
                last_checkpoint = step
            if done:
                break
        else:
            epoch, position = epoch + 1, 0
    progress.close()
    if last_checkpoint != step:  # resumed at max_steps: nothing ran
        save_checkpoint()
    if is_main:
        unwrapped.save_pretrained(run_dir / "final")
        (run_dir / "final" / "trainer_state.json").write_text(json.dumps(
            {"step": step, "best_step": best_step, "best_mae": None if math.isinf(best_mae) else best_mae}, indent=2) + "\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


# ----------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    """``translate/train.py --config recipe.yaml [--resume] [--quiet] [a.b=value ...]``."""
    parser = argparse.ArgumentParser(description="Train a latent translation model (Accelerate).")
    parser.add_argument("--config", help="YAML recipe (configs/*.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of run_dir")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20 model.lr=1e-4")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides) + (["train.resume=true"] if args.resume else [])
    try:
        config = load_config(args.config, overrides)
        run_dir = train(config, quiet=args.quiet)
    except (InputError, FileNotFoundError, PermissionError, yaml.YAMLError) as error:
        # Input errors in one line (docs/architecture.md); anything else is a bug: traceback.
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
