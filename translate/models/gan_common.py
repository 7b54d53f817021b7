"""Shared pieces of the pixel-space GANs: config, generator, discriminator, sampling, inference,
and the paired (conditional) GAN skeleton of Pix2Pix and ResViT.

Tensor layouts: volumes are ``(B, 1, D, H, W)`` (z, y, x); 2D/2.5D training views are stacks of
``k`` neighbouring axial slices as channels, ``(N, k, H, W)``; 3D views are patches
``(N, 1, d, h, w)``. Generators work on "signed" intensities: CT on the full range mapped to
[-1, 1] (as in the batches) and MR as ``2 * mr - 1`` (background 0 -> -1, p99.5 = 1 -> 1).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from monai.networks.layers import SkipConnection
from monai.networks.nets import MultiScalePatchDiscriminator, UNet
from pydantic import field_validator, model_validator
from torch import nn

from latent.core.intensity import AIR_HU, ct_to_full
from latent.translate.models.base import ModelConfig, PositiveRate, Size3, TranslationModel
from latent.translate.models.gan_losses import (
    AdversarialLoss,
    background_l1,
    build_discriminator,
    check_discriminator_input,
    discriminator_logits,
    frozen,
    masked_l1,
)
from latent.translate.models.gan_views import (  # noqa: F401 - re-exported: the GAN families import them from here
    odd_context_slices,
    SIGNED_BACKGROUND, avoid_same, body_slices, centre_channel, gather_patches, gather_stacks, make_inferer, pad_to_multiple,
    pad_volume_to, sample_patch_starts, sample_slices, sliding_window_translate, slicewise_translate,
    unpaired_partner,
)


#: Air (-1000 HU) on the [-1, 1] full-range CT scale: target of the background term.
AIR_SIGNED = float(ct_to_full(np.float32(AIR_HU)))
#: Water (0 HU) on the [-1, 1] scale (about -0.5): where a fresh MR->CT generator starts.
WATER_SIGNED = float(ct_to_full(np.float32(0.0)))


def mr_to_signed(mr: torch.Tensor) -> torch.Tensor:
    """Normalised MR (0 -> 0, p99.5 -> 1) to the generators' scale, ``2 mr - 1`` (no clipping)."""
    return 2.0 * mr - 1.0


