"""nnU-Net-style 3D regression MR -> sCT: a planned residual U-Net, deep supervision, patch training.

The network is MONAI ``DynUNet`` with residual blocks. Its kernel sizes and strides are planned
from the training patch and the voxel spacing the way nnU-Net plans them (:func:`plan_topology`):
coarse axes keep kernel 1 and stride 1 until the fine axes have been downsampled to a comparable
spacing. Filters double per level from ``base_channels`` up to ``max_channels``.

Training: batches may hold whole canonical volumes; ``forward`` crops one random patch of
``patch_size`` per volume (``patches_per_volume``), a ``body_patch_fraction`` of them centred on
a random body voxel. Loss: masked L1 (or MSE) against ``ct_pixels`` inside ``mask_pixels`` plus
``background_weight`` x L1 to air outside, on the full-resolution output and on every
deep-supervision head (target and mask downsampled to the head's grid, weights halving per
level and summing to 1), plus an optional gradient-matching term and an optional anatomical perception term (L1 between
normalised features of a frozen segmentation network on CT and sCT; translate/models/perception.py).
The network reads the
normalised MR as it is (background 0, in-body p99.5 = 1; docs/intensities.md).

Inference: gaussian-blended sliding windows of ``patch_size`` over the whole volume, the output
clipped to [-1, 1] (CT on [-1024, 3071] HU).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from monai.networks.nets import DynUNet
from pydantic import model_validator
from torch import nn

from latent.core.intensity import FULL_CT_MAX_HU, FULL_CT_MIN_HU
from latent.translate.models.base import ModelConfig, PositiveRate, Size3, TranslationModel
from latent.translate.models.gan_common import pad_volume_to
from latent.translate.models.gan_views import make_inferer, sliding_window_translate
from latent.core.segmentation_network import register_once
from latent.translate.models.l2sct import AIR_VALUE, START_VALUE
from latent.translate.models.perception import PerceptionNetwork, PerceptionSettings, PerceptionTerm
from latent.translate.models.regress3d_parts import (
    downsample_target,
    gradient_l1,
    masked_mean,
    supervision_weights,
    use_channels_last,
)

#: nnU-Net treats axes within this factor of the finest spacing as isotropic (3x3x3 kernels, pooling).
ANISOTROPY_RATIO = 2.0
#: DynUNet needs an input block, at least one down/up level and a bottleneck.
MIN_LEVELS = 3
#: Pad values of a volume smaller than the patch: MR background, CT -1024 HU, no body.
MR_PAD, CT_PAD, MASK_PAD = 0.0, -1.0, 0.0
#: Half the full-range width: [-1, 1] units -> HU differences.
HU_PER_UNIT = (FULL_CT_MAX_HU - FULL_CT_MIN_HU) / 2.0

Topology = tuple[list[list[int]], list[list[int]]]


def plan_topology(patch_size: tuple[int, int, int], spacing_zyx: tuple[float, float, float],
                  max_levels: int = 6, min_feature_size: int = 4) -> Topology:
    """nnU-Net's plan of per-level kernel sizes and strides for a patch and a voxel spacing.

    Per level: an axis is downsampled (stride 2) when its size is at least ``2 * min_feature_size``
    and its spacing within ``ANISOTROPY_RATIO`` of the finest spacing among such axes; the kernel
    is 3 on axes within that ratio of the finest current spacing (and stays 3 once it is), else 1.
    Downsampled axes halve their size and double their spacing.

    Args:
        patch_size: (d, h, w) training patch in voxels.
        spacing_zyx: voxel spacing (z, y, x) in mm.
        max_levels: at most this many resolution levels (the first has stride 1).
        min_feature_size: no axis is downsampled below this size.

    Returns:
        ``(kernel_sizes, strides)``, one ``[z, y, x]`` entry per level; ``strides[0] == [1, 1, 1]``.
    """
    size, spacing = [float(s) for s in patch_size], [float(s) for s in spacing_zyx]
    kernel, kernels, strides = [1, 1, 1], [], [[1, 1, 1]]
    while True:
        finest = min(spacing)
        kernel = [3 if k == 3 or s <= ANISOTROPY_RATIO * finest else 1 for k, s in zip(kernel, spacing)]
        kernels.append(list(kernel))
        if len(strides) == max_levels:
            break
        large = [axis for axis in range(3) if size[axis] >= 2 * min_feature_size]
        if not large:
            break
        finest_large = min(spacing[axis] for axis in large)
        stride = [2 if axis in large and spacing[axis] <= ANISOTROPY_RATIO * finest_large else 1 for axis in range(3)]
        strides.append(stride)
        size = [math.ceil(s / st) for s, st in zip(size, stride)]
        spacing = [s * st for s, st in zip(spacing, stride)]
    return kernels, strides


def total_stride(strides: list[list[int]]) -> tuple[int, ...]:
    """Per-axis product of the strides: patch sides must be multiples of it."""
    return tuple(math.prod(level[axis] for level in strides) for axis in range(3))


class Regress3DConfig(PerceptionSettings, ModelConfig):
    """Config of :class:`Regress3D`.

    Attributes:
        patch_size: (d, h, w) training patch and sliding window; multiples of the planned total stride.
        spacing_zyx: voxel spacing (z, y, x) mm of the canonical grid the model trains on (planning only).
        max_levels, min_feature_size: planner limits (:func:`plan_topology`).
        base_channels, max_channels: filters of level i: ``min(base_channels * 2**i, max_channels)``.
        deep_supr_num: deep-supervision heads below full resolution (0: off); fewer than levels - 1.
        patches_per_volume: patches cropped per volume and step.
        body_patch_fraction: share of patches centred on a random body voxel (the rest uniform).
        loss: ``"l1"`` or ``"mse"`` inside the body mask.
        background_weight: weight of the L1 to air (-1000 HU) outside the mask.
        gradient_weight: weight of the L1 between finite-difference gradients of sCT and CT in the mask.
        overlap: sliding-window overlap at inference (gaussian blending).
        sw_batch_size: windows per network call at inference. At least 2 on a CPU: PyTorch runs a
            batch of one small 3D tensor through a slow fallback convolution (docs/models.md).
        channels_last: keep the network in the channels-last 3D memory layout (faster convolutions
            on a CPU, docs/models.md); saved weights are contiguous either way.
        perception_*: the optional perception loss (:class:`PerceptionSettings`).
    """

    family: Literal["regress3d"] = "regress3d"
    #: A common Adam rate for instance-normalised U-Nets.
    lr: PositiveRate = 3e-4
    patch_size: Size3 = (64, 128, 128)
    spacing_zyx: tuple[float, float, float] = (3.0, 1.5, 1.5)
    max_levels: int = 6
    min_feature_size: int = 4
    base_channels: int = 32
    max_channels: int = 320
    deep_supr_num: int = 2
    patches_per_volume: int = 1
    body_patch_fraction: float = 0.67
    loss: Literal["l1", "mse"] = "l1"
    background_weight: float = 0.1
    gradient_weight: float = 0.0
    overlap: float = 0.5
    sw_batch_size: int = 4
    channels_last: bool = True

    @model_validator(mode="after")
    def _check(self) -> "Regress3DConfig":
        positive = ("max_levels", "min_feature_size", "base_channels", "max_channels", "patches_per_volume",
                    "sw_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if any(side < 1 for side in self.patch_size):
            raise ValueError(f"patch_size: sides must be >= 1, got {list(self.patch_size)}")
        if any(s <= 0 for s in self.spacing_zyx):
            raise ValueError(f"spacing_zyx: must be positive (mm), got {list(self.spacing_zyx)}")
        if self.max_channels < self.base_channels:
            raise ValueError(f"max_channels: {self.max_channels} is below base_channels={self.base_channels}")
        if not 0.0 <= self.body_patch_fraction <= 1.0:
            raise ValueError(f"body_patch_fraction: must be in [0, 1], got {self.body_patch_fraction}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap: must be in [0, 1), got {self.overlap}")
        for name in ("background_weight", "gradient_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        kernels, strides = self.topology
        if len(strides) < MIN_LEVELS:
            raise ValueError(f"patch_size: {list(self.patch_size)} plans only {len(strides)} levels "
                             f"(min_feature_size={self.min_feature_size}, max_levels={self.max_levels}); "
                             f"DynUNet needs {MIN_LEVELS}")
        multiple = total_stride(strides)
        if any(side % m for side, m in zip(self.patch_size, multiple)):
            raise ValueError(f"patch_size: {list(self.patch_size)} is not divisible by the planned total stride "
                             f"{list(multiple)} (strides {strides}); round each side to a multiple")
        if not 0 <= self.deep_supr_num < len(strides) - 1:
            raise ValueError(f"deep_supr_num: must be in [0, {len(strides) - 2}] for the {len(strides)} planned "
                             f"levels, got {self.deep_supr_num}")
        return self

    @property
    def topology(self) -> Topology:
        """Planned ``(kernel_sizes, strides)`` of the network."""
        return plan_topology(self.patch_size, self.spacing_zyx, self.max_levels, self.min_feature_size)

    @property
    def filters(self) -> list[int]:
        """Channels per level, doubling from ``base_channels`` and capped at ``max_channels``."""
        return [min(self.base_channels * 2**level, self.max_channels) for level in range(len(self.topology[1]))]


# -- patch sampling ---------------------------------------------------------------------------
def sample_patch_starts(mask: torch.Tensor, count: int, patch_size: tuple[int, int, int], body_fraction: float,
                        generator: torch.Generator) -> torch.Tensor:
    """Patch corners per volume: a ``body_fraction`` centred on random body voxels, the rest uniform.

    Args:
        mask: ``(B, 1, D, H, W)`` body mask, every side at least the patch's.
        count: patches per volume.
        patch_size: (d, h, w).
        body_fraction: probability that a patch is body-centred (uniform when the mask is empty).
        generator: CPU generator of every random draw.

    Returns:
        ``(B, count, 3)`` long corners (z, y, x), each patch inside the volume.
    """
    shape, patch = torch.tensor(mask.shape[2:]), torch.tensor(patch_size)
    room = shape - patch  # the largest valid corner per axis
    rows = []
    for volume_mask in mask:
        voxels = torch.nonzero(volume_mask[0] > 0).cpu()
        corners = []
        for _ in range(count):
            if voxels.shape[0] and float(torch.rand((), generator=generator)) < body_fraction:
                centre = voxels[int(torch.randint(voxels.shape[0], (), generator=generator))]
                corners.append(torch.minimum((centre - patch // 2).clamp_min(0), room))
            else:
                corners.append((torch.rand(3, generator=generator) * (room + 1)).long().clamp(max=room))
        rows.append(torch.stack(corners))
    return torch.stack(rows)


def crop_patches(volume: torch.Tensor, starts: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """``(B * count, C, *patch_size)`` patches of ``(B, C, D, H, W)`` at corners ``starts`` (B, count, 3)."""
    d, h, w = patch_size
    return torch.stack([volume[b, :, z:z + d, y:y + h, x:x + w]
                        for b in range(starts.shape[0]) for z, y, x in starts[b].tolist()])


def training_patches(batch: dict[str, torch.Tensor], config: Regress3DConfig) -> dict[str, torch.Tensor]:
    """Padded, cropped training patches ``mr``, ``ct``, ``mask``, each ``(B * count, 1, *patch_size)``.

    The generator is seeded from torch's global RNG, which the training loop reseeds every
    micro-step, so the patches of a step are reproducible (and resume exactly).
    """
    generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
    size = config.patch_size
    mr = pad_volume_to(batch["mr_pixels"].float(), size, MR_PAD)
    ct = pad_volume_to(batch["ct_pixels"].float(), size, CT_PAD)
    mask = pad_volume_to(batch["mask_pixels"].float(), size, MASK_PAD)
    starts = sample_patch_starts(mask, config.patches_per_volume, size, config.body_patch_fraction, generator)
    return {name: crop_patches(volume, starts, size) for name, volume in (("mr", mr), ("ct", ct), ("mask", mask))}


# -- losses -----------------------------------------------------------------------------------
def head_scales(strides: list[list[int]], heads: int) -> list[tuple[int, int, int]]:
    """Per output (full resolution first), its downsampling factor (z, y, x) against the patch."""
    return [total_stride(strides[:level + 1]) for level in range(heads + 1)]


def split_heads(stacked: torch.Tensor, scales: list[tuple[int, int, int]]) -> list[torch.Tensor]:
    """DynUNet's training output ``(N, heads + 1, C, D, H, W)`` -> each head on its own grid.

    MONAI nearest-upsamples every head to full resolution before stacking; taking every
    ``scale``-th voxel recovers the head's own output exactly (integer factors).
    """
    return [stacked[:, k, :, ::sz, ::sy, ::sx] for k, (sz, sy, sx) in enumerate(scales)]


class Regress3D(TranslationModel):
    """Planned residual 3D U-Net (DynUNet) MR -> sCT, deep supervision in training, sliding windows at inference."""

    family: ClassVar[str] = "regress3d"
    config_class: ClassVar[type[Regress3DConfig]] = Regress3DConfig
    input_key: ClassVar[str] = "mr_pixels"
    output_space: ClassVar[str] = "ct_full"
    stochastic: ClassVar[bool] = False

    def __init__(self, config: Regress3DConfig) -> None:
        super().__init__(config)
        kernels, strides = config.topology
        self.network = register_once(DynUNet(
            spatial_dims=3, in_channels=1, out_channels=1, kernel_size=kernels, strides=strides,
            upsample_kernel_size=strides[1:], filters=config.filters, res_block=True,
            deep_supervision=config.deep_supr_num > 0, deep_supr_num=max(1, config.deep_supr_num),
        ))
        if config.channels_last:
            use_channels_last(self.network)
        self.supervision_scales = head_scales(strides, config.deep_supr_num)
        self.supervision_weights = supervision_weights(config.deep_supr_num)
        self._init_heads()
        self.perception_term = PerceptionTerm(config, self.family, spatial_dims=3)

    def prepare_training(self) -> None:
        """Load the frozen perception network now, so that bad weights fail before the first step."""
        self.perception_network()

    def perception_network(self) -> PerceptionNetwork | None:
        """The frozen segmentation network of the perception loss (loaded once), or ``None`` when off;
        never part of the saved model or the optimiser (:class:`PerceptionTerm`)."""
        return self.perception_term.network()

    def _init_heads(self) -> None:
        """Every output head starts at exactly 0 HU: zero weights (MONAI's kaiming init gives a fresh
        net output noise of 0.7-1 full-range units, 1400-2000 HU, at 4-8 base channels), bias at
        ``START_VALUE``; the heads' weight gradients are non-zero, so learning starts at once."""
        heads = [self.network.output_block]
        if self.config.deep_supr_num > 0:
            heads += list(self.network.deep_supervision_heads)
        for head in heads:
            nn.init.zeros_(head.conv.conv.weight)
            nn.init.constant_(head.conv.conv.bias, START_VALUE)

    def predict_heads(self, mr: torch.Tensor) -> list[torch.Tensor]:
        """Training outputs for ``(N, 1, *patch_size)`` MR: full resolution first, then each head on its grid."""
        output = self.network(mr).float()
        if output.ndim == 5:  # no deep supervision (or eval mode): one output
            return [output]
        return split_heads(output, self.supervision_scales)

    def forward(self, batch: dict[str, torch.Tensor], phase: str = "main") -> dict[str, torch.Tensor]:
        """Deep-supervised masked L1/MSE + background-to-air (+ gradient) loss on random patches.

        Args:
            batch: ``mr_pixels``, ``ct_pixels``, ``mask_pixels`` ``(B, 1, D, H, W)`` (volumes or patches).

        Returns:
            ``loss`` (back-propagated), ``l1_body`` / ``l1_background`` / ``mae_hu_body`` of the
            full-resolution output, ``deep_supervision`` (the heads' weighted share of the loss),
            ``gradient`` and ``perception`` (unweighted) when those terms are on.
        """
        config: Regress3DConfig = self.config
        patches = training_patches(batch, config)
        outputs = self.predict_heads(patches["mr"])
        # One output in eval mode (a validation loss): it carries the whole weight.
        weights = self.supervision_weights if len(outputs) > 1 else [1.0]
        loss, heads_share = patches["mr"].new_zeros(()), patches["mr"].new_zeros(())
        for level, (prediction, weight) in enumerate(zip(outputs, weights)):
            target, mask = downsample_target(patches["ct"], patches["mask"], tuple(prediction.shape[2:]))
            error = (prediction - target).abs() if config.loss == "l1" else (prediction - target).square()
            term = masked_mean(error, mask) + config.background_weight * masked_mean(
                (prediction - AIR_VALUE).abs(), 1.0 - mask)
            loss = loss + weight * term
            if level:
                heads_share = heads_share + weight * term.detach()
        full, target, mask = outputs[0], patches["ct"], patches["mask"]
        l1_body = masked_mean((full - target).abs(), mask).detach()
        losses = {"l1_body": l1_body, "l1_background": masked_mean((full - AIR_VALUE).abs(), 1.0 - mask).detach(),
                  "mae_hu_body": l1_body * HU_PER_UNIT, "deep_supervision": heads_share}
        if config.gradient_weight > 0:
            gradient = gradient_l1(full, target, mask)
            loss = loss + config.gradient_weight * gradient
            losses["gradient"] = gradient.detach()
        term = self.perception_term(full, target, mask)
        if term is not None:
            loss = loss + config.perception_weight * term
            losses["perception"] = term.detach()
        return {"loss": loss, **losses}

    @torch.no_grad()
    def translate(self, inputs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Whole-volume sCT: ``(B, 1, D, H, W)`` normalised MR -> ``(B, 1, D, H, W)`` CT in [-1, 1].

        Gaussian-blended windows of ``patch_size`` (volumes smaller than a window are padded with
        the MR background, 0, and cropped back). The network runs in eval mode, so no deep
        supervision output; deterministic (``generator`` is unused).
        """
        config: Regress3DConfig = self.config
        inferer = make_inferer(config.patch_size, config.overlap, config.sw_batch_size, pad_value=MR_PAD)
        was_training = self.network.training
        self.network.eval()
        try:
            output = sliding_window_translate(inputs.float(), lambda x: self.network(x).float(), inferer)
        finally:
            self.network.train(was_training)
        return output.clamp(-1.0, 1.0)
