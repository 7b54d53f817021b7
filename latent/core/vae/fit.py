"""Train a small MAISI-family VAE (MONAI ``AutoencoderKL``) on the user's own volumes.

Offline there are no MAISI weights; this VAE takes their place behind the same interface
(``load_vae(out_dir)``). One VAE serves both modalities, as MAISI's does: pass normalised MR
and CT volumes together.

By default it trains on random crops (most of them centred on a body voxel), which is several
times cheaper per step than whole volumes, with the GroupNorm layers removed (``norm="none"``):
GroupNorm statistics depend on the spatial extent, so a VAE with them that was trained on crops
behaves differently on whole volumes (docs/vae.md); without them the VAE is fully
convolutional and runs on any shape, whole or tiled. With ``norm="group"`` and a crop, the crop
is recorded as the VAE's ``inference_tile`` and encode/decode always run with that window.

The weights that are kept are an exponential moving average (EMA) of the trained ones, with a
warmup + cosine learning-rate schedule; when validation CT volumes are given, the EMA weights
with the lowest masked MAE in HU of decode(encode(CT)) on the canonical grid are the ones saved.
The steps, budgets, seeding, checkpoints, resume, logging and validation schedule are the
project's one training loop (:mod:`latent.core.training`), the same as for the translation models;
Accelerate handles device and mixed precision (``auto`` resolved by :mod:`latent.core.accelerator`).

Output directory, the run layout of every family::

    out_dir/best/                            the selected VAE (config.json + model.safetensors);
                                             load_vae(out_dir) loads it
    out_dir/final/                           the kept weights at the last step + trainer_state.json
    out_dir/fit_config.json                  resolved VAEFitConfig, steps, losses, validation,
                                             which metric and step selected the weights
    out_dir/training_grid.json               the canonical grid it was trained at (the data record)
    out_dir/metrics.jsonl                    losses and validation MAE (as every training run)
    out_dir/checkpoints/step_NNNNNNN/        accelerator state (+ EMA) + trainer_state.json (resume)

A VAE fitted by an earlier version (``config.json`` + ``model.safetensors`` at the top) still loads.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latent.core.accelerator import make_accelerator
from latent.core.errors import InputError
from latent.core.intensity import VAE_CT_MAX_HU, VAE_CT_MIN_HU
from latent.core.training import LoopSettings, LoopState, latest_checkpoint, resume_point, run_loop
from latent.core.atomic import write_text_atomic
from latent.core.vae.loading import LAYOUT_CANONICAL, LoadedVAE, build_vae, save_vae_dir
from latent.core.vae.fit_config import VAE_LEVELS, VAEFitConfig  # noqa: F401 - re-exported
from latent.core.vae.fit_data import _BatchSampler, _check_masks, _check_volumes
from latent.core.weight_average import update_average, weight_average

logger = logging.getLogger(__name__)

FIT_REPORT_FILENAME = "fit_config.json"
#: The checkpoint folder of VAE fits written before the shared loop (not resumable).
LEGACY_CHECKPOINT_DIRNAME = "checkpoint"


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over latent voxels, averaged over the batch."""
    z_mu, z_sigma = z_mu.float(), z_sigma.float()
    per_voxel = z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1
    return 0.5 * per_voxel.flatten(1).sum(dim=1).mean()


def _build_model(config: VAEFitConfig) -> torch.nn.Module:
    architecture = config.architecture()
    model = build_vae(architecture["class_name"], architecture["kwargs"], norm=config.norm).train()
    with torch.no_grad():
        # sigma ~ 1 at init makes the sampled latent pure noise and training slow (docs/vae.md).
        model.quant_conv_log_sigma.conv.bias.fill_(config.log_sigma_bias_init)
    return model


def _loaded(network: torch.nn.Module, config: VAEFitConfig) -> LoadedVAE:
    architecture = config.architecture()
    tile = architecture["inference_tile"]
    return LoadedVAE(network, "fit", architecture["class_name"], architecture["kwargs"], "", LAYOUT_CANONICAL,
                     inference_tile=None if tile is None else tuple(tile), norm=config.norm)


def _reconstruction_l1(vae: LoadedVAE, volumes: list[np.ndarray], count: int) -> list[float]:
    """Mean |x - decode(z_mu)| of ``count`` evenly spread volumes (the VAE floor, normalised units)."""
    from latent.core.vae.inference import decode, encode_mu

    vae.network.eval()
    picks = np.unique(np.linspace(0, len(volumes) - 1, num=min(count, len(volumes))).round().astype(int))
    errors = []
    for index in picks:
        x = torch.from_numpy(volumes[index])[None, None].to(vae.device)
        errors.append(float((decode(vae, encode_mu(vae, x)) - x).abs().mean()))
    return errors


