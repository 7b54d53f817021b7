"""ContourDiff (Chen et al. 2024): unpaired MR -> CT by a CT-only diffusion model guided by contours.

A pixel-space MONAI ``DiffusionModelUNet`` (2D) learns to denoise axial CT slices given the
slice's contour map (:mod:`latent.translate.models.contour_map`: body outline + multi-scale
edges after per-slice normalisation), by channel concatenation: ``UNet(noisy CT ++ contours, t)``.
Training reads the training cases' CTs and nothing else (``batch_keys``): no MR and so no
pair. At inference the same operator runs on the MR's slices and DDIM sampling (the shared
:class:`~latent.translate.models.l2l_ddim.NoiseProcess`) draws a CT slice whose structures lie
where the MR has them; every axial slice of the volume is sampled (whole-volume, slice-wise
inference). In ``2.5d`` mode the condition is the contour maps of ``context_slices``
neighbouring slices (edge slices repeated), the output the centre CT slice.

Intensities: the CT target on the full range mapped to [-1, 1] (the batches' ``ct_pixels``),
the MR input as the cache's normalised MR (``mr_pixels``); the contour operator normalises each
slice itself, so neither scale reaches the network.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch
from monai.networks.nets import DiffusionModelUNet
from pydantic import Field, field_validator, model_validator

from latent.core.errors import BadConfigError
from latent.core.intensity import ct_to_full
from latent.translate.models.base import TranslationModel
from latent.translate.models.contour_map import contour_map
from latent.translate.models.gan_views import (
    SIGNED_BACKGROUND,
    odd_context_slices,
    gather_stacks,
    pad_to_multiple,
    sample_slices,
    slicewise_translate,
)
from latent.translate.models.l2l_ddim import DiffusionConfig, NoiseProcess, diffusion_unet

#: CT above this (HU) is body when training slices are drawn (no mask is read: CT alone).
BODY_HU = -500.0
#: The MR's background (the cache's normalised MR maps it to 0): its in-plane padding.
MR_BACKGROUND = 0.0


class ContourDiffConfig(DiffusionConfig):
    """ContourDiff recipe: 2D UNet sizes, noise process and sampler, contour operator, slices.

    The UNet fields (``channels``, ``num_res_blocks``, ``attention_levels``, ``norm_num_groups``,
    ``num_head_channels``, ``resblock_updown``) and the noise process (``prediction_type``,
    ``num_inference_steps`` DDIM steps, ``eta``, ...) are those of the latent diffusion families;
    ``latent_channels`` is unused (one CT channel). Defaults: the DDPM linear schedule
    (1e-4 .. 0.02) of pixel-space diffusion.

    Attributes:
        mode: ``"2d"`` (one slice's contours) or ``"2.5d"`` (``context_slices`` slices' contours).
        context_slices: k (odd) neighbouring slices of a 2.5D condition.
        slices_per_volume: CT slices drawn per volume and step, among slices with body.
        body_threshold, edge_quantile, edge_scales: the contour operator
            (:func:`~latent.translate.models.contour_map.contour_map`).
        inference_batch_size: slices sampled together at inference.
    """

    family: Literal["contourdiff"] = "contourdiff"
    channels: tuple[int, ...] = (64, 128, 256, 256)
    attention_levels: tuple[bool, ...] | None = (False, False, True, True)
    norm_num_groups: int = 32
    num_head_channels: int = 32
    schedule: str = "linear_beta"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    mode: Literal["2d", "2.5d"] = "2.5d"
    context_slices: int = 3
    slices_per_volume: int = Field(8, ge=1)
    body_threshold: float = Field(0.1, gt=0.0, lt=1.0)
    edge_quantile: float = Field(0.8, gt=0.0, lt=1.0)
    edge_scales: tuple[float, ...] = (1.0, 2.0)
    inference_batch_size: int = Field(16, ge=1)

    _odd_context = field_validator("context_slices")(odd_context_slices)

    @field_validator("edge_scales")
    @classmethod
    def _scales(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(not sigma > 0 for sigma in value):
            raise ValueError(f"needs at least one positive gaussian sigma (pixels), got {list(value)}")
        return value

    @model_validator(mode="after")
    def _ddim_only(self) -> "ContourDiffConfig":
        if self.sampler != "ddim":
            raise ValueError(f"sampler: ContourDiff samples with DDIM ('ddim'), got {self.sampler!r}")
        return self

    @property
    def stack_depth(self) -> int:
        """Slices whose contours condition one output slice."""
        return self.context_slices if self.mode == "2.5d" else 1

    @property
    def condition_channels(self) -> int:
        """Channels of the condition: the contour map's (outline + one per scale) per slice."""
        return self.stack_depth * (1 + len(self.edge_scales))


