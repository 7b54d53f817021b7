"""Train a small MAISI-family VAE (MONAI ``AutoencoderKL``) on the user's own volumes.

Offline there are no MAISI weights; this VAE takes their place behind the same interface
(``load_vae(out_dir)``). One VAE serves both modalities, as MAISI's does: pass normalised MR
and CT volumes together.

GroupNorm statistics depend on the spatial extent, so a VAE trained on small patches scores
far worse on whole volumes (DESIGN.md section 10). By default the loop therefore trains on
whole canonical volumes, one shape per batch. With ``crop`` set it trains on random crops
(about (volume / crop) times cheaper per step) and records the crop as the VAE's
``inference_tile``: encode/decode then always run it with that window, so it sees the same
statistics as in training. Accelerate handles device, mixed precision and checkpoints.

Output directory::

    out_dir/config.json, model.safetensors   the VAE (load_vae(out_dir))
    out_dir/fit_config.json                  resolved VAEFitConfig, steps, losses, final L1
    out_dir/checkpoint/                      accelerator state + trainer_state.json (resume)
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
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from latent.vae import LAYOUT_CANONICAL, LoadedVAE, save_vae_dir

logger = logging.getLogger(__name__)

CHECKPOINT_DIRNAME = "checkpoint"
TRAINER_STATE_FILENAME = "trainer_state.json"
FIT_REPORT_FILENAME = "fit_config.json"
#: Canonical grids give latents at shape / 4, i.e. three channel levels (two downsamplings).
VAE_LEVELS = 3
#: Loss smoothing for the progress display only.
LOSS_EMA = 0.9


class VAEFitConfig(BaseModel):
    """Typed settings of :func:`fit_vae`; unknown fields are refused, errors name the field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: tuple[int, ...] = Field((16, 32, 64), description="channels per level; 3 levels = x4 downsampling")
    latent_channels: int = Field(4, ge=1)
    num_res_blocks: int = Field(1, ge=1)
    norm_num_groups: int = Field(8, ge=1, description="must divide every channel count")
    lr: float = Field(3e-4, gt=0, description="3e-4 beat 1e-3 and 3e-3 at 100-1600 steps on the demo VAE "
                      "(benchmarks/results/vae_convergence_h100.md)")
    max_steps: int | None = Field(2000, ge=1, description="stop after this many optimiser steps")
    time_budget_s: float | None = Field(
        None, gt=0, description="stop training after this many seconds of this call (setup and final save excluded)"
    )
    batch_size: int = Field(1, ge=1, description="volumes per step, all of one shape")
    kl_weight: float = Field(1e-6, ge=0)
    log_sigma_bias_init: float = Field(-6.0, description="start with small posterior variance (DESIGN.md 10)")
    seed: int = 0
    checkpoint_every: int = Field(200, ge=1, description="steps between resumable checkpoints")
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    cpu: bool = Field(False, description="train on CPU even if CUDA is available")
    flip_augment: bool = Field(True, description="random left-right (x) flips")
    adversarial: bool = False
    adversarial_weight: float = Field(0.01, ge=0)
    adversarial_start_step: int = Field(0, ge=0)
    discriminator_channels: int = Field(16, ge=1)
    discriminator_layers: int = Field(3, ge=1, description="each halves the size: every side needs >= 2**(layers+2)")
    crop: tuple[int, int, int] | None = Field(
        None, description="train on random (z, y, x) crops; the VAE is then always run with this window"
    )
    final_eval_volumes: int = Field(4, ge=0, description="volumes whose posterior-mean L1 is reported at the end")

    @model_validator(mode="after")
    def _check(self) -> "VAEFitConfig":
        if len(self.channels) != VAE_LEVELS:
            raise ValueError(f"channels must have {VAE_LEVELS} entries (x4 downsampling), got {self.channels}")
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every entry of channels; {bad} not")
        if self.max_steps is None and self.time_budget_s is None:
            raise ValueError("max_steps and time_budget_s are both unset: set at least one")
        factor = 2 ** (len(self.channels) - 1)
        if self.crop is not None and any(c <= 0 or c % factor for c in self.crop):
            raise ValueError(f"crop {self.crop} must be three positive multiples of {factor}")
        return self

    @property
    def downsample_factor(self) -> int:
        """Image size / latent size."""
        return 2 ** (len(self.channels) - 1)

    def architecture(self) -> dict[str, Any]:
        """``{"class_name", "kwargs", "layout", "inference_tile"}`` of the VAE (its ``config.json``)."""
        kwargs = {
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 1,
            "channels": list(self.channels),
            "latent_channels": self.latent_channels,
            "num_res_blocks": [self.num_res_blocks] * len(self.channels),
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": 1e-6,
            "attention_levels": [False] * len(self.channels),
            "with_encoder_nonlocal_attn": False,
            "with_decoder_nonlocal_attn": False,
            "include_fc": False,
        }
        tile = None if self.crop is None else list(self.crop)
        return {"class_name": "AutoencoderKL", "kwargs": kwargs, "layout": LAYOUT_CANONICAL, "inference_tile": tile}


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over latent voxels, averaged over the batch."""
    z_mu, z_sigma = z_mu.float(), z_sigma.float()
    per_voxel = z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1
    return 0.5 * per_voxel.flatten(1).sum(dim=1).mean()


def _check_volumes(volumes: Sequence[np.ndarray], factor: int) -> list[np.ndarray]:
    if len(volumes) == 0:
        raise ValueError("fit_vae needs at least one volume")
    checked = []
    for index, volume in enumerate(volumes):
        array = np.asarray(volume, dtype=np.float32)
        if array.ndim != 3:
            raise ValueError(f"volume {index} must be 3D (z, y, x), got shape {array.shape}")
        if any(s % factor for s in array.shape):
            raise ValueError(f"volume {index} shape {array.shape} is not a multiple of {factor}: use a canonical grid")
        if not np.isfinite(array).all():
            raise ValueError(f"volume {index} holds NaN or inf")
        checked.append(np.ascontiguousarray(array))
    return checked


def _make_accelerator(config: VAEFitConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    kwargs = {"cpu": config.cpu or not torch.cuda.is_available(), "mixed_precision": config.mixed_precision}
    try:
        return Accelerator(**kwargs)
    except ValueError as exc:
        # An earlier fit in this process fixed another precision in Accelerate's process-wide
        # state; this loop owns its run, so start that state afresh.
        if "already been initialized" not in str(exc):
            raise
        AcceleratorState._reset_state(reset_partial_state=False)
        return Accelerator(**kwargs)


def _build_model(config: VAEFitConfig) -> torch.nn.Module:
    from monai.networks.nets import AutoencoderKL

    model = AutoencoderKL(**config.architecture()["kwargs"])
    with torch.no_grad():
        # sigma ~ 1 at init makes the sampled latent pure noise and training slow (DESIGN.md 10).
        model.quant_conv_log_sigma.conv.bias.fill_(config.log_sigma_bias_init)
    return model


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


class _BatchSampler:
    """Random batches (with replacement) of whole same-shape volumes or of equal crops.

    Reproducible from the generator passed in, which the loop seeds from (seed, step).
    """

    def __init__(self, volumes: list[np.ndarray], batch_size: int, flip: bool, crop: tuple[int, ...] | None) -> None:
        self.volumes, self.batch_size, self.flip, self.crop = volumes, batch_size, flip, crop
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, volume in enumerate(volumes):
            groups.setdefault(volume.shape if crop is None else (), []).append(index)
        self.groups = list(groups.values())
        self.weights = np.array([len(g) for g in self.groups], dtype=float) / len(volumes)

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        group = self.groups[rng.choice(len(self.groups), p=self.weights)]
        batch = []
        for index in rng.choice(group, size=self.batch_size, replace=True):
            volume = self.volumes[index]
            if self.crop is not None:
                start = [int(rng.integers(0, s - c + 1)) for s, c in zip(volume.shape, self.crop)]
                volume = volume[tuple(slice(b, b + c) for b, c in zip(start, self.crop))]
            if self.flip and rng.random() < 0.5:
                volume = volume[:, :, ::-1]
            batch.append(volume)
        return np.stack(batch)[:, None].copy()


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


def fit_vae(
    volumes: Sequence[np.ndarray],
    out_dir: str | os.PathLike,
    config: VAEFitConfig,
    resume: bool = False,
    *,
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
        resume: continue from ``out_dir/checkpoint`` (step count, weights, optimiser, RNG); with
            no checkpoint there, start afresh.
        quiet: no progress bar.

    Returns:
        ``out_dir``, loadable with ``latent.vae.load_vae(str(out_dir))``.

    Raises:
        FileExistsError: ``out_dir`` already holds a checkpoint and ``resume`` is False.
        ValueError: bad volumes, or a checkpoint of another architecture.
    """
    out_dir = Path(out_dir)
    checkpoint = out_dir / CHECKPOINT_DIRNAME
    data = _check_volumes(volumes, config.downsample_factor)
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
    accelerator = _make_accelerator(config)
    if accelerator.device.type == "cpu" and config.mixed_precision != "no":
        logger.warning("mixed precision on CPU: bf16 3D convolutions ran 10x+ slower than fp32 on CPUs without AMX")
    model = _build_model(config)
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

    step, history = 0, []
    if resuming:
        accelerator.load_state(str(checkpoint))
        step, history = int(trainer_state["step"]), list(trainer_state.get("history", []))
        logger.info("resumed VAE training from step %d", step)

    sampler = _BatchSampler(data, config.batch_size, config.flip_augment, config.crop)
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
        if step % config.checkpoint_every == 0:
            _save_checkpoint(accelerator, out_dir, {"step": step, "history": history, "architecture": architecture})
            logger.info("step %d: l1 %.4f (checkpoint saved)", step, smoothed)
    progress.close()
    train_seconds = time.monotonic() - start_time
    _save_checkpoint(accelerator, out_dir, {"step": step, "history": history, "architecture": architecture})

    network = accelerator.unwrap_model(model)
    if not accelerator.is_main_process:
        return out_dir
    save_vae_dir(network, {**architecture, "name": f"vae-fit-{out_dir.resolve().name}"}, out_dir)
    loaded = LoadedVAE(
        network, "fit", architecture["class_name"], architecture["kwargs"], "", LAYOUT_CANONICAL,
        inference_tile=config.crop,
    )  # fmt: skip
    final_l1 = _reconstruction_l1(loaded, data, config.final_eval_volumes)
    report = {
        "config": config.model_dump(mode="json"),
        "architecture": architecture,
        "steps": step,
        "train_seconds_this_call": round(train_seconds, 2),
        "device": str(accelerator.device),
        "num_volumes": len(data),
        "final_l1_mean": float(np.mean(final_l1)) if final_l1 else None,
        "final_l1_evaluated": [round(v, 6) for v in final_l1],
        "loss_history": history,
    }
    (out_dir / FIT_REPORT_FILENAME).write_text(json.dumps(report, indent=2) + "\n")
    logger.info(
        "VAE fit done: %d steps in %.0f s, final L1 %s",
        step,
        train_seconds,
        f"{report['final_l1_mean']:.4f}" if final_l1 else "n/a",
    )
    return out_dir
