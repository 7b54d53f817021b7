"""Parts of the ``regress3d`` family shared with its perception loss: deep-supervision weights,
targets on a head's grid, masked means, the gradient-matching term, networks kept channels-last
(DynUNet registered once: ``latent.core.segmentation_network.register_once``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def supervision_weights(heads: int) -> list[float]:
    """nnU-Net's deep-supervision weights: halving per level, normalised to sum 1 (``heads + 1`` outputs)."""
    raw = [0.5**level for level in range(heads + 1)]
    return [w / sum(raw) for w in raw]


def downsample_target(ct: torch.Tensor, mask: torch.Tensor, size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """CT (trilinear) and mask (nearest) ``(N, 1, D, H, W)`` resampled to ``size`` (d, h, w)."""
    if tuple(ct.shape[2:]) == tuple(size):
        return ct, mask
    return (F.interpolate(ct, size=size, mode="trilinear", align_corners=False),
            F.interpolate(mask, size=size, mode="nearest"))


def masked_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` weighted by ``weight`` (same shape); 0 where the weight is empty."""
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


def gradient_l1(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 between finite-difference gradients of ``(N, 1, D, H, W)`` tensors, over voxel pairs in the mask."""
    total = prediction.new_zeros(())
    for axis in (2, 3, 4):
        pairs = mask.narrow(axis, 1, mask.shape[axis] - 1) * mask.narrow(axis, 0, mask.shape[axis] - 1)
        total = total + masked_mean((prediction.diff(dim=axis) - target.diff(dim=axis)).abs(), pairs)
    return total / 3.0


def use_channels_last(network: torch.nn.Module) -> torch.nn.Module:
    """Move ``network``'s weights to the channels-last 3D layout; its state dict stays contiguous.

    Convolutions with channels-last weights run in that layout, about 1.3x faster per training
    step on a CPU (docs/models.md). Safetensors refuses non-contiguous tensors, so a hook hands
    out contiguous copies in ``state_dict`` (saving); loading copies into the channels-last weights.
    """
    network.to(memory_format=torch.channels_last_3d)

    def contiguous_state(module: torch.nn.Module, state: dict, prefix: str, metadata: dict) -> None:
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and not value.is_contiguous():
                state[key] = value.contiguous()

    network.register_state_dict_post_hook(contiguous_state)
    return network
