"""Exponential moving average (EMA) of a model's weights, for every model the project trains.

The average is a ``torch.optim.swa_utils.AveragedModel`` (a copy of the model; register it with
``accelerator.register_for_checkpointing`` so a resumed run continues the same average). Its
decay ramps up over the first updates, ``min(decay, (1 + n) / (10 + n))``, so the weights a run
starts from fade fast. Buffers (normalisation statistics, step counters) are copied, not averaged.
Build it from the bare model, before ``accelerator.prepare`` patches ``forward``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.optim.swa_utils import AveragedModel


def ema_average(decay: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The ``avg_fn`` of an EMA with ``decay``, ramped up over the first updates."""

    def average(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        effective = min(decay, (1.0 + float(num_averaged)) / (10.0 + float(num_averaged)))
        return averaged * effective + current * (1.0 - effective)

    return average


def weight_average(model: torch.nn.Module, decay: float) -> AveragedModel:
    """An EMA of ``model``'s parameters (a copy; the first :func:`update_average` sets it to the model)."""
    return AveragedModel(model, avg_fn=ema_average(decay))


@torch.no_grad()
def update_average(average: AveragedModel, model: torch.nn.Module) -> None:
    """Fold ``model``'s current parameters into ``average`` and copy its buffers."""
    average.update_parameters(model)
    for kept, current in zip(average.module.buffers(), model.buffers()):
        kept.copy_(current)