class ContourDiff(TranslationModel):
    """CT-only contour-conditioned diffusion; :meth:`translate` samples a CT for an MR volume."""

    family: ClassVar[str] = "contourdiff"
    config_class: ClassVar[type[ContourDiffConfig]] = ContourDiffConfig
    input_key: ClassVar[str] = "mr_pixels"
    output_space: ClassVar[str] = "ct_full"
    stochastic: ClassVar[bool] = True
    #: Training reads the CT alone: no MR, no mask (body slices are found in the CT itself).
    batch_keys: ClassVar[tuple[str, ...]] = ("ct_pixels",)

    def __init__(self, config: ContourDiffConfig) -> None:
        super().__init__(config)
        self.unet: DiffusionModelUNet = diffusion_unet(config, in_channels=1 + config.condition_channels,
                                                       out_channels=1, spatial_dims=2)
        self.process = NoiseProcess(config)

    def model_input(self, arrays: dict[str, torch.Tensor]) -> torch.Tensor:
        """The MR pixels (validation batches must carry them: the training keys hold no MR)."""
        if self.input_key not in arrays:
            raise BadConfigError("data.extra_val_keys: contourdiff trains on CT alone, so validation batches "
                                 "need the MR added: extra_val_keys: [mr_pixels, mask_pixels]")
        return arrays[self.input_key]

    def contours(self, stacks: torch.Tensor) -> torch.Tensor:
        """``(N, k, H, W)`` slice stacks of one modality -> ``(N, k * channels, H, W)`` contour maps."""
        config: ContourDiffConfig = self.config
        count, depth = stacks.shape[:2]
        maps = contour_map(stacks.reshape(count * depth, 1, *stacks.shape[2:]), config.body_threshold,
                           config.edge_quantile, config.edge_scales)
        return maps.reshape(count, depth * maps.shape[1], *stacks.shape[2:])

    def forward(self, batch: dict[str, torch.Tensor], phase: str = "main") -> dict[str, torch.Tensor]:
        """Diffusion loss on CT slices of ``ct_pixels`` (B, 1, D, H, W) given their own contours."""
        config: ContourDiffConfig = self.config
        ct = batch["ct_pixels"].float()
        body = (ct > float(ct_to_full(np.float32(BODY_HU)))).float()
        places = sample_slices(body, config.slices_per_volume)
        cases = torch.arange(ct.shape[0], device=ct.device).repeat_interleave(places.shape[1])
        stacks = pad_to_multiple(gather_stacks(ct, cases, places.flatten(), config.stack_depth),
                                 config.size_multiple, SIGNED_BACKGROUND)
        condition = self.contours(stacks)
        target = stacks[:, config.stack_depth // 2:config.stack_depth // 2 + 1]
        noisy, timesteps, objective = self.process.training_example(target)
        prediction = self.unet(torch.cat([noisy, condition], dim=1), timesteps)
        return {"loss": self.process.loss(prediction, objective),
                "contour_fraction": condition.mean().detach()}

    def sample_slices(self, stacks: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n, k, H, W)`` MR stacks (H, W multiples of the UNet's) -> ``(n, 1, H, W)`` CT slices."""
        condition = self.contours(stacks)
        shape = (stacks.shape[0], 1, *stacks.shape[2:])
        return self.process.sample(lambda x, t: self.unet(torch.cat([x, condition], dim=1), t),
                                   shape, stacks.device, generator)

    @torch.no_grad()
    def translate(self, inputs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample a CT volume: ``(B, 1, D, H, W)`` normalised MR -> ``(B, 1, D, H, W)`` CT in [-1, 1].

        Every axial slice is sampled from the contours of its (k-slice) MR stack, in batches of
        ``inference_batch_size``; in-plane sizes are padded with MR background and cropped back.
        ``generator`` seeds the noise (one sample per call).
        """
        config: ContourDiffConfig = self.config
        output = slicewise_translate(inputs.float(), lambda stacks: self.sample_slices(stacks, generator),
                                     config.stack_depth, config.inference_batch_size, config.size_multiple,
                                     output_channel=0, pad_value=MR_BACKGROUND)
        return output.clamp(-1.0, 1.0)
