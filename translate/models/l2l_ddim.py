"""Latent-to-latent conditional diffusion: a MONAI ``DiffusionModelUNet`` denoises the CT latent.

The MR latent is given by channel concatenation (UNet input = noisy CT latent + MR latent).
Training uses the DDPM objective of a MONAI ``DDPMScheduler`` (or the rectified-flow objective of
``RFlowScheduler``); sampling runs ``DDIMScheduler(clip_sample=False)`` (or ``RFlowScheduler``)
step by step. All noise-schedule maths lives in those scheduler objects.

The building blocks shared by the other latent families (UNet sizes, the diffusion process) live
here too: :class:`LatentUNetConfig`, :class:`DiffusionConfig`, :func:`diffusion_unet`,
:class:`NoiseProcess`.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Literal

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler
from pydantic import model_validator

from latent.translate.models.base import ModelConfig, TranslationModel

#: docs/models.md: epsilon prediction gave pure noise on short budgets; v or x0 ("sample") work.
DEFAULT_PREDICTION_TYPE = "v_prediction"
#: The latent-diffusion (LDM / MAISI) noise schedule.
LDM_SCHEDULE, LDM_BETA_START, LDM_BETA_END = "scaled_linear_beta", 0.0015, 0.0195


class LatentUNetConfig(ModelConfig):
    """Sizes of a MONAI ``DiffusionModelUNet`` on latents (checked against MONAI's constraints)."""

    latent_channels: int = 4
    #: One entry per level; the UNet downsamples 2^(len(channels) - 1) times.
    channels: tuple[int, ...] = (32, 64, 64)
    num_res_blocks: int | tuple[int, ...] = 1
    #: One flag per level; None = no attention anywhere (attention is costly on 3D latents).
    attention_levels: tuple[bool, ...] | None = None
    norm_num_groups: int = 8
    num_head_channels: int = 8
    resblock_updown: bool = False

    @model_validator(mode="after")
    def _check_unet_sizes(self) -> "LatentUNetConfig":
        levels = len(self.channels)
        if levels < 1 or min(self.channels) < 1:
            raise ValueError(f"channels: need at least one positive entry, got {self.channels}")
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"channels: {bad} not divisible by norm_num_groups={self.norm_num_groups}")
        if self.attention_levels is not None and len(self.attention_levels) != levels:
            raise ValueError(f"attention_levels: needs {levels} entries (one per channels level), "
                             f"got {len(self.attention_levels)}")
        if isinstance(self.num_res_blocks, tuple) and len(self.num_res_blocks) != levels:
            raise ValueError(f"num_res_blocks: needs {levels} entries (one per channels level), "
                             f"got {len(self.num_res_blocks)}")
        for channels, attention in zip(self.channels, self.attention_levels or ()):
            if attention and channels % self.num_head_channels:
                raise ValueError(f"num_head_channels: {self.num_head_channels} does not divide "
                                 f"{channels} channels of an attention level")
        return self

    @property
    def size_multiple(self) -> int:
        """Latent sizes must be multiples of this (the UNet's total downsampling)."""
        return 2 ** (len(self.channels) - 1)


def diffusion_unet(config: LatentUNetConfig, in_channels: int, out_channels: int,
                   spatial_dims: int = 3) -> DiffusionModelUNet:
    """A MONAI ``DiffusionModelUNet`` of the configured sizes (3D on latents; 2D on slices: contourdiff)."""
    return DiffusionModelUNet(
        spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
        channels=config.channels, num_res_blocks=config.num_res_blocks,
        attention_levels=config.attention_levels or (False,) * len(config.channels),
        norm_num_groups=config.norm_num_groups, num_head_channels=config.num_head_channels,
        resblock_updown=config.resblock_updown,
    )


