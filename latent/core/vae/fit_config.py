"""Typed settings of ``latent vae fit`` (:class:`VAEFitConfig`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from latent.core.accelerator import MixedPrecision
from latent.core.errors import BadConfigError
from latent.core.training import LRSchedule
from latent.core.vae.network import LAYOUT_CANONICAL


#: Canonical grids give latents at shape / 4, i.e. three channel levels (two downsamplings).
VAE_LEVELS = 3


class VAEModelConfig(BaseModel):
    """The ``model`` section of a VAE recipe (``model.family: vae``): architecture, losses, crops.

    The loop's settings (steps, seconds, schedule, precision, checkpoints) are the recipe's
    ``train`` section, as for every family; :func:`vae_fit_config` puts the two together.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    family: Literal["vae"] = "vae"
    channels: tuple[int, ...] = Field((16, 32, 64), description="channels per level; 3 levels = x4 downsampling")
    latent_channels: int = Field(4, ge=1)
    num_res_blocks: int = Field(1, ge=1)
    norm_num_groups: int = Field(8, ge=1, description="must divide every channel count")
    norm: Literal["group", "none"] = Field("none", description="GroupNorm layers, or none (any shape, exact tiles)")
    lr: float = Field(5e-4, gt=0, description="peak learning rate (after warmup); the stand-in VAE used 5e-4")
    ema_decay: float | None = Field(0.995, gt=0, lt=1, description="EMA of the weights that are kept; None = off")
    kl_weight: float = Field(1e-6, ge=0)
    log_sigma_bias_init: float = Field(-6.0, description="start with small posterior variance (docs/vae.md)")
    cpu: bool = Field(False, description="train on CPU even if CUDA is available")
    flip_augment: bool = Field(True, description="random left-right (x) flips")
    adversarial: bool = False
    adversarial_weight: float = Field(0.01, ge=0)
    adversarial_start_step: int = Field(0, ge=0)
    discriminator_channels: int = Field(16, ge=1)
    discriminator_layers: int = Field(3, ge=1, description="each halves the size: every side needs >= 2**(layers+2)")
    crop: tuple[int, int, int] | None = Field(
        (32, 64, 64), description="train on random (z, y, x) crops in image voxels (None: whole volumes); with "
        "norm=group the VAE is then always run with this window"
    )
    body_crop_fraction: float = Field(0.9, ge=0, le=1, description="share of crops centred on a body voxel")
    modalities: tuple[Literal["mr", "ct"], ...] = Field(("mr", "ct"), min_length=1,
                                                         description="volumes of each training case to train on")
    val_cases: int = Field(6, ge=1, description="validation CTs used (evenly spread over those given)")
    final_eval_volumes: int = Field(4, ge=0, description="volumes whose posterior-mean L1 is reported at the end")


class VAEFitConfig(VAEModelConfig):
    """Typed settings of :func:`fit_vae`: the model section plus the loop's; unknown fields are
    refused, errors name the field. ``latent vae fit`` reads it from a recipe or a flat file."""

    lr_schedule: Literal["none", "cosine"] = Field("cosine", description="after warmup: constant or cosine to min")
    warmup_steps: int = Field(50, ge=0)
    min_lr_ratio: float = Field(0.05, ge=0, le=1, description="cosine floor as a fraction of lr")
    max_steps: int | None = Field(3000, ge=1, description="stop after this many optimiser steps (cosine length)")
    time_budget_s: float | None = Field(
        None, gt=0, description="stop training after this many seconds of this call (setup and final save excluded)"
    )
    batch_size: int = Field(1, ge=1, description="volumes per step, all of one shape")
    seed: int = 0
    checkpoint_every: int = Field(200, ge=1, description="steps between resumable checkpoints")
    checkpoint_seconds: float | None = Field(
        None, gt=0, description="also a checkpoint once this many seconds have passed since the last one"
    )
    log_every: int = Field(10, ge=1, description="steps between loss records in metrics.jsonl")
    tensorboard: bool = Field(False, description="also log to TensorBoard (out_dir/tensorboard)")
    mixed_precision: MixedPrecision = "no"
    val_every: int = Field(100, ge=1, description="steps between validations in HU (when validation CTs are given)")

    @model_validator(mode="after")
    def _check(self) -> "VAEFitConfig":
        if len(self.channels) != VAE_LEVELS:
            raise ValueError(f"channels must have {VAE_LEVELS} entries (x4 downsampling), got {self.channels}")
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad and self.norm == "group":
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

    @property
    def lr_schedule_of_run(self) -> LRSchedule:
        """The shared loop's schedule with these settings."""
        return LRSchedule(self.lr, self.warmup_steps, self.lr_schedule, self.max_steps, self.min_lr_ratio)

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
        tile = None if self.crop is None or self.norm == "none" else list(self.crop)
        if self.norm == "none":
            kwargs["norm_num_groups"] = 1  # MONAI still builds (then drops) the GroupNorms
        return {"class_name": "AutoencoderKL", "kwargs": kwargs, "layout": LAYOUT_CANONICAL, "inference_tile": tile,
                "norm": self.norm}


#: Loop settings of :class:`VAEFitConfig` read from the recipe's ``train`` section under their own names.
LOOP_FIELDS = ("lr_schedule", "warmup_steps", "min_lr_ratio", "max_steps", "seed", "checkpoint_every",
               "checkpoint_seconds", "log_every", "tensorboard", "mixed_precision", "val_every")


def vae_fit_config(model: VAEModelConfig, data: Any, train: Any) -> VAEFitConfig:
    """The settings of :func:`fit_vae` from a recipe's ``model``, ``data`` and ``train`` sections.

    ``train.val_every: null`` (validate only at the end) becomes a period of ``max_steps``.
    ``train.ema_decay`` is refused: the VAE's EMA is ``model.ema_decay`` (on by default).
    """
    if getattr(train, "ema_decay", None) is not None:
        raise BadConfigError("train.ema_decay: a VAE recipe sets its EMA as model.ema_decay (default 0.995)")
    loop = {name: getattr(train, name) for name in LOOP_FIELDS}
    if loop["val_every"] is None:
        loop["val_every"] = train.max_steps
    return VAEFitConfig(**model.model_dump(exclude={"family"}), **loop, time_budget_s=train.max_seconds,
                        batch_size=data.batch_size)
