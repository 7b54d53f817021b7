"""Direct latent-to-sCT: MR latent -> synthetic CT on the full HU range, no diffusion, no CT encode.

A small residual trunk at latent resolution maps the (standardised) MR latent to a latent-like
code, and a MONAI ``AutoencoderKL`` decoder upsamples it x4 to pixels. Output: CT in [-1, 1] over
[-1024, 3071] HU (``latent.intensity.ct_to_full``), so bone and metal above the VAE's 1000 HU
window are representable. The decoder can start from our VAE's decoder
(``init_decoder_from: <VAE folder>``); its output, in VAE units ([0, 1] over [-1000, 1000] HU),
is then mapped to the full range by a fixed affine head so the initialised model means something.

Training: L1 against ``ct_pixels`` inside ``mask_pixels`` plus ``background_weight`` x L1 against
air outside it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import ClassVar, Literal

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets.autoencoderkl import AEKLResBlock, Decoder
from pydantic import model_validator
from safetensors.torch import load_file
from torch import nn

from latent.intensity import AIR_HU, FULL_CT_MAX_HU, FULL_CT_MIN_HU, VAE_CT_MAX_HU, VAE_CT_MIN_HU
from latent.translate.models.base import ModelConfig, TranslationModel

logger = logging.getLogger(__name__)

#: Pixel grid / latent grid per axis: the decoder has three levels (two x2 upsamplings).
UPSAMPLING_LEVELS = 3
_FULL_RANGE = FULL_CT_MAX_HU - FULL_CT_MIN_HU


def hu_to_unit(hu: float) -> float:
    """HU -> [-1, 1] full-range units (scalar form of ``latent.intensity.ct_to_full``)."""
    return (hu - FULL_CT_MIN_HU) / _FULL_RANGE * 2.0 - 1.0


#: Training starts near water (0 HU) instead of +1023 HU (docs/intensities.md).
START_VALUE = hu_to_unit(0.0)
#: Target outside the body mask.
AIR_VALUE = hu_to_unit(AIR_HU)
#: VAE units ([0, 1] over [-1000, 1000] HU) -> full-range units: y = scale * v + offset.
VAE_TO_FULL_SCALE = (VAE_CT_MAX_HU - VAE_CT_MIN_HU) / _FULL_RANGE * 2.0
VAE_TO_FULL_OFFSET = hu_to_unit(VAE_CT_MIN_HU)


class LatentToSCTConfig(ModelConfig):
    """Config of :class:`LatentToSCT`."""

    family: Literal["l2sct"] = "l2sct"
    latent_channels: int = 4
    trunk_channels: int = 32
    #: Residual blocks at latent resolution before the decoder.
    trunk_blocks: int = 2
    #: Decoder input channels (a VAE decoder takes ``latent_channels``).
    decoder_in_channels: int = 4
    #: AutoencoderKL order: finest level first; three levels = x4 upsampling.
    decoder_channels: tuple[int, ...] = (16, 32, 32)
    decoder_res_blocks: int | tuple[int, ...] = 1
    norm_num_groups: int = 8
    norm_eps: float = 1e-6
    #: "linear" (clipped to [-1, 1] by translate) or "tanh".
    output_activation: Literal["linear", "tanh"] = "linear"
    background_weight: float = 0.1
    #: Our VAE folder (config.json + model.safetensors): copy its decoder weights (matching shapes).
    init_decoder_from: str | None = None
    #: Provenance inside a saved model (set automatically; the weights are already inside).
    decoder_initialised_from: str | None = None

    @model_validator(mode="after")
    def _check_sizes(self) -> "LatentToSCTConfig":
        if len(self.decoder_channels) != UPSAMPLING_LEVELS:
            raise ValueError(f"decoder_channels: needs {UPSAMPLING_LEVELS} entries (x4 upsampling), "
                             f"got {len(self.decoder_channels)}")
        for name in ("trunk_channels", "decoder_channels"):
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
        return self.init_decoder_from is not None or self.decoder_initialised_from is not None


class LatentToSCT(TranslationModel):
    """Trunk (latent resolution) + x4 AutoencoderKL decoder -> sCT in [-1, 1]."""

    config_class: ClassVar[type[LatentToSCTConfig]] = LatentToSCTConfig
    input_key: ClassVar[str] = "mr_mu"
    output_space: ClassVar[str] = "ct_full"
    stochastic: ClassVar[bool] = False
    batch_keys: ClassVar[tuple[str, ...]] = ("mr_mu", "ct_pixels", "mask_pixels")

    def __init__(self, config: LatentToSCTConfig) -> None:
        source = config.init_decoder_from
        if source is not None:
            # The saved config records the provenance; the copied weights travel in the state dict.
            config = config.model_copy(update={"init_decoder_from": None, "decoder_initialised_from": str(source)})
        super().__init__(config)
        groups, eps = config.norm_num_groups, config.norm_eps
        trunk: list[nn.Module] = [_conv(config.latent_channels, config.trunk_channels)]
        trunk += [AEKLResBlock(3, config.trunk_channels, groups, eps, config.trunk_channels)
                  for _ in range(config.trunk_blocks)]
        trunk += [nn.GroupNorm(groups, config.trunk_channels, eps=eps), nn.SiLU(),
                  _conv(config.trunk_channels, config.decoder_in_channels)]
        self.trunk = nn.Sequential(*trunk)
        res_blocks = config.decoder_res_blocks
        self.decoder = Decoder(
            spatial_dims=3, channels=config.decoder_channels, in_channels=config.decoder_in_channels,
            out_channels=1, num_res_blocks=res_blocks if isinstance(res_blocks, tuple) else (res_blocks,) * UPSAMPLING_LEVELS,
            norm_num_groups=groups, norm_eps=eps, attention_levels=(False,) * UPSAMPLING_LEVELS,
            with_nonlocal_attn=False,
        )
        if source is not None:
            copied = init_decoder_from_vae(self.decoder, source)
            logger.info("l2sct: %d decoder tensors initialised from %s", copied, source)
        elif not config.vae_units:
            out_bias = self.decoder.blocks[-1].conv.bias
            start = math.atanh(START_VALUE) if config.output_activation == "tanh" else START_VALUE
            nn.init.constant_(out_bias, start)

    def _predict(self, mr_latent: torch.Tensor) -> torch.Tensor:
        raw = self.decoder(self.trunk(mr_latent)).float()
        if self.config.vae_units:
            raw = VAE_TO_FULL_SCALE * raw + VAE_TO_FULL_OFFSET
        return torch.tanh(raw) if self.config.output_activation == "tanh" else raw

    def forward(self, batch: dict[str, torch.Tensor], phase: str = "main") -> dict[str, torch.Tensor]:
        """Masked L1 against ``ct_pixels`` (B, 1, 4d, 4h, 4w) + background-to-air term."""
        prediction = self._predict(batch["mr_mu"])
        target, mask = batch["ct_pixels"].float(), batch["mask_pixels"].float()
        if prediction.shape != target.shape:
            raise ValueError(f"l2sct output {tuple(prediction.shape)} does not match ct_pixels "
                             f"{tuple(target.shape)}: pixel volumes must be 4x the latent grid")
        inside = ((prediction - target).abs() * mask).sum() / mask.sum().clamp_min(1.0)
        outside_mask = 1.0 - mask
        outside = ((prediction - AIR_VALUE).abs() * outside_mask).sum() / outside_mask.sum().clamp_min(1.0)
        loss = inside + self.config.background_weight * outside
        return {"loss": loss, "l1_body": inside.detach(), "l1_background": outside.detach(),
                "mae_hu_body": inside.detach() * (_FULL_RANGE / 2.0)}

    @torch.no_grad()
    def translate(self, inputs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """sCT (B, 1, 4d, 4h, 4w) in [-1, 1] (clipped) for MR latents (B, 4, d, h, w)."""
        return self._predict(inputs).clamp(-1.0, 1.0)


def _conv(in_channels: int, out_channels: int) -> Convolution:
    return Convolution(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, strides=1,
                       kernel_size=3, padding=1, conv_only=True)


def _kernel_from_ras(weight: torch.Tensor) -> torch.Tensor:
    """A 3D conv kernel trained on (x, y, z) RAS arrays -> the same filter on (z, y, x) LPS arrays.

    Mirrors ``latent.vae_inference.from_network_layout`` on the kernel's spatial axes (exact for
    odd kernels with symmetric padding).
    """
    return weight.flip(2, 3).permute(0, 1, 4, 3, 2) if weight.ndim == 5 else weight


def init_decoder_from_vae(decoder: nn.Module, vae_dir: str | Path) -> int:
    """Copy a VAE folder's decoder weights into ``decoder`` where shapes match.

    Matches by name (``decoder.<key>``); when names differ but the two decoders hold the same
    sequence of tensor shapes (e.g. MAISI's decoder, whose convolutions are wrapped once more),
    copies in order. Kernels of a VAE stored in the MAISI ``xyz_ras`` layout are converted.

    Returns:
        Number of tensors copied.

    Raises:
        FileNotFoundError, ValueError: missing folder files, or nothing matched.
    """
    vae_dir = Path(vae_dir)
    config_path, weights_path = vae_dir / "config.json", vae_dir / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"init_decoder_from: {path} missing (a VAE folder holds config.json "
                                    "and model.safetensors)")
    layout = json.loads(config_path.read_text()).get("layout", "zyx_lps")
    source = {k[len("decoder."):]: v for k, v in load_file(str(weights_path)).items() if k.startswith("decoder.")}
    if layout == "xyz_ras":
        source = {k: _kernel_from_ras(v) for k, v in source.items()}
    target = decoder.state_dict()
    updated = {k: source[k] for k, v in target.items() if k in source and source[k].shape == v.shape}
    if len(updated) < len(target):
        source_shapes = [v.shape for v in source.values()]
        if source_shapes == [v.shape for v in target.values()]:
            updated = dict(zip(target, source.values()))
    if not updated:
        raise ValueError(f"init_decoder_from: no decoder tensor of {vae_dir} matches this decoder's "
                         "shapes; set decoder_channels / decoder_res_blocks / norm_num_groups to the VAE's")
    if len(updated) < len(target):
        logger.warning("l2sct: only %d of %d decoder tensors matched %s", len(updated), len(target), vae_dir)
    decoder.load_state_dict({**target, **{k: v.to(target[k].dtype) for k, v in updated.items()}})
    return len(updated)