def check_latent_size(latent: torch.Tensor, config: LatentUNetConfig, name: str) -> None:
    """Fail clearly (instead of MONAI's "Sizes of tensors must match") on indivisible sizes."""
    multiple = config.size_multiple
    if latent.ndim != 5 or any(n % multiple for n in latent.shape[-3:]):
        raise ValueError(f"{name} has shape {tuple(latent.shape)}: expected (B, C, d, h, w) with d, h, w "
                         f"multiples of {multiple} for a UNet with {len(config.channels)} levels "
                         "(pad or crop the latents)")


class DiffusionConfig(LatentUNetConfig):
    """Noise process and sampler of a latent diffusion model."""

    num_train_timesteps: int = 1000
    schedule: str = LDM_SCHEDULE
    beta_start: float = LDM_BETA_START
    beta_end: float = LDM_BETA_END
    #: What the UNet predicts (DDPM/DDIM). Rectified flow always predicts velocity (x0 - noise).
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = DEFAULT_PREDICTION_TYPE
    #: "ddim": DDPM training + DDIM sampling; "rflow": rectified-flow training and sampling.
    sampler: Literal["ddim", "rflow"] = "ddim"
    num_inference_steps: int = 50
    #: DDIM noise weight: 0 = deterministic given the initial noise.
    eta: float = 0.0
    #: Rectified-flow training timestep distribution.
    rflow_sample_method: Literal["uniform", "logit-normal"] = "uniform"
    loss: Literal["mse", "l1"] = "mse"

    @model_validator(mode="after")
    def _check_process(self) -> "DiffusionConfig":
        if self.sampler == "rflow" and self.prediction_type != "v_prediction":
            raise ValueError(f"prediction_type: rectified flow (sampler 'rflow') predicts velocity; "
                             f"use 'v_prediction', not {self.prediction_type!r}")
        if not 1 <= self.num_inference_steps <= self.num_train_timesteps:
            raise ValueError(f"num_inference_steps: must be in [1, num_train_timesteps="
                             f"{self.num_train_timesteps}], got {self.num_inference_steps}")
        if self.eta < 0:
            raise ValueError(f"eta: must be >= 0, got {self.eta}")
        return self