@torch.no_grad()
def validation_mae_hu(vae: LoadedVAE, ct_volumes: list[np.ndarray], masks: list[np.ndarray]) -> float:
    """Masked MAE in HU of decode(encode(CT)) against the CT, both in the VAE window, on the canonical grid.

    Args:
        vae: the VAE to score (eval mode is set here).
        ct_volumes: CT volumes in the VAE's [0, 1] window (``latent.core.intensity.ct_to_vae``).
        masks: their body masks.

    Returns:
        Voxel-weighted mean absolute error in HU over all masks.
    """
    from latent.core.vae.inference import decode, encode_mu

    vae.network.eval()
    hu_per_unit = VAE_CT_MAX_HU - VAE_CT_MIN_HU
    total, count = 0.0, 0
    for volume, mask in zip(ct_volumes, masks):
        x = torch.from_numpy(volume)[None, None].to(vae.device)
        reconstruction = decode(vae, encode_mu(vae, x)).clamp(0, 1)[0, 0].cpu().numpy()
        total += float(np.abs(reconstruction - volume)[mask].sum()) * hu_per_unit
        count += int(mask.sum())
    return total / max(count, 1)


class _VAEFitTask:
    """The VAE as the shared loop sees it: it samples its own crops, seeded by (seed, step, process)."""

    def __init__(self, config: VAEFitConfig, accelerator: Any, model: torch.nn.Module, optimizer: Any,
                 ema: Any, sampler: _BatchSampler, out_dir: Path, validation: list[np.ndarray],
                 validation_masks: list[np.ndarray], adversary: tuple[Any, Any, Any] | None) -> None:
        self.config, self.accelerator, self.model, self.optimizer = config, accelerator, model, optimizer
        self.ema, self.sampler, self.out_dir = ema, sampler, out_dir
        self.validation, self.validation_masks, self.adversary = validation, validation_masks, adversary
        self.architecture = config.architecture()
        self.history: list[list[float]] = []
        self.val_history: list[list[float]] = []

    def kept_network(self) -> torch.nn.Module:
        """The weights that are kept: the EMA when on, else the trained ones."""
        return self.ema.module if self.ema is not None else self.accelerator.unwrap_model(self.model)

    def epoch_length(self) -> None:
        return None

    def batches(self, epoch: int, position: int) -> Any:
        return itertools.repeat(None)  # train_micro_batch draws its own crops

    def learning_rate(self, step: int) -> float:
        return self.config.lr_schedule_of_run(step)

    def train_micro_batch(self, batch: Any, step: int) -> tuple[dict[str, float], bool]:
        config, accelerator = self.config, self.accelerator
        # Seeded by (seed, step): a resumed run draws the same batches as an uninterrupted one.
        rng = np.random.default_rng([config.seed, step, accelerator.process_index])
        x = torch.from_numpy(self.sampler(rng)).to(accelerator.device)
        for group in self.optimizer.param_groups:
            group["lr"] = config.lr_schedule_of_run(step)
        use_adversarial = self.adversary is not None and step >= config.adversarial_start_step
        with accelerator.autocast():
            reconstruction, z_mu, z_sigma = self.model(x)
            l1 = (reconstruction.float() - x).abs().mean()
            loss = l1 + config.kl_weight * kl_divergence(z_mu, z_sigma)
            if use_adversarial:
                discriminator, _, adversarial_loss = self.adversary
                logits_fake = discriminator(reconstruction)[-1]
                loss = loss + config.adversarial_weight * adversarial_loss(
                    logits_fake, target_is_real=True, for_discriminator=False
                )
        self.optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        self.optimizer.step()
        if self.ema is not None:
            update_average(self.ema, accelerator.unwrap_model(self.model))
        losses = {"loss": float(loss.detach()), "l1": float(l1.detach())}
        if use_adversarial:
            discriminator, optimizer_d, adversarial_loss = self.adversary
            with accelerator.autocast():
                loss_d = 0.5 * (
                    adversarial_loss(discriminator(reconstruction.detach())[-1], False, for_discriminator=True)
                    + adversarial_loss(discriminator(x)[-1], True, for_discriminator=True)
                )
            optimizer_d.zero_grad(set_to_none=True)
            accelerator.backward(loss_d)
            optimizer_d.step()
            losses["discriminator/loss"] = float(loss_d.detach())
        self.history.append([step + 1, round(losses["l1"], 6)])
        return losses, True

    def validate(self, step: int) -> dict[str, float] | None:
        if not self.validation:
            return None
        network = self.kept_network()
        mae = validation_mae_hu(_loaded(network, self.config), self.validation, self.validation_masks)
        network.train()
        self.val_history.append([step, round(mae, 3)])
        logger.info("step %d: validation CT MAE %.1f HU", step, mae)
        return {"mae": mae}

    def save_model(self, which: str) -> None:
        """The kept weights as the model folder ``out_dir/<which>`` (``best`` or ``final``)."""
        save_vae_dir(self.kept_network(), {**self.architecture, "name": f"vae-fit-{self.out_dir.resolve().name}"},
                     self.out_dir / which)

    def save_best(self, step: int, metrics: dict[str, float]) -> None:
        self.save_model("best")

    def extra_state(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "history": self.history, "val_history": self.val_history}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        self.history, self.val_history = list(extra.get("history", [])), list(extra.get("val_history", []))


