"""Frozen networks from plain state dicts: read a ``.pt`` / ``.safetensors`` file, load it strictly
into a built network, freeze it. Every failure is one line naming the file; callers pick the
exception class (a :class:`~latent.core.errors.WeightsError`) and how the weights are called."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latent.core.errors import WeightsError


def read_state_dict(path: Path, *, what: str = "weights", error: type[WeightsError] = WeightsError,
                    wrapper_key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a plain state dict (``.safetensors``, else ``torch.load(weights_only=True)``).

    Args:
        path: the weights file.
        what: how the message calls the weights (``"VAE weights"``).
        error: the exception class raised.
        wrapper_key: a key some checkpoints wrap their state dict in (unwrapped when present).

    Raises:
        error: the file cannot be read or does not hold a mapping of tensors.
    """
    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for a corrupt file
        first = (str(exc).strip().splitlines() or [""])[0]
        raise error(f"cannot read {what} {path}: {type(exc).__name__}: {first}") from exc
    if wrapper_key is not None and isinstance(state, Mapping) and wrapper_key in state:
        state = state[wrapper_key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise error(f"{path} does not hold a state dict of tensors")
    return dict(state)


def load_strict(network: nn.Module, state: Mapping[str, torch.Tensor], path: Path, *,
                error: type[WeightsError] = WeightsError) -> None:
    """Load ``state`` (read from ``path``) into ``network``: every key, every shape, or ``error``."""
    model_keys = set(network.state_dict())
    missing = sorted(model_keys - set(state))
    unexpected = sorted(set(state) - model_keys)
    if missing or unexpected:
        raise error(
            f"{path} does not match the {type(network).__name__} architecture: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shape mismatch: another channel configuration
        first = str(exc).strip().splitlines()[-1].strip()
        raise error(f"{path} does not match the configured architecture: {first}") from exc


def freeze(network: nn.Module) -> nn.Module:
    """Eval mode and no gradients for every parameter; returns ``network``."""
    network.eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return network
