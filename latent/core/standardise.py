"""The one latent standardisation: per-channel ``(z - mean) / std`` with the cache's train-set
statistics (docs/cache.md), for numpy arrays and torch tensors, (C, d, h, w) or (B, C, d, h, w)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from latent.core.errors import BadConfigError


def _per_channel(values: Sequence[float] | Any, z):
    """``values`` shaped (C, 1, 1, 1) in z's library, dtype and device (broadcasts over B)."""
    channels = z.shape[-4]
    if isinstance(z, torch.Tensor):
        tensor = torch.as_tensor(values, dtype=z.dtype, device=z.device).reshape(-1)
        if tensor.numel() != channels:
            raise BadConfigError(f"{tensor.numel()} statistics for {channels} latent channels")
        return tensor.reshape(-1, 1, 1, 1)
    array = np.asarray(values, dtype=z.dtype).reshape(-1)
    if array.size != channels:
        raise BadConfigError(f"{array.size} statistics for {channels} latent channels")
    return array.reshape(-1, 1, 1, 1)


def _check(mean, std) -> bool:
    if (mean is None) != (std is None):
        raise ValueError("pass both mean and std, or neither")
    return mean is not None


def standardise(z, mean, std):
    """``(z - mean) / std`` per latent channel; ``mean = std = None`` is the identity."""
    return (z - _per_channel(mean, z)) / _per_channel(std, z) if _check(mean, std) else z


def destandardise(z, mean, std):
    """Inverse of :func:`standardise`: ``z * std + mean`` per latent channel."""
    return z * _per_channel(std, z) + _per_channel(mean, z) if _check(mean, std) else z