def _checkpoint_to_resume(out_dir: Path, resume: bool, architecture: dict[str, Any], *, overwrite: bool = False,
                          inexact: bool = False) -> Path | None:
    """The shared loop's resume rule, plus the VAE's checks (architecture, pre-loop checkpoints)."""
    if resume is True and latest_checkpoint(out_dir) is None and (out_dir / LEGACY_CHECKPOINT_DIRNAME).is_dir():
        raise InputError(f"{out_dir / LEGACY_CHECKPOINT_DIRNAME}: a checkpoint of an earlier version of fit_vae, "
                         f"not resumable here; start a fresh fit in another folder")
    checkpoint = resume_point(resume, out_dir, overwrite=overwrite, inexact=inexact)
    if checkpoint is not None and LoopState.read(checkpoint).extra.get("architecture") != architecture:
        raise ValueError(f"the checkpoint in {out_dir} is of another architecture than this config: use another dir")
    return checkpoint


def fit_vae(
    volumes: Sequence[np.ndarray],
    out_dir: str | os.PathLike,
    config: VAEFitConfig,
    resume: bool = False,
    *,
    masks: Sequence[np.ndarray] | None = None,
    val_ct: Sequence[np.ndarray] = (),
    val_masks: Sequence[np.ndarray] = (),
    quiet: bool = False,
    overwrite: bool = False,
    resume_inexact: bool = False,
) -> Path:
    """Train a small ``AutoencoderKL`` with L1 + kl_weight * KL (+ optional patch adversarial loss).

    Args:
        volumes: normalised float32 (z, y, x) arrays on the canonical grid (sizes multiples of
            the downsample factor; MR ~[0, 1+], CT [0, 1]); shapes may differ.
        out_dir: output directory (see module docstring).
        config: training settings; stops at ``max_steps`` or after ``time_budget_s`` seconds of
            training in this call, whichever comes first (model setup, the final save and the
            final evaluation are not counted).
        resume: continue from the latest checkpoint in ``out_dir`` (step count, weights, EMA,
            optimiser, RNG); with none there, start afresh.
        masks: body masks of ``volumes`` (crops are centred on the body); None = uniform crops.
        val_ct / val_masks: validation CT volumes in the VAE window with their body masks; the
            EMA weights with the lowest :func:`validation_mae_hu` are kept. Empty: the last.
        quiet: no progress bar.
        overwrite: a fresh fit may replace the run ``out_dir`` holds (removed just before training).
        resume_inexact: resume even when the random state cannot be restored (warned).

    Returns:
        ``out_dir``, loadable with ``latent.core.vae.loading.load_vae(str(out_dir))``.

    Raises:
        FileExistsError: ``out_dir`` already holds a run (a model or a run record) and neither
            ``resume`` nor ``overwrite`` is given.
        ValueError: bad volumes, or a checkpoint of another architecture.
    """
    from accelerate.utils import set_seed

    out_dir = Path(out_dir)
    data = _check_volumes(volumes, config.downsample_factor)
    body = _check_masks(masks, data, "training")
    validation = _check_volumes(val_ct, config.downsample_factor, "validation CT") if len(val_ct) else []
    validation_masks = _check_masks(val_masks, validation, "validation") if validation else []
    if len(validation) > config.val_cases:
        picks = np.unique(np.linspace(0, len(validation) - 1, num=config.val_cases).round().astype(int))
        validation, validation_masks = [validation[i] for i in picks], [validation_masks[i] for i in picks]
    if config.crop is not None:
        too_small = [i for i, v in enumerate(data) if any(s < c for s, c in zip(v.shape, config.crop))]
        if too_small:
            raise ValueError(f"crop {config.crop} is larger than volume {too_small[0]} {data[too_small[0]].shape}")
    smallest = min(min(v.shape) for v in data) if config.crop is None else min(config.crop)
    if config.adversarial and smallest < 2 ** (config.discriminator_layers + 2):
        raise ValueError(
            f"discriminator_layers={config.discriminator_layers} needs every volume side >= "
            f"{2 ** (config.discriminator_layers + 2)}, smallest is {smallest}: use fewer layers"
        )
    checkpoint = _checkpoint_to_resume(out_dir, resume, config.architecture(), overwrite=overwrite,
                                       inexact=resume_inexact)
    out_dir.mkdir(parents=True, exist_ok=True)

    set_seed(config.seed)
    accelerator = make_accelerator(config.mixed_precision, cpu=config.cpu,
                                   log_with="tensorboard" if config.tensorboard else None, project_dir=str(out_dir))
    model = _build_model(config)
    ema = weight_average(model, config.ema_decay) if config.ema_decay else None
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    adversary = None
    if config.adversarial:
        from monai.losses import PatchAdversarialLoss
        from monai.networks.nets import PatchDiscriminator

        discriminator = PatchDiscriminator(spatial_dims=3, num_layers_d=config.discriminator_layers,
                                           channels=config.discriminator_channels, in_channels=1, norm="INSTANCE")
        optimizer_d = torch.optim.Adam(discriminator.parameters(), lr=config.lr)
        model, optimizer, discriminator, optimizer_d = accelerator.prepare(model, optimizer, discriminator, optimizer_d)
        adversary = (discriminator, optimizer_d, PatchAdversarialLoss(criterion="least_squares"))
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)

    sampler = _BatchSampler(data, config.batch_size, config.flip_augment, config.crop, body, config.body_crop_fraction)
    task = _VAEFitTask(config, accelerator, model, optimizer, ema, sampler, out_dir, validation, validation_masks,
                       adversary)
    settings = LoopSettings(run_dir=out_dir, seed=config.seed, max_steps=config.max_steps,
                            max_seconds=config.time_budget_s, log_every=config.log_every,
                            checkpoint_every=config.checkpoint_every, checkpoint_seconds=config.checkpoint_seconds,
                            keep_checkpoints=1, val_every=config.val_every,
                            selection_metric="mae", tensorboard=config.tensorboard, overwrite=overwrite)
    model.train()
    start_time = time.monotonic()
    state = run_loop(accelerator, task, settings, checkpoint, quiet=quiet, desc="vae fit")
    train_seconds = time.monotonic() - start_time
    accelerator.end_training()

    if not accelerator.is_main_process:
        return out_dir
    if not validation:
        task.save_best(state.step, {})
    task.save_model("final")
    write_text_atomic(out_dir / "final" / "trainer_state.json", json.dumps(
        {"step": state.step, "best_step": state.best_step if validation else state.step,
         "best_metric": state.best_metric}, indent=2) + "\n")
    from latent.core.vae.loading import load_vae

    selected = load_vae(str(out_dir / "best"), device=accelerator.device)
    final_l1 = _reconstruction_l1(selected, data, config.final_eval_volumes)
    report = {
        "config": config.model_dump(mode="json"),
        "architecture": task.architecture,
        "mixed_precision": accelerator.mixed_precision,
        "steps": state.step,
        "selected_by": "validation CT MAE in HU (canonical grid, VAE window)" if validation else "last step (no validation CT)",
        "selected_step": state.best_step if validation else state.step,
        "selected_val_mae_hu": None if state.best_metric is None else round(state.best_metric, 3),
        "val_history": task.val_history,
        "train_seconds_this_call": round(train_seconds, 2),
        "device": str(accelerator.device),
        "num_volumes": len(data),
        "num_val_volumes": len(validation),
        "final_l1_mean": float(np.mean(final_l1)) if final_l1 else None,
        "final_l1_evaluated": [round(v, 6) for v in final_l1],
        "loss_history": task.history,
    }
    (out_dir / FIT_REPORT_FILENAME).write_text(json.dumps(report, indent=2) + "\n")
    logger.info("VAE fit done: %d steps in %.0f s, selected step %s (%s)", state.step, train_seconds,
                report["selected_step"], report["selected_by"])
    return out_dir