class PixelGANConfig(ModelConfig):
    """Fields shared by Pix2Pix, CycleGAN and CUT (sampling, networks, inference).

    Attributes:
        mode: ``"2d"`` axial slices, ``"2.5d"`` stacks of ``context_slices`` slices, ``"3d"`` patches.
        context_slices: k (odd) neighbouring slices of a 2.5D stack; edge slices repeat at the ends.
        slices_per_volume: axial slices (2D/2.5D) drawn per volume and step, among slices with body.
        patch_size: (d, h, w) 3D training patch and sliding-window size; multiples of the
            generator's downsampling factor.
        patches_per_volume: 3D patches drawn per volume and step, centred on random body voxels.
        channels, strides, num_res_units, norm: MONAI ``UNet`` generator (strides default to 2 per
            level; downsampling = product of strides; in-plane sizes are padded to a multiple).
        disc_channels, disc_layers, disc_num_d, disc_norm: MONAI ``MultiScalePatchDiscriminator``
            (discriminator i has ``disc_layers * (i + 1)`` layers; inputs need
            ``min size >= 2 ** (disc_layers * disc_num_d + 1)``; ``disc_norm="none"``: unnormalised
            hidden layers, see :func:`build_discriminator`).
        gan_criterion: adversarial criterion (LSGAN by default).
        inference_batch_size: slices per generator call in slice-wise inference.
        sw_overlap, sw_batch_size, sw_sigma_scale: 3D sliding-window inference (gaussian blending).
    """

    lr: PositiveRate = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    mode: Literal["2d", "2.5d", "3d"] = "2.5d"
    context_slices: int = 3
    slices_per_volume: int = 8
    patch_size: Size3 = (32, 64, 64)
    patches_per_volume: int = 2
    channels: tuple[int, ...] = (32, 64, 128, 256)
    strides: tuple[int, ...] | None = None
    num_res_units: int = 2
    norm: str = "INSTANCE"
    disc_channels: int = 64
    disc_layers: int = 2
    disc_num_d: int = 2
    disc_norm: Literal["INSTANCE", "BATCH", "none"] = "INSTANCE"
    gan_criterion: Literal["least_squares", "bce", "hinge"] = "least_squares"
    inference_batch_size: int = 16
    sw_overlap: float = 0.5
    sw_batch_size: int = 4
    sw_sigma_scale: float = 0.125

    _odd_context = field_validator("context_slices")(odd_context_slices)

    @field_validator("num_res_units")
    @classmethod
    def _residual(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"num_res_units must be >= 1 (residual UNet generator), got {value}")
        return value

    @field_validator("sw_overlap")
    @classmethod
    def _overlap(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"sw_overlap must be in [0, 1), got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "PixelGANConfig":
        if len(self.channels) < 2:
            raise ValueError(f"channels: needs at least 2 levels, got {list(self.channels)}")
        if self.strides is not None and len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"strides: needs len(channels) - 1 = {len(self.channels) - 1} entries, got {list(self.strides)}")
        factor = self.downsampling
        if self.mode == "3d" and any(size % factor for size in self.patch_size):
            raise ValueError(f"patch_size: {list(self.patch_size)} must be a multiple of the generator's "
                             f"downsampling factor {factor} (product of strides)")
        for name in ("slices_per_volume", "patches_per_volume", "inference_batch_size", "sw_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        return self

    @property
    def spatial_dims(self) -> int:
        """2 for slice modes, 3 for patches."""
        return 3 if self.mode == "3d" else 2

    @property
    def stack_depth(self) -> int:
        """Slices per 2.5D stack (1 in 2D and 3D modes)."""
        return self.context_slices if self.mode == "2.5d" else 1

    @property
    def generator_strides(self) -> tuple[int, ...]:
        """UNet strides (default 2 per level)."""
        return tuple(self.strides) if self.strides is not None else (2,) * (len(self.channels) - 1)

    @property
    def downsampling(self) -> int:
        """Spatial factor the generator's input must be a multiple of."""
        return math.prod(self.generator_strides)


def water_head(spatial_dims: int, in_channels: int, out_channels: int, initial_output: float,
               kernel_size: int = 1) -> nn.Module:
    """A convolution whose weights start at 0 and bias at ``atanh(initial_output)``: followed by
    ``tanh``, a fresh generator outputs exactly ``initial_output`` (water) everywhere."""
    convolution = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
    head = convolution(in_channels, out_channels, kernel_size=kernel_size, padding=kernel_size // 2)
    nn.init.zeros_(head.weight)
    nn.init.constant_(head.bias, math.atanh(initial_output))
    return head


class TanhUNet(nn.Module):
    """MONAI residual ``UNet`` + zero-initialised 1x1 convolution head + ``tanh``; encoder exposed for CUT.

    The head's weights start at 0 and its bias at ``atanh(initial_output)``, so a fresh network
    outputs exactly ``initial_output`` everywhere (water for MR -> CT, not the +1023 HU a
    zero-centred tanh gives) and learns from there (the head's weight gradients are non-zero).
    """

    def __init__(self, config: PixelGANConfig, in_channels: int, out_channels: int, initial_output: float) -> None:
        super().__init__()
        self.unet = UNet(spatial_dims=config.spatial_dims, in_channels=in_channels, out_channels=config.channels[0],
                         channels=config.channels, strides=config.generator_strides,
                         num_res_units=config.num_res_units, norm=config.norm)
        self.head = water_head(config.spatial_dims, config.channels[0], out_channels, initial_output)
        #: Channels of :meth:`encode`'s feature maps: the input, then every encoder level.
        self.encoder_channels = [in_channels, *config.channels]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in, *spatial)`` -> ``(N, out, *spatial)`` in (-1, 1)."""
        return torch.tanh(self.head(self.unet(x)))

    def encoder_blocks(self) -> list[nn.Module]:
        """The down path of the MONAI UNet in order (level 0 down block ... bottom block).

        MONAI nests ``Sequential(down, SkipConnection(sub), up)``; each down block receives the
        previous one's output, so chaining them reproduces the encoder's activations.
        """
        blocks, level = [], self.unet.model
        while True:
            blocks.append(level[0])
            inner = level[1].submodule
            if isinstance(inner, nn.Sequential) and len(inner) == 3 and isinstance(inner[1], SkipConnection):
                level = inner
            else:
                blocks.append(inner)
                return blocks

    def encode(self, x: torch.Tensor, layers: tuple[int, ...]) -> list[torch.Tensor]:
        """Encoder feature maps: layer 0 is the input, layer i the output of encoder block i - 1."""
        features, current = [x] if 0 in layers else [], x
        for index, block in enumerate(self.encoder_blocks(), start=1):
            if index > max(layers):
                break
            current = block(current)
            if index in layers:
                features.append(current)
        return features


class PixelGAN(TranslationModel):
    """Base of the pixel GANs: view sampling, step counter, phase hand-over, whole-volume inference.

    Subclasses set ``self.generator`` (the MR -> CT network, e.g. :class:`TanhUNet`), ``self.output_channel``
    (the output channel that is the centre slice) and implement ``forward``. Phases run
    generator first: the generator phase stashes its detached fakes and views, and the
    discriminator phase of the same batch reuses them (one generator pass per step); called
    alone or on another batch, the discriminator phase samples and generates afresh.
    """

    input_key = "mr_pixels"
    output_space = "ct_full"
    phases = ("generator", "discriminator")
    generator: nn.Module
    output_channel: int = 0

    def __init__(self, config: PixelGANConfig) -> None:
        super().__init__(config)
        # Generator-phase forward calls in training mode; a buffer so checkpoints carry it.
        self.register_buffer("generator_steps", torch.zeros((), dtype=torch.long))
        self._stash_source: torch.Tensor | None = None
        self._stashed: dict[str, torch.Tensor] | None = None

    def count_step(self) -> int:
        """The step number before this call; increments the counter in training mode."""
        current = int(self.generator_steps)
        if self.training:
            self.generator_steps += 1
        return current

    def stash(self, batch: dict[str, torch.Tensor], **tensors: torch.Tensor) -> None:
        """Keep detached views / fakes of ``batch`` for the discriminator phase."""
        self._stash_source = batch[self.input_key]
        self._stashed = {name: value.detach() for name, value in tensors.items()}

    def unstash(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The stash of this very batch (then cleared), or None."""
        stashed, source = self._stashed, self._stash_source
        self._stashed, self._stash_source = None, None
        return stashed if stashed is not None and source is batch[self.input_key] else None

    def stashed_or_regenerated(self, batch: dict[str, torch.Tensor], regenerate) -> dict[str, torch.Tensor]:
        """For a discriminator phase: the generator phase's stash of this batch, or (none) fresh
        unpaired views passed through ``regenerate(views) -> tensors`` without gradients."""
        stashed = self.unstash(batch)
        if stashed is None:
            views = self.sample_views(batch, paired=False)
            with torch.no_grad():
                stashed = regenerate(views)
        return stashed

    def sample_views(self, batch: dict[str, torch.Tensor], paired: bool) -> dict[str, torch.Tensor]:
        """Training views of a batch of whole volumes.

        Returns ``mr`` (signed MR), ``ct``, ``mask`` (the MR views' body mask) and ``ct_mask``, each
        ``(N, k, H', W')`` (in-plane padded to the generator's multiple) or ``(N, 1, *patch_size)``.
        Paired: CT views at the MR views' places. Unpaired: CT views from the next case of the
        batch (``torch.roll``) at independently drawn places, which differ from the MR's places
        when the batch holds one case, so no view pair is ever aligned.
        """
        config: PixelGANConfig = self.config
        mr = mr_to_signed(batch["mr_pixels"].float())
        ct, mask = batch["ct_pixels"].float(), batch["mask_pixels"].float()
        if config.mode == "3d":
            mr, ct = (pad_volume_to(volume, config.patch_size, SIGNED_BACKGROUND) for volume in (mr, ct))
            mask = pad_volume_to(mask, config.patch_size, 0.0)
        cases = mr.shape[0]
        own = torch.arange(cases, device=mr.device)
        partner = own if paired else unpaired_partner(cases).to(mr.device)
        mr_places = self._draw_places(mask)
        ct_places = mr_places if paired else self._draw_places(mask[partner])
        if not paired and cases == 1:
            ct_places = avoid_same(ct_places, mr_places, lambda: self._draw_places(mask[partner]))
        return {"mr": self._gather(mr, own, mr_places, SIGNED_BACKGROUND), "mask": self._gather(mask, own, mr_places, 0.0),
                "ct": self._gather(ct, partner, ct_places, SIGNED_BACKGROUND),
                "ct_mask": self._gather(mask, partner, ct_places, 0.0)}

    def _draw_places(self, mask: torch.Tensor) -> torch.Tensor:
        """Per case, slice indices ``(B, n)`` or patch corners ``(B, n, 3)``."""
        config: PixelGANConfig = self.config
        if config.mode == "3d":
            return sample_patch_starts(mask, config.patches_per_volume, config.patch_size)
        return sample_slices(mask, config.slices_per_volume)

    def _gather(self, volume: torch.Tensor, cases: torch.Tensor, places: torch.Tensor, pad_value: float) -> torch.Tensor:
        """The views of ``volume`` at ``places`` of each case in ``cases``."""
        config: PixelGANConfig = self.config
        index = cases.repeat_interleave(places.shape[1])
        if config.mode == "3d":
            return gather_patches(volume, index, places.flatten(0, 1), config.patch_size)
        stacks = gather_stacks(volume, index, places.flatten(), config.stack_depth)
        return pad_to_multiple(stacks, config.downsampling, pad_value)

    def make_discriminator(self, in_channels: int) -> MultiScalePatchDiscriminator:
        """A multi-scale PatchGAN for ``in_channels``-channel views, sized by the ``disc_*`` fields."""
        config: PixelGANConfig = self.config
        return build_discriminator(config.spatial_dims, in_channels, config.disc_channels, config.disc_layers,
                                   config.disc_num_d, config.disc_norm)

    def check_view(self, view: torch.Tensor) -> None:
        """Fail with the config fields to change when views are too small for the discriminator."""
        check_discriminator_input(view, self.config.disc_layers, self.config.disc_num_d)

    @staticmethod
    def zero_loss(module: nn.Module) -> torch.Tensor:
        """A 0 loss for a phase switched off this step; it reaches every parameter of ``module``
        (zero gradients, so Adam leaves them unchanged) so that DDP sees them all used."""
        return sum(parameter.sum() for parameter in module.parameters()) * 0.0

    @torch.no_grad()
    def translate(self, inputs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Whole-volume sCT: ``(B, 1, D, H, W)`` normalised MR -> ``(B, 1, D, H, W)`` CT in [-1, 1].

        2D / 2.5D: slice-wise over all axial slices (edge-padded stacks, batched, in-plane padded
        to the downsampling multiple and cropped back). 3D: gaussian-blended sliding windows of
        ``patch_size`` with ``sw_overlap``. Deterministic (``generator`` is unused).
        """
        config: PixelGANConfig = self.config
        signed = mr_to_signed(inputs.float())
        if config.mode == "3d":
            inferer = make_inferer(config.patch_size, config.sw_overlap, config.sw_batch_size, config.sw_sigma_scale)
            network = self.generator
            channel = self.output_channel
            output = sliding_window_translate(signed, lambda x: network(x)[:, channel:channel + 1], inferer)
        else:
            output = slicewise_translate(signed, self.generator, config.stack_depth, config.inference_batch_size,
                                         config.downsampling, self.output_channel)
        return output.clamp(-1.0, 1.0)


class PairedGAN(PixelGAN):
    """Base of the paired conditional GANs (Pix2Pix, ResViT): MR views -> centre CT slice or patch.

    Subclasses set ``generator``, ``discriminator`` (sees the MR views and a CT, concatenated) and
    ``adversarial``, and implement ``_generator_losses(batch)``; the generator phase stashes
    ``condition`` / ``target`` / ``fake`` / ``warmup`` for :meth:`_discriminator_losses`.
    """

    discriminator: nn.Module
    adversarial: AdversarialLoss

    def phase_parameters(self, phase: str) -> list[torch.nn.Parameter]:
        """Generator parameters for ``"generator"``, discriminator ones for ``"discriminator"``."""
        if phase == "generator":
            return list(self.generator.parameters())
        if phase == "discriminator":
            return list(self.discriminator.parameters())
        raise ValueError(f"unknown phase {phase!r}; {type(self).__name__} has {self.phases}")

    def forward(self, batch: dict[str, torch.Tensor], phase: str = "generator") -> dict[str, torch.Tensor]:
        """Losses of one phase; ``loss`` is back-propagated."""
        if phase == "generator":
            return self._generator_losses(batch)
        if phase == "discriminator":
            return self._discriminator_losses(batch)
        raise ValueError(f"unknown phase {phase!r}; {type(self).__name__} has {self.phases}")

    def in_warmup(self, step: int) -> bool:
        """Whether generator step ``step`` (0-based) is a warm-up step without GAN (default: never)."""
        return False

    def paired_terms(self, condition: torch.Tensor, fake: torch.Tensor, target: torch.Tensor,
                     mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The terms every paired generator loss has: ``l1`` to the CT inside the body mask,
        ``background`` (L1 to air outside it) and ``gan`` (the frozen discriminator fooled)."""
        with frozen(self.discriminator):
            logits = discriminator_logits(self.discriminator(torch.cat([condition, fake], 1)))
        return {"l1": masked_l1(fake, target, mask), "background": background_l1(fake, mask, AIR_SIGNED),
                "gan": self.adversarial.generator(logits)}

    def _discriminator_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        stashed = self.unstash(batch)
        if stashed is None:
            warmup = self.in_warmup(int(self.generator_steps))
            stashed = {"warmup": torch.tensor(float(warmup))}
            if not warmup:
                views = self.sample_views(batch, paired=True)
                with torch.no_grad():
                    stashed.update(condition=views["mr"], target=centre_channel(views["ct"]),
                                   fake=self.generator(views["mr"]))
        if bool(stashed["warmup"]):
            return {"loss": self.zero_loss(self.discriminator)}
        condition = stashed["condition"]
        real_logits = discriminator_logits(self.discriminator(torch.cat([condition, stashed["target"]], 1)))
        fake_logits = discriminator_logits(self.discriminator(torch.cat([condition, stashed["fake"]], 1)))
        loss = self.adversarial.discriminator(real_logits, fake_logits)
        return {"loss": loss, "d_real": torch.stack([r.mean() for r in real_logits]).mean().detach(),
                "d_fake": torch.stack([f.mean() for f in fake_logits]).mean().detach()}
