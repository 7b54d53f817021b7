"""Latent ControlNet: a CT-latent diffusion prior steered by the MR latent through MONAI ``ControlNet``.

Two stages, one family:

1. ``stage: prior`` trains an unconditional ``DiffusionModelUNet`` on CT latents (4 -> 4 channels).
2. ``stage: controlnet`` loads that prior from ``prior_path`` (a folder saved by this family at stage
   prior), freezes it, and trains a ``ControlNet`` (initialised from the prior's weights) whose
   residuals condition the prior on the MR latent. The conditioning embedding has one level, so it
   does not downsample: the MR latent is already at the latent resolution.

A stage-2 model saves prior and ControlNet together; its saved config records where the prior came
from (``prior_source``) and carries the prior's sizes, so the folder loads without the prior folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
from monai.networks.nets import ControlNet
from monai.networks.utils import copy_model_state
from pydantic import model_validator

from latent.translate.models.base import load_pretrained
from latent.translate.models.base import TranslationModel
from latent.translate.models.l2l_ddim import DiffusionConfig, NoiseProcess, check_latent_size, diffusion_unet

#: Fields that must equal the prior's: they define the prior network and its noise process.
PRIOR_FIELDS = ("latent_channels", "channels", "num_res_blocks", "attention_levels", "norm_num_groups",
                "num_head_channels", "resblock_updown", "num_train_timesteps", "schedule", "beta_start",
                "beta_end", "prediction_type", "sampler", "rflow_sample_method")


class LatentControlNetConfig(DiffusionConfig):
    """Config of :class:`LatentControlNet` (UNet sizes and noise process are the prior's)."""

    family: Literal["l2l_controlnet"] = "l2l_controlnet"
    stage: Literal["prior", "controlnet"] = "prior"
    #: Stage controlnet: folder of a model of this family saved at stage prior.
    prior_path: str | None = None
    #: Provenance of the prior inside a saved stage-2 model (set automatically; weights are inside).
    prior_source: str | None = None
    #: Width of the ControlNet's (non-downsampling) conditioning embedding of the MR latent.
    conditioning_embedding_channels: int = 16
    conditioning_scale: float = 1.0
    #: Start the ControlNet from the prior's encoder weights (ControlNet paper); else random.
    init_from_prior: bool = True

    @model_validator(mode="after")
    def _check_stage(self) -> "LatentControlNetConfig":
        if self.stage == "controlnet" and self.prior_path is None and self.prior_source is None:
            raise ValueError("prior_path: stage 'controlnet' needs prior_path, the folder of a "
                             "l2l_controlnet model trained at stage 'prior'")
        return self


class LatentControlNet(TranslationModel):
    """Frozen (at stage 2) CT-latent prior + trainable MR-conditioned ControlNet."""

    family: ClassVar[str] = "l2l_controlnet"
    config_class: ClassVar[type[LatentControlNetConfig]] = LatentControlNetConfig
    input_key: ClassVar[str] = "mr_mu"
    output_space: ClassVar[str] = "ct_latent"
    stochastic: ClassVar[bool] = True
    batch_keys: ClassVar[tuple[str, ...]] = ("mr_mu", "ct_mu")
    #: Stage 2 starts from a prior trained first with the recipe ``l2l_controlnet_prior_<size>``.
    starts_from: ClassVar[tuple[str, str] | None] = ("l2l_controlnet_prior", "prior_path")

    def __init__(self, config: LatentControlNetConfig) -> None:
        prior_model = None
        if config.stage == "controlnet" and config.prior_path is not None:
            prior_model = load_pretrained(prior_folder(config.prior_path))
            config = _adopt_prior_config(config, prior_model)
        super().__init__(config)
        channels = config.latent_channels
        self.prior = diffusion_unet(config, in_channels=channels, out_channels=channels)
        self.process = NoiseProcess(config)
        self.controlnet = None
        if config.stage == "controlnet":
            self.controlnet = ControlNet(
                spatial_dims=3, in_channels=channels, channels=config.channels,
                num_res_blocks=config.num_res_blocks,
                attention_levels=config.attention_levels or (False,) * len(config.channels),
                norm_num_groups=config.norm_num_groups, num_head_channels=config.num_head_channels,
                resblock_updown=config.resblock_updown, conditioning_embedding_in_channels=channels,
                conditioning_embedding_num_channels=(config.conditioning_embedding_channels,),
            )
            if prior_model is not None:
                self.prior.load_state_dict(prior_model.prior.state_dict())
                if config.init_from_prior:
                    # Same key names (time_embed, conv_in, down_blocks, middle_block) as the UNet;
                    # the zero-initialised controlnet blocks and conditioning embedding stay as built.
                    copy_model_state(self.controlnet, self.prior.state_dict())
            self.prior.requires_grad_(False)
            self.prior.eval()

    def train(self, mode: bool = True) -> "LatentControlNet":
        """Keep a frozen prior in eval mode whatever the trainer asks."""
        super().train(mode)
        if self.controlnet is not None:
            self.prior.eval()
        return self

    def phase_parameters(self, phase: str) -> list[torch.nn.Parameter]:
        """Stage prior: the prior's parameters; stage controlnet: only the ControlNet's."""
        module = self.prior if self.controlnet is None else self.controlnet
        return list(module.parameters())

    def _denoise(self, noisy: torch.Tensor, timesteps: torch.Tensor, mr_latent: torch.Tensor | None) -> torch.Tensor:
        if self.controlnet is None:
            return self.prior(noisy, timesteps)
        down_residuals, mid_residual = self.controlnet(
            noisy, timesteps, controlnet_cond=mr_latent, conditioning_scale=self.config.conditioning_scale)
        return self.prior(noisy, timesteps, down_block_additional_residuals=down_residuals,
                          mid_block_additional_residual=mid_residual)

    def forward(self, batch: dict[str, torch.Tensor], phase: str = "main") -> dict[str, torch.Tensor]:
        """Diffusion loss on ``ct_mu``; stage controlnet conditions on ``mr_mu``."""
        ct_latent = batch["ct_mu"]
        check_latent_size(ct_latent, self.config, "ct_mu")
        noisy, timesteps, target = self.process.training_example(ct_latent)
        prediction = self._denoise(noisy, timesteps, batch.get("mr_mu"))
        return {"loss": self.process.loss(prediction, target)}

    @torch.no_grad()
    def translate(self, inputs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample CT latents (B, 4, d, h, w) for MR latents (B, 4, d, h, w).

        At stage prior the samples are unconditional (only the shape of ``inputs`` is used).
        """
        check_latent_size(inputs, self.config, "mr_mu")
        shape = (inputs.shape[0], self.config.latent_channels, *inputs.shape[2:])
        return self.process.sample(lambda x, t: self._denoise(x, t, inputs), shape, inputs.device, generator)


def prior_folder(path: str) -> Path:
    """The prior's model folder: ``path`` itself, or the ``final/`` of a prior's run folder."""
    folder = Path(path)
    return folder / "final" if (folder / "final" / "config.json").is_file() else folder


def _adopt_prior_config(config: LatentControlNetConfig, prior_model: TranslationModel) -> LatentControlNetConfig:
    """Take the prior's sizes and noise process; refuse explicit settings that contradict them."""
    prior_config = prior_model.config
    if not isinstance(prior_model, LatentControlNet) or prior_config.stage != "prior":
        raise ValueError(f"prior_path: {config.prior_path} holds a {prior_config.family} model"
                         f"{'' if prior_config.family != 'l2l_controlnet' else ' at stage ' + prior_config.stage}"
                         ", expected l2l_controlnet at stage 'prior'")
    for name in PRIOR_FIELDS:
        ours, theirs = getattr(config, name), getattr(prior_config, name)
        if name in config.model_fields_set and ours != theirs:
            raise ValueError(f"{name}: set to {ours!r} but the prior at {config.prior_path} uses {theirs!r} "
                             "(leave it out to adopt the prior's value)")
    update = {name: getattr(prior_config, name) for name in PRIOR_FIELDS}
    return config.model_copy(update={**update, "prior_path": None, "prior_source": str(config.prior_path)})
