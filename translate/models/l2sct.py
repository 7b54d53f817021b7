"""Direct latent-to-sCT: MR latent -> synthetic CT on the full HU range, no diffusion, no CT encode.

A translator at latent resolution maps the (standardised) MR latent to a CT latent, and a decoder
upsamples it x4 to pixels. Output: CT in [-1, 1] over [-1024, 3071] HU
(``latent.core.intensity.ct_to_full``).

- ``decoder: from_vae`` (the default): the decoder is the exact decode path of the VAE that
  produced the cache (``post_quant_conv`` + ``decoder``, same class, configuration,
  normalisation and layout, weights copied; :mod:`latent.translate.models.vae_decoder`). The
  translator's output is a standardised CT latent, destandardised with the cache's statistics
  and decoded; the VAE's window ([0, 1] over [-1000, 1000] HU) is mapped to the full range by a
  fixed affine head on the unclipped output, so a fine-tuned decoder can return bone above
  1000 HU, which the frozen VAE cannot. At initialisation, fed the true CT latent, the model
  returns the VAE's decode.
- ``decoder: scratch``: a MONAI ``Decoder`` of its own sizes (the ablation, and the model of
  runs written before ``decoder`` existed; ``init_decoder_from`` copies a VAE folder's
  ``decoder.*`` weights into it).

The translator is a latent UNet (``trunk: unet``, the ``l2l_regress`` network, optionally started
from a trained ``l2l_regress`` run with ``init_trunk_from``) or residual blocks (``resblocks``).
Training is end to end in pixel space: masked L1 against the full-range CT, a background term,
and optionally the L1 of finite-difference gradients. The decoder can be frozen for the first
``decoder_freeze_steps`` and then learn at ``decoder_lr_scale`` x the model's lr.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar, Literal

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets.autoencoderkl import AEKLResBlock, Decoder
from pydantic import Field, model_validator
from torch import nn

from latent.core.intensity import AIR_HU, FULL_CT_MAX_HU, FULL_CT_MIN_HU, VAE_CT_MAX_HU, VAE_CT_MIN_HU
from latent.translate.models.base import TranslationModel
from latent.translate.models.l2l_ddim import LatentUNetConfig, check_latent_size, diffusion_unet
from latent.translate.models.l2sct_init import (init_decoder_from_vae, init_exact_decoder_from_adapted,
                                                 init_trunk_from_run)
from latent.translate.models.regress3d_parts import gradient_l1, masked_mean, use_channels_last
from latent.translate.models.vae_decoder import ExactDecoder, ExactDecoderFields, producer_update, resolve_source

logger = logging.getLogger(__name__)

#: Pixel grid / latent grid per axis: the decoder has three levels (two x2 upsamplings).
UPSAMPLING_LEVELS = 3
_FULL_RANGE = FULL_CT_MAX_HU - FULL_CT_MIN_HU
#: Keys that only the scratch decoder / the residual-block trunk have: a config that sets them
#: without naming ``decoder`` / ``trunk`` was written before those fields existed.
_SCRATCH_DECODER_KEYS = ("decoder_channels", "decoder_initialised_from")
_RESBLOCK_TRUNK_KEYS = ("trunk_blocks", "trunk_channels")


def hu_to_unit(hu: float) -> float:
    """HU -> [-1, 1] full-range units (scalar form of ``latent.core.intensity.ct_to_full``)."""
    return (hu - FULL_CT_MIN_HU) / _FULL_RANGE * 2.0 - 1.0


#: Training starts near water (0 HU) instead of +1023 HU (docs/intensities.md).
START_VALUE = hu_to_unit(0.0)
#: Target outside the body mask.
AIR_VALUE = hu_to_unit(AIR_HU)
#: VAE units ([0, 1] over [-1000, 1000] HU) -> full-range units: y = scale * v + offset.
VAE_TO_FULL_SCALE = (VAE_CT_MAX_HU - VAE_CT_MIN_HU) / _FULL_RANGE * 2.0
VAE_TO_FULL_OFFSET = hu_to_unit(VAE_CT_MIN_HU)


class LatentToSCTConfig(LatentUNetConfig, ExactDecoderFields):
    """Config of :class:`LatentToSCT` (``channels`` ... ``resblock_updown``: the UNet trunk;
    ``vae`` ... ``gradient_weight``: the exact decoder and the loss)."""

    family: Literal["l2sct"] = "l2sct"
    #: "from_vae": the exact decode path of the cache's VAE; "scratch": a decoder of its own sizes.
    decoder: Literal["from_vae", "scratch"] = "from_vae"
    #: Translator: the l2l_regress latent UNet, or residual blocks at latent resolution.
    trunk: Literal["unet", "resblocks"] = "unet"
    #: An l2l_regress run (or model folder) whose UNet starts the trunk (same UNet sizes).
    init_trunk_from: str | None = None
    trunk_initialised_from: str | None = None
    #: Optimizer steps with the decoder frozen (lr 0), then it learns at ``decoder_lr_scale`` x lr.
    decoder_freeze_steps: int = Field(0, ge=0)
    decoder_lr_scale: float = Field(1.0, ge=0.0)
    #: A full-resolution residual head that sees the decoded sCT and the MR pixels (the detail the
    #: latent cannot hold): 3 convolutions of ``mr_head_channels``, the last one zero at start.
    mr_head: bool = False
    mr_head_channels: int = Field(16, ge=1)
    #: Channels-last 3D weights: 1.3x (float32) to 1.7x (bf16) faster training steps on a CPU
    #: (docs/models.md, "3D convolutions on a CPU"); outputs agree to float rounding.
    channels_last: bool = True
    # -- scratch decoder and residual-block trunk
    trunk_channels: int = 32
    trunk_blocks: int = 2
    decoder_in_channels: int = 4
    #: AutoencoderKL order: finest level first; three levels = x4 upsampling.
    decoder_channels: tuple[int, ...] = (16, 32, 32)
    decoder_res_blocks: int | tuple[int, ...] = 1
    norm_eps: float = 1e-6
    #: Scratch decoder's output: "linear" (clipped to [-1, 1] by translate) or "tanh".
    output_activation: Literal["linear", "tanh"] = "linear"
    #: Scratch decoder: a VAE folder whose ``decoder.*`` weights to copy (matching shapes);
    #: from_vae: an adapted decoder run (``latent vae adapt``) of the same VAE to start from.
    init_decoder_from: str | None = None
    decoder_initialised_from: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _legacy_scratch(cls, data: Any) -> Any:
        """A config without ``decoder`` / ``trunk`` that sets their scratch fields is the model
        runs had before (scratch decoder, residual-block trunk)."""
        if isinstance(data, dict):
            if "decoder" not in data and any(key in data for key in _SCRATCH_DECODER_KEYS):
                data = {**data, "decoder": "scratch"}
            if "trunk" not in data and any(key in data for key in _RESBLOCK_TRUNK_KEYS):
                data = {**data, "trunk": "resblocks"}
        return data

    @model_validator(mode="after")
    def _check_sizes(self) -> "LatentToSCTConfig":
        if len(self.decoder_channels) != UPSAMPLING_LEVELS:
            raise ValueError(f"decoder_channels: needs {UPSAMPLING_LEVELS} entries (x4 upsampling), "
                             f"got {len(self.decoder_channels)}")
        used = [*(["trunk_channels"] if self.trunk == "resblocks" else []),
                *(["decoder_channels"] if self.decoder == "scratch" else [])]
        for name in used:  # the GroupNorms of the scratch parts
            values = getattr(self, name)
            bad = [c for c in (values if isinstance(values, tuple) else (values,)) if c % self.norm_num_groups]
            if bad:
                raise ValueError(f"{name}: {bad} not divisible by norm_num_groups={self.norm_num_groups}")
        if isinstance(self.decoder_res_blocks, tuple) and len(self.decoder_res_blocks) != UPSAMPLING_LEVELS:
            raise ValueError(f"decoder_res_blocks: needs {UPSAMPLING_LEVELS} entries, got {len(self.decoder_res_blocks)}")
        return self

    @property
    def vae_units(self) -> bool:
        """True when the decoder came from a VAE (its raw output is in VAE units)."""
        return (self.decoder == "from_vae" or self.init_decoder_from is not None
                or self.decoder_initialised_from is not None)


class LatentToSCT(TranslationModel):
    """Translator (latent resolution) + x4 decoder -> sCT in [-1, 1]."""

    family: ClassVar[str] = "l2sct"
    config_class: ClassVar[type[LatentToSCTConfig]] = LatentToSCTConfig
    input_key: ClassVar[str] = "mr_mu"
    output_space: ClassVar[str] = "ct_full"
    stochastic: ClassVar[bool] = False
    batch_keys: ClassVar[tuple[str, ...]] = ("mr_mu", "ct_pixels", "mask_pixels")
    starts_from: ClassVar[tuple[str, str] | None] = ("l2l_regress", "init_trunk_from")

    def __init__(self, config: LatentToSCTConfig) -> None:
        vae = None
        if config.decoder == "from_vae":
            config, vae = resolve_source(config, "decoder: from_vae")
        decoder_source, trunk_source = config.init_decoder_from, config.init_trunk_from
        # The saved config records provenance; the copied weights travel in the state dict.
        if decoder_source is not None:
            config = config.model_copy(update={"init_decoder_from": None,
                                               "decoder_initialised_from": str(decoder_source)})
        if trunk_source is not None:
            config = config.model_copy(update={"init_trunk_from": None, "trunk_initialised_from": str(trunk_source)})
        super().__init__(config)
        out_channels = config.latent_channels if config.decoder == "from_vae" else config.decoder_in_channels
        self.trunk = self._build_trunk(config, out_channels)
        if trunk_source is not None:
            init_trunk_from_run(self.trunk, trunk_source, config)
        if config.mr_head:
            self.mr_head = _residual_head(config.mr_head_channels)
        if config.decoder == "from_vae":
            self.vae_decode = ExactDecoder(config.vae_decoder, config.ct_latent_mean, config.ct_latent_std, source=vae)
            if decoder_source is not None:
                init_exact_decoder_from_adapted(self.vae_decode, decoder_source)
        else:
            self._build_scratch_decoder(config, decoder_source)
        if config.channels_last:  # after every copy of weights into the model
            use_channels_last(self)

    def _build_scratch_decoder(self, config: LatentToSCTConfig, decoder_source: str | None) -> None:
        res_blocks = config.decoder_res_blocks
        self.decoder = Decoder(
            spatial_dims=3, channels=config.decoder_channels, in_channels=config.decoder_in_channels,
            out_channels=1, num_res_blocks=res_blocks if isinstance(res_blocks, tuple) else (res_blocks,) * UPSAMPLING_LEVELS,
            norm_num_groups=config.norm_num_groups, norm_eps=config.norm_eps,
            attention_levels=(False,) * UPSAMPLING_LEVELS, with_nonlocal_attn=False,
        )
        if decoder_source is not None:
            copied = init_decoder_from_vae(self.decoder, decoder_source)
            logger.info("l2sct: %d decoder tensors initialised from %s", copied, decoder_source)
        elif not config.vae_units:
            out_bias = self.decoder.blocks[-1].conv.bias
            start = math.atanh(START_VALUE) if config.output_activation == "tanh" else START_VALUE
            nn.init.constant_(out_bias, start)

    @staticmethod
    def _build_trunk(config: LatentToSCTConfig, out_channels: int) -> nn.Module:
        if config.trunk == "unet":
            return diffusion_unet(config, in_channels=config.latent_channels, out_channels=out_channels)
        groups, eps = config.norm_num_groups, config.norm_eps
        trunk: list[nn.Module] = [_conv(config.latent_channels, config.trunk_channels)]
        trunk += [AEKLResBlock(3, config.trunk_channels, groups, eps, config.trunk_channels)
                  for _ in range(config.trunk_blocks)]
        trunk += [nn.GroupNorm(groups, config.trunk_channels, eps=eps), nn.SiLU(),
                  _conv(config.trunk_channels, out_channels)]
        return nn.Sequential(*trunk)

    @classmethod
    def for_producer(cls, config: LatentToSCTConfig, producer: dict[str, Any]) -> LatentToSCTConfig:
        """Fill in from the cache's producer: its VAE (spec and weights hash) and ``ct_mu`` statistics."""
        update = producer_update(config, producer) if config.decoder == "from_vae" else {}
        return config.model_copy(update=update) if update else config

    @classmethod
    def keys_for(cls, config: LatentToSCTConfig) -> tuple[str, ...] | None:
        """The MR pixels too when the residual head is on."""
        return (*cls.batch_keys, "mr_pixels") if config.mr_head else None

    @property
    def input_keys(self) -> tuple[str, ...]:
        return ("mr_mu", "mr_pixels") if self.config.mr_head else ("mr_mu",)

    def model_input(self, arrays: dict[str, torch.Tensor]) -> torch.Tensor:
        """The MR latent; with the residual head, the MR pixels packed beside it (4 x 4 x 4 blocks as
        64 channels), so sliding windows and flips see one tensor on the latent grid."""
        if not self.config.mr_head:
            return arrays["mr_mu"]
        return torch.cat([arrays["mr_mu"], space_to_depth(arrays["mr_pixels"].float())], dim=1)

    def mirror_input(self, inputs: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        if not self.config.mr_head or not dims:
            return super().mirror_input(inputs, dims)
        latent, pixels = self._unpack(inputs)
        return torch.cat([latent.flip(dims), space_to_depth(pixels.flip(dims))], dim=1)

    def _unpack(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        channels = self.config.latent_channels
        return inputs[:, :channels], depth_to_space(inputs[:, channels:])

    def optimizer_groups(self, phase: str) -> list[dict[str, Any]]:
        """The translator at the model's lr; the decoder frozen for ``decoder_freeze_steps``, then scaled."""
        decoder = self.vae_decode if self.config.decoder == "from_vae" else self.decoder
        decoder_ids = {id(p) for p in decoder.parameters()}
        trainable = self.phase_parameters(phase)
        return [{"params": [p for p in trainable if id(p) not in decoder_ids], "name": "trunk"},
                {"params": [p for p in trainable if id(p) in decoder_ids], "name": "decoder",
                 "lr_scale": self.config.decoder_lr_scale, "frozen_steps": self.config.decoder_freeze_steps}]

    def _trunk(self, mr_latent: torch.Tensor) -> torch.Tensor:
        if self.config.trunk == "unet":
            check_latent_size(mr_latent, self.config, "mr_mu")
            timesteps = torch.zeros(mr_latent.shape[0], dtype=torch.long, device=mr_latent.device)
            return self.trunk(mr_latent, timesteps)
        return self.trunk(mr_latent)

    def decode_latent(self, ct_latent: torch.Tensor, whole_volume: bool = False) -> torch.Tensor:
        """Standardised CT latent -> full-range units, unclipped (``whole_volume``: the VAE's tiling plan)."""
        if self.config.decoder == "from_vae":
            vae_units = self.vae_decode.decode_volume(ct_latent) if whole_volume else self.vae_decode(ct_latent)
            return VAE_TO_FULL_SCALE * vae_units.float() + VAE_TO_FULL_OFFSET
        raw = self.decoder(ct_latent).float()
        if self.config.vae_units:
            raw = VAE_TO_FULL_SCALE * raw + VAE_TO_FULL_OFFSET
        return torch.tanh(raw) if self.config.output_activation == "tanh" else raw

    def forward(self, batch: dict[str, torch.Tensor], phase: str = "main") -> dict[str, torch.Tensor]:
        """Masked L1 against ``ct_pixels`` (B, 1, 4d, 4h, 4w) + background-to-air (+ gradient) terms."""
        prediction = self._full(batch["mr_mu"], batch.get("mr_pixels"), whole_volume=False)
        return full_range_loss(prediction, batch, self.config)

    def _full(self, mr_latent: torch.Tensor, mr_pixels: torch.Tensor | None, whole_volume: bool) -> torch.Tensor:
        """Full-range output (unclipped): decode of the translated latent (+ the residual head)."""
        full = self.decode_latent(self._trunk(mr_latent), whole_volume=whole_volume)
        if not self.config.mr_head:
            return full
        if mr_pixels is None:
            raise ValueError("l2sct with mr_head needs mr_pixels (the canonical MR) beside mr_mu")
        return full + self.mr_head(torch.cat([full, mr_pixels.float()], dim=1))

    @torch.no_grad()
    def translate(self, inputs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """sCT (B, 1, 4d, 4h, 4w) in [-1, 1] (clipped) for MR latents (B, 4, d, h, w), packed
        with the MR pixels when the residual head is on (:meth:`model_input`)."""
        latent, pixels = self._unpack(inputs) if self.config.mr_head else (inputs, None)
        return self._full(latent, pixels, whole_volume=True).clamp(-1.0, 1.0)


def full_range_loss(prediction: torch.Tensor, batch: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Masked L1 of a full-range output against ``ct_pixels`` + ``background_weight`` x L1 to air
    outside ``mask_pixels`` (+ ``gradient_weight`` x the finite-difference gradient L1)."""
    target, mask = batch["ct_pixels"].float(), batch["mask_pixels"].float()
    if prediction.shape != target.shape:
        raise ValueError(f"{config.family} output {tuple(prediction.shape)} does not match ct_pixels "
                         f"{tuple(target.shape)}: pixel volumes must be 4x the latent grid")
    inside = masked_mean((prediction - target).abs(), mask)
    outside = masked_mean((prediction - AIR_VALUE).abs(), 1.0 - mask)
    loss = inside + config.background_weight * outside
    losses = {"l1_body": inside.detach(), "l1_background": outside.detach(),
              "mae_hu_body": inside.detach() * (_FULL_RANGE / 2.0)}
    if config.gradient_weight > 0:
        gradient = gradient_l1(prediction, target, mask)
        loss = loss + config.gradient_weight * gradient
        losses["gradient"] = gradient.detach()
    return {"loss": loss, **losses}


#: Pixel voxels per latent voxel along each axis (every decoder here upsamples x4).
PIXELS_PER_LATENT = 4


def space_to_depth(pixels: torch.Tensor, factor: int = PIXELS_PER_LATENT) -> torch.Tensor:
    """(B, C, f*d, f*h, f*w) -> (B, C*f^3, d, h, w): each f x f x f block as channels (exact)."""
    b, c, z, y, x = pixels.shape
    blocks = pixels.reshape(b, c, z // factor, factor, y // factor, factor, x // factor, factor)
    return blocks.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * factor**3, z // factor, y // factor, x // factor)


def depth_to_space(packed: torch.Tensor, factor: int = PIXELS_PER_LATENT) -> torch.Tensor:
    """Inverse of :func:`space_to_depth`."""
    b, c, z, y, x = packed.shape
    channels = c // factor**3
    blocks = packed.reshape(b, channels, factor, factor, factor, z, y, x).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return blocks.reshape(b, channels, z * factor, y * factor, x * factor)


def _residual_head(channels: int) -> nn.Sequential:
    """(sCT, MR) at full resolution -> a correction of the sCT; zero at start."""
    head = nn.Sequential(nn.Conv3d(2, channels, 3, padding=1), nn.SiLU(), nn.Conv3d(channels, channels, 3, padding=1),
                         nn.SiLU(), nn.Conv3d(channels, 1, 3, padding=1))
    nn.init.zeros_(head[-1].weight)
    nn.init.zeros_(head[-1].bias)
    return head


def _conv(in_channels: int, out_channels: int) -> Convolution:
    return Convolution(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, strides=1,
                       kernel_size=3, padding=1, conv_only=True)


__all__ = ["AIR_VALUE", "START_VALUE", "VAE_TO_FULL_OFFSET", "VAE_TO_FULL_SCALE", "LatentToSCT", "LatentToSCTConfig",
           "hu_to_unit", "init_decoder_from_vae"]
