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
Accelerate handles device, mixed precision (``auto`` resolved by :mod:`latent.accelerator`) and
checkpoints.

Output directory::

    out_dir/config.json, model.safetensors   the selected VAE (load_vae(out_dir))
    out_dir/fit_config.json                  resolved VAEFitConfig, steps, losses, validation,
                                             which metric and step selected the weights
    out_dir/checkpoint/                      accelerator state (+ EMA) + trainer_state.json (resume)
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from latent.accelerator import make_accelerator
from latent.intensity import VAE_CT_MAX_HU, VAE_CT_MIN_HU
from latent.vae import LAYOUT_CANONICAL, LoadedVAE, build_vae, save_vae_dir
from latent.vae_fit_config import VAE_LEVELS, VAEFitConfig, learning_rate  # noqa: F401 - re-exported
from latent.vae_fit_data import _BatchSampler, _check_masks, _check_volumes

logger = logging.getLogger(__name__)

CHECKPOINT_DIRNAME = "checkpoint"
TRAINER_STATE_FILENAME = "trainer_state.json"
FIT_REPORT_FILENAME = "fit_config.json"
#: Loss smoothing for the progress display only.
LOSS_EMA = 0.9


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


def _ema_average(decay: float):
    """EMA update for ``AveragedModel``: the decay ramps up over the first steps (early weights fade fast)."""

    def average(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        effective = min(decay, (1.0 + float(num_averaged)) / (10.0 + float(num_averaged)))
        return averaged * effective + current * (1.0 - effective)

    return average


def _read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / TRAINER_STATE_FILENAME
    if not path.is_file():
        raise ValueError(f"{checkpoint} has no {TRAINER_STATE_FILENAME}: not a checkpoint written by fit_vae")
    return json.loads(path.read_text())


def _save_checkpoint(accelerator: Any, out_dir: Path, state: dict[str, Any]) -> None:
    """accelerator.save_state + step counter, swapped in so a crash never leaves half a checkpoint."""
    final, staging, old = (out_dir / f"{CHECKPOINT_DIRNAME}{s}" for s in ("", ".tmp", ".old"))
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    (staging / TRAINER_STATE_FILENAME).write_text(json.dumps(state, indent=2))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def _loaded(network: torch.nn.Module, config: VAEFitConfig) -> LoadedVAE:
    architecture = config.architecture()
    tile = architecture["inference_tile"]
    return LoadedVAE(network, "fit", architecture["class_name"], architecture["kwargs"], "", LAYOUT_CANONICAL,
                     inference_tile=None if tile is None else tuple(tile), norm=config.norm)


def _reconstruction_l1(vae: LoadedVAE, volumes: list[np.ndarray], count: int) -> list[float]:
    """Mean |x - decode(z_mu)| of ``count`` evenly spread volumes (the VAE floor, normalised units)."""
    from latent.vae_inference import decode, encode_mu

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
        ct_volumes: CT volumes in the VAE's [0, 1] window (``latent.intensity.ct_to_vae``).
        masks: their body masks.

    Returns:
        Voxel-weighted mean absolute error in HU over all masks.
    """
    from latent.vae_inference import decode, encode_mu

    vae.network.eval()
    hu_per_unit = VAE_CT_MAX_HU - VAE_CT_MIN_HU
    total, count = 0.0, 0
    for volume, mask in zip(ct_volumes, masks):
        x = torch.from_numpy(volume)[None, None].to(vae.device)
        reconstruction = decode(vae, encode_mu(vae, x)).clamp(0, 1)[0, 0].cpu().numpy()
        total += float(np.abs(reconstruction - volume)[mask].sum()) * hu_per_unit
        count += int(mask.sum())
    return total / max(count, 1)


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
) -> Path:
    """Train a small ``AutoencoderKL`` with L1 + kl_weight * KL (+ optional patch adversarial loss).

    Args:
        volumes: normalised float32 (z, y, x) arrays on the canonical grid (sizes multiples of
            the downsample factor; MR ~[0, 1+], CT [0, 1]); shapes may differ.
        out_dir: output directory (see module docstring).
        config: training settings; stops at ``max_steps`` or after ``time_budget_s`` seconds of
            training in this call, whichever comes first (model setup, the final save and the
            final evaluation are not counted).
        resume: continue from ``out_dir/checkpoint`` (step count, weights, EMA, optimiser, RNG);
            with no checkpoint there, start afresh.
        masks: body masks of ``volumes`` (crops are centred on the body); None = uniform crops.
        val_ct / val_masks: validation CT volumes in the VAE window with their body masks; the
            EMA weights with the lowest :func:`validation_mae_hu` are kept. Empty: the last.
        quiet: no progress bar.

    Returns:
        ``out_dir``, loadable with ``latent.vae.load_vae(str(out_dir))``.

    Raises:
        FileExistsError: ``out_dir`` already holds a checkpoint and ``resume`` is False.
        ValueError: bad volumes, or a checkpoint of another architecture.
    """
    from torch.optim.swa_utils import AveragedModel

    out_dir = Path(out_dir)
    checkpoint = out_dir / CHECKPOINT_DIRNAME
    data = _check_volumes(volumes, config.downsample_factor)
    body = _check_masks(masks, data, "training")
    validation = _check_volumes(val_ct, config.downsample_factor, "validation CT") if len(val_ct) else []
    validation_masks = _check_masks(val_masks, validation, "validation") if validation else []
    if len(validation) > config.val_cases:
        picks = np.unique(np.linspace(0, len(validation) - 1, num=config.val_cases).round().astype(int))
        validation, validation_masks = [validation[i] for i in picks], [validation_masks[i] for i in picks]
    architecture = config.architecture()
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
    if checkpoint.exists() and not resume:
        raise FileExistsError(f"{out_dir} already holds a training checkpoint: resume it or choose another out_dir")
    resuming = resume and checkpoint.is_dir()
    trainer_state = _read_trainer_state(checkpoint) if resuming else {}
    if resuming and trainer_state.get("architecture") != architecture:
        raise ValueError(f"the checkpoint in {out_dir} is of another architecture than this config: use another dir")
    out_dir.mkdir(parents=True, exist_ok=True)

    from accelerate.utils import set_seed

    set_seed(config.seed)
    accelerator = make_accelerator(config.mixed_precision, cpu=config.cpu)
    model = _build_model(config)
    ema = AveragedModel(model, avg_fn=_ema_average(config.ema_decay)) if config.ema_decay else None
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    prepared = [model, optimizer]
    if config.adversarial:
        from monai.losses import PatchAdversarialLoss
        from monai.networks.nets import PatchDiscriminator

        discriminator = PatchDiscriminator(
            spatial_dims=3,
            num_layers_d=config.discriminator_layers,
            channels=config.discriminator_channels,
            in_channels=1,
            norm="INSTANCE",
        )
        prepared += [discriminator, torch.optim.Adam(discriminator.parameters(), lr=config.lr)]
        adversarial_loss = PatchAdversarialLoss(criterion="least_squares")
    prepared = accelerator.prepare(*prepared)
    model, optimizer = prepared[0], prepared[1]
    if config.adversarial:
        discriminator, optimizer_d = prepared[2], prepared[3]
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)

    step, history, val_history = 0, [], []
    best_mae, best_step = math.inf, None
    if resuming:
        accelerator.load_state(str(checkpoint))
        step, history = int(trainer_state["step"]), list(trainer_state.get("history", []))
        val_history = list(trainer_state.get("val_history", []))
        best_mae = math.inf if trainer_state.get("best_mae") is None else float(trainer_state["best_mae"])
        best_step = trainer_state.get("best_step")
        logger.info("resumed VAE training from step %d", step)

    def kept_network() -> torch.nn.Module:
        return ema.module if ema is not None else accelerator.unwrap_model(model)

    def state() -> dict[str, Any]:
        return {"step": step, "history": history, "architecture": architecture, "val_history": val_history,
                "best_mae": None if math.isinf(best_mae) else best_mae, "best_step": best_step}

    def validate() -> None:
        nonlocal best_mae, best_step
        network = kept_network()
        mae = validation_mae_hu(_loaded(network, config), validation, validation_masks)
        network.train()
        val_history.append([step, round(mae, 3)])
        logger.info("step %d: validation CT MAE %.1f HU (best %.1f)", step, mae, min(mae, best_mae))
        if mae < best_mae and accelerator.is_main_process:
            best_mae, best_step = mae, step
            save_vae_dir(network, {**architecture, "name": f"vae-fit-{out_dir.resolve().name}"}, out_dir)

    sampler = _BatchSampler(data, config.batch_size, config.flip_augment, config.crop, body, config.body_crop_fraction)
    max_steps = config.max_steps if config.max_steps is not None else math.inf
    start_time = time.monotonic()
    deadline = start_time + config.time_budget_s if config.time_budget_s is not None else math.inf
    progress = tqdm(total=None if max_steps == math.inf else max_steps, initial=step, disable=quiet, desc="vae fit")
    smoothed = None
    model.train()
    while step < max_steps and time.monotonic() < deadline:
        # Seeded by (seed, step): a resumed run draws the same batches as an uninterrupted one.
        rng = np.random.default_rng([config.seed, step, accelerator.process_index])
        x = torch.from_numpy(sampler(rng)).to(accelerator.device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        use_adversarial = config.adversarial and step >= config.adversarial_start_step
        with accelerator.autocast():
            reconstruction, z_mu, z_sigma = model(x)
            l1 = (reconstruction.float() - x).abs().mean()
            loss = l1 + config.kl_weight * kl_divergence(z_mu, z_sigma)
            if use_adversarial:
                logits_fake = discriminator(reconstruction)[-1]
                loss = loss + config.adversarial_weight * adversarial_loss(
                    logits_fake, target_is_real=True, for_discriminator=False
                )
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        if ema is not None:
            ema.update_parameters(accelerator.unwrap_model(model))
        if use_adversarial:
            with accelerator.autocast():
                loss_d = 0.5 * (
                    adversarial_loss(discriminator(reconstruction.detach())[-1], False, for_discriminator=True)
                    + adversarial_loss(discriminator(x)[-1], True, for_discriminator=True)
                )
            optimizer_d.zero_grad(set_to_none=True)
            accelerator.backward(loss_d)
            optimizer_d.step()
        step += 1
        value = float(l1.detach())
        smoothed = value if smoothed is None else LOSS_EMA * smoothed + (1 - LOSS_EMA) * value
        history.append([step, round(value, 6)])
        progress.update(1)
        progress.set_postfix(l1=f"{smoothed:.4f}")
        if validation and step % config.val_every == 0:
            validate()
        if step % config.checkpoint_every == 0:
            _save_checkpoint(accelerator, out_dir, state())
            logger.info("step %d: l1 %.4f (checkpoint saved)", step, smoothed)
    progress.close()
    train_seconds = time.monotonic() - start_time
    if validation and (not val_history or val_history[-1][0] != step):
        validate()
    _save_checkpoint(accelerator, out_dir, state())

    if not accelerator.is_main_process:
        return out_dir
    if not validation:
        save_vae_dir(kept_network(), {**architecture, "name": f"vae-fit-{out_dir.resolve().name}"}, out_dir)
    from latent.vae import load_vae

    selected = load_vae(str(out_dir), device=accelerator.device)
    final_l1 = _reconstruction_l1(selected, data, config.final_eval_volumes)
    report = {
        "config": config.model_dump(mode="json"),
        "architecture": architecture,
        "mixed_precision": accelerator.mixed_precision,
        "steps": step,
        "selected_by": "validation CT MAE in HU (canonical grid, VAE window)" if validation else "last step (no validation CT)",
        "selected_step": best_step if validation else step,
        "selected_val_mae_hu": None if math.isinf(best_mae) else round(best_mae, 3),
        "val_history": val_history,
        "train_seconds_this_call": round(train_seconds, 2),
        "device": str(accelerator.device),
        "num_volumes": len(data),
        "num_val_volumes": len(validation),
        "final_l1_mean": float(np.mean(final_l1)) if final_l1 else None,
        "final_l1_evaluated": [round(v, 6) for v in final_l1],
        "loss_history": history,
    }
    (out_dir / FIT_REPORT_FILENAME).write_text(json.dumps(report, indent=2) + "\n")
    logger.info(
        "VAE fit done: %d steps in %.0f s, selected step %s (%s)", step, train_seconds, report["selected_step"],
        report["selected_by"],
    )
    return out_dir