#: ``denoise(x_t, t)`` -> network output; ``t`` is a (B,) tensor.
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class NoiseProcess:
    """Training targets and the sampling loop of one :class:`DiffusionConfig`.

    A plain object (not a module): MONAI schedulers hold no learnable state, and keeping them out
    of the module tree keeps them out of ``state_dict`` and ``.to()``.
    """

    def __init__(self, config: DiffusionConfig) -> None:
        self.config = config
        if config.sampler == "ddim":
            self.train_scheduler = DDPMScheduler(
                num_train_timesteps=config.num_train_timesteps, schedule=config.schedule,
                beta_start=config.beta_start, beta_end=config.beta_end,
                prediction_type=config.prediction_type, clip_sample=False)
        else:
            self.train_scheduler = RFlowScheduler(
                num_train_timesteps=config.num_train_timesteps, use_discrete_timesteps=True,
                sample_method=config.rflow_sample_method)

    def training_example(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noise a clean batch at random timesteps (global torch RNG, seeded by the trainer).

        Returns:
            ``(x_t, t, target)``: noisy latents like ``x0``, timesteps (B,), the network's target.
        """
        noise = torch.randn_like(x0)
        scheduler = self.train_scheduler
        if self.config.sampler == "rflow":
            timesteps = scheduler.sample_timesteps(x0)
            # RFlowScheduler.add_noise: x_t = (1 - t/T) x0 + (t/T) noise, so dx/d(-t) = x0 - noise.
            return scheduler.add_noise(x0, noise, timesteps), timesteps, x0 - noise
        timesteps = torch.randint(0, self.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        noisy = scheduler.add_noise(original_samples=x0, noise=noise, timesteps=timesteps)
        if self.config.prediction_type == "epsilon":
            target = noise
        elif self.config.prediction_type == "sample":
            target = x0
        else:
            target = scheduler.get_velocity(x0, noise, timesteps)
        return noisy, timesteps, target

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Objective between network output and target (computed in float32)."""
        loss_fn = F.mse_loss if self.config.loss == "mse" else F.l1_loss
        return loss_fn(prediction.float(), target.float())

    def sample(self, denoise: Denoiser, shape: tuple[int, ...], device: torch.device,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Run the configured sampler from Gaussian noise.

        Args:
            denoise: the network, ``denoise(x_t, t)`` with ``t`` a (B,) tensor.
            shape: (B, C, d, h, w) of the sample.
            device: where the sample lives.
            generator: seeds the initial noise (and the DDIM noise when ``eta > 0``; it must
                then live on ``device``).

        Returns:
            The clean sample, float32 of ``shape``.
        """
        noise_device = generator.device if generator is not None else device
        sample = torch.randn(shape, generator=generator, device=noise_device).to(device)
        batch = shape[0]
        if self.config.sampler == "rflow":
            scheduler = RFlowScheduler(num_train_timesteps=self.config.num_train_timesteps,
                                       use_discrete_timesteps=True)
            scheduler.set_timesteps(self.config.num_inference_steps, device=device)
            following = torch.cat([scheduler.timesteps[1:], scheduler.timesteps.new_zeros(1)])
            for timestep, next_timestep in zip(scheduler.timesteps, following):
                velocity = denoise(sample, timestep.expand(batch))
                sample, _ = scheduler.step(velocity.float(), timestep, sample, next_timestep)
            return sample
        scheduler = DDIMScheduler(
            num_train_timesteps=self.config.num_train_timesteps, schedule=self.config.schedule,
            beta_start=self.config.beta_start, beta_end=self.config.beta_end,
            prediction_type=self.config.prediction_type, clip_sample=False)
        scheduler.set_timesteps(self.config.num_inference_steps, device=device)
        for timestep in scheduler.timesteps:
            output = denoise(sample, timestep.expand(batch))
            sample, _ = scheduler.step(output.float(), int(timestep), sample, eta=self.config.eta,
                                       generator=generator)
        return sample


class LatentDiffusionConfig(DiffusionConfig):
    """Config of :class:`LatentDiffusion`."""

    family: Literal["l2l_ddim"] = "l2l_ddim"


class LatentDiffusion(TranslationModel):
    """Conditional latent diffusion: UNet(noisy CT latent ++ MR latent, t) -> prediction target."""

    family: ClassVar[str] = "l2l_ddim"
    config_class: ClassVar[type[LatentDiffusionConfig]] = LatentDiffusionConfig
    input_key: ClassVar[str] = "mr_mu"
    output_space: ClassVar[str] = "ct_latent"
    stochastic: ClassVar[bool] = True
    #: Cache arrays a training batch needs.
    batch_keys: ClassVar[tuple[str, ...]] = ("mr_mu", "ct_mu")

    def __init__(self, config: LatentDiffusionConfig) -> None:
        super().__init__(config)
        channels = config.latent_channels
        self.unet = diffusion_unet(config, in_channels=2 * channels, out_channels=channels)
        self.process = NoiseProcess(config)

    def forward(self, batch: dict[str, torch.Tensor], phase: str = "main") -> dict[str, torch.Tensor]:
        """Diffusion loss on ``ct_mu`` given ``mr_mu`` (both (B, 4, d, h, w), standardised)."""
        ct_latent, mr_latent = batch["ct_mu"], batch["mr_mu"]
        check_latent_size(ct_latent, self.config, "ct_mu")
        noisy, timesteps, target = self.process.training_example(ct_latent)
        prediction = self.unet(torch.cat([noisy, mr_latent], dim=1), timesteps)
        return {"loss": self.process.loss(prediction, target)}

    @torch.no_grad()
    def translate(self, inputs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample CT latents (B, 4, d, h, w) for MR latents ``inputs`` (B, 4, d, h, w)."""
        check_latent_size(inputs, self.config, "mr_mu")
        shape = (inputs.shape[0], self.config.latent_channels, *inputs.shape[2:])
        return self.process.sample(lambda x, t: self.unet(torch.cat([x, inputs], dim=1), t),
                                   shape, inputs.device, generator)
