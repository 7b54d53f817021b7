"""The training volumes of ``latent vae fit``: checks of the given arrays and the sampler that
draws (body-biased) crops or whole volumes for each step."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check_volumes(volumes: Sequence[np.ndarray], factor: int, what: str = "volume") -> list[np.ndarray]:
    if len(volumes) == 0:
        raise ValueError("fit_vae needs at least one volume")
    checked = []
    for index, volume in enumerate(volumes):
        array = np.asarray(volume, dtype=np.float32)
        if array.ndim != 3:
            raise ValueError(f"{what} {index} must be 3D (z, y, x), got shape {array.shape}")
        if any(s % factor for s in array.shape):
            raise ValueError(f"{what} {index} shape {array.shape} is not a multiple of {factor}: use a canonical grid")
        if not np.isfinite(array).all():
            raise ValueError(f"{what} {index} holds NaN or inf")
        checked.append(np.ascontiguousarray(array))
    return checked


def _check_masks(masks: Sequence[np.ndarray] | None, volumes: list[np.ndarray], what: str) -> list[np.ndarray] | None:
    if masks is None:
        return None
    if len(masks) != len(volumes):
        raise ValueError(f"{len(masks)} {what} masks for {len(volumes)} volumes")
    checked = []
    for index, (mask, volume) in enumerate(zip(masks, volumes)):
        mask = np.asarray(mask) > 0
        if mask.shape != volume.shape:
            raise ValueError(f"{what} mask {index} has shape {mask.shape}, its volume {volume.shape}")
        checked.append(mask)
    return checked


class _BatchSampler:
    """Random batches (with replacement) of whole same-shape volumes or of equal crops.

    With masks, a ``body_fraction`` share of crops is centred on a random body voxel (clamped
    to the volume), the rest placed uniformly. Reproducible from the generator passed in,
    which the loop seeds from (seed, step).
    """

    def __init__(self, volumes: list[np.ndarray], batch_size: int, flip: bool, crop: tuple[int, ...] | None,
                 masks: list[np.ndarray] | None = None, body_fraction: float = 0.0) -> None:
        self.volumes, self.batch_size, self.flip, self.crop = volumes, batch_size, flip, crop
        self.body_fraction = body_fraction if masks is not None else 0.0
        self.body_voxels = None if masks is None else [np.flatnonzero(m) for m in masks]
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, volume in enumerate(volumes):
            groups.setdefault(volume.shape if crop is None else (), []).append(index)
        self.groups = list(groups.values())
        self.weights = np.array([len(g) for g in self.groups], dtype=float) / len(volumes)

    def _crop_start(self, rng: np.random.Generator, index: int) -> list[int]:
        shape = self.volumes[index].shape
        voxels = None if self.body_voxels is None else self.body_voxels[index]
        if voxels is not None and voxels.size and rng.random() < self.body_fraction:
            centre = np.unravel_index(int(voxels[rng.integers(0, voxels.size)]), shape)
            return [int(np.clip(c - k // 2, 0, s - k)) for c, k, s in zip(centre, self.crop, shape)]
        return [int(rng.integers(0, s - c + 1)) for s, c in zip(shape, self.crop)]

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        group = self.groups[rng.choice(len(self.groups), p=self.weights)]
        batch = []
        for index in rng.choice(group, size=self.batch_size, replace=True):
            volume = self.volumes[index]
            if self.crop is not None:
                start = self._crop_start(rng, int(index))
                volume = volume[tuple(slice(b, b + c) for b, c in zip(start, self.crop))]
            if self.flip and rng.random() < 0.5:
                volume = volume[:, :, ::-1]
            batch.append(volume)
        return np.stack(batch)[:, None].copy()
