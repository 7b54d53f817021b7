"""Combining outputs: flip test-time augmentation and per-voxel moments.

One code path gives the mean and the per-voxel standard deviation of every set of outputs that
``latent predict`` averages: the K samples of a diffusion model, the mirrored copies of flip
TTA (on the canonical grid, :func:`latent.decode.pipeline.predict_canonical`) and the members of an
ensemble (on the native grid, :func:`combine_predictions`).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import torch

from latent.core.errors import BadConfigError

#: ``--tta`` values: no augmentation, or every combination of the family's flip axes.
TTA_MODES = ("none", "flip")
#: Canonical axis name -> dimension of a (B, C, z, y, x) tensor.
AXIS_DIMS = {"z": -3, "y": -2, "x": -1}


def check_tta(mode: str) -> str:
    """``mode`` if it is one of :data:`TTA_MODES`.

    Raises:
        BadConfigError: naming ``--tta`` and the allowed values.
    """
    if mode not in TTA_MODES:
        raise BadConfigError(f"--tta: {mode!r} is not one of {', '.join(TTA_MODES)}")
    return mode


def flip_variants(axes: Sequence[str], mode: str = "none") -> list[tuple[int, ...]]:
    """Tensor dims to mirror for each TTA pass: ``[()]`` for ``none``, every subset of ``axes`` for ``flip``.

    Raises:
        BadConfigError: an unknown mode or axis.
    """
    check_tta(mode)
    unknown = [axis for axis in axes if axis not in AXIS_DIMS]
    if unknown:
        raise BadConfigError(f"flip_axes: unknown axis {unknown[0]!r}; use z, y or x")
    if mode == "none":
        return [()]
    dims = [AXIS_DIMS[axis] for axis in axes]
    return [combo for size in range(len(dims) + 1) for combo in itertools.combinations(dims, size)]


def mirror(tensor: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``tensor`` mirrored along ``dims`` (itself when there are none); its own inverse."""
    return torch.flip(tensor, dims) if dims else tensor


class Moments:
    """Running per-voxel mean and standard deviation of volumes, each entry weighted equally.

    An entry is a volume, or the mean and std of a group (an ensemble member's K samples and
    flips): the result is the mixture's moments, ``var = mean(std_i^2 + mean_i^2) - mean^2``.
    Sums are float64, so equal float32 volumes give a std of exactly 0.
    """

    def __init__(self) -> None:
        self.count = 0
        self.grouped = False
        self._sum: np.ndarray | None = None
        self._squares: np.ndarray | None = None

    def add(self, mean: np.ndarray, std: np.ndarray | None = None) -> None:
        """Add one volume (``std`` None) or one group's mean and std."""
        mean = np.asarray(mean, dtype=np.float64)
        squares = mean * mean if std is None else mean * mean + np.square(np.asarray(std, dtype=np.float64))
        self.grouped = self.grouped or std is not None
        if self._sum is None:
            self._sum, self._squares = mean.copy(), squares
        else:
            self._sum += mean
            self._squares += squares
        self.count += 1

    def result(self) -> tuple[np.ndarray, np.ndarray | None]:
        """``(mean, std)`` as float32; std is None for a single plain volume."""
        if self._sum is None:
            raise ValueError("no volume added")
        mean = self._sum / self.count
        if self.count == 1 and not self.grouped:
            return mean.astype(np.float32), None
        variance = np.maximum(self._squares / self.count - mean * mean, 0.0)
        return mean.astype(np.float32), np.sqrt(variance).astype(np.float32)


def combine_volumes(means: Sequence[np.ndarray], stds: Sequence[np.ndarray | None] | None = None
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean and std of ``means`` (with each entry's own ``stds``, if any) through :class:`Moments`."""
    moments = Moments()
    for index, mean in enumerate(means):
        moments.add(mean, None if stds is None else stds[index])
    return moments.result()


__all__ = ["AXIS_DIMS", "Moments", "TTA_MODES", "check_tta", "combine_volumes", "flip_variants", "mirror"]
