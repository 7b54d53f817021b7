"""PyTorch dataset over a latent cache: split-aware, optional preload, aligned random crops.

Each item is ``{"pid": str, key: float32 tensor}``. Latents keep their channel axis,
``(C, d, h, w)``; pixel volumes and masks get one, ``(1, D, H, W)`` / ``(1, d, h, w)``, so
a default ``DataLoader`` batch is ``(B, C, ...)`` for every key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from latent.core.cases import read_split  # noqa: F401 - one split reader, re-exported
from latent.core.standardise import destandardise, standardise  # noqa: F401 - the one standardisation, re-exported
from latent.cache.store import ARRAY_KEYS, LATENT_KEYS, PIXEL_KEYS, CacheError, LatentCache


#: Redraws of a training crop that contains an excluded slice before it is kept anyway (masks zeroed).
CROP_DRAWS = 20


class LatentPairDataset(Dataset):
    """Cases of one split from a :class:`~latent.cache.store.LatentCache`.

    Args:
        cache: the producer group to read.
        pids: case ids of the split; every one must hold every key.
        keys: arrays to return (``mr_mu``, ``ct_mu``, ``mask_latent``, ``mr_pixels``,
            ``ct_pixels``, ``mask_pixels``).
        preload: read all cases into memory once (stored dtype, float16 by default).
        crop: random crop size in latent voxels (int or (d, h, w)); the same crop is taken
            from every latent-resolution key and the matching box, ``cache.downsample``
            (4) times larger, from pixel keys. A case smaller than the crop along an axis (cases
            of a fitted grid have their own shapes) is first padded to it: images and latents
            repeat their edge (air, since a fitted box ends at the body), masks are padded with 0.
        body_fraction: share of crops centred on a random body voxel (``mask_latent``, read for
            this when not among ``keys``); the others are uniform over the case.
        seed: crops depend only on (seed, epoch, index), so workers and reruns agree.
        normalise: standardise ``mr_mu``/``ct_mu`` with the cache's stored per-channel
            statistics (``(z - mean) / std``); undo with :func:`destandardise`.
        exclude_z: per case, canonical axial slices (pixel z indices) training must not learn
            from (``latent qa``'s flagged slices): crops are redrawn (up to
            :data:`CROP_DRAWS` times) to stay clear of them, and the body masks are zeroed there,
            so samplers that draw body slices skip them and masked losses ignore them.
    """

    def __init__(self, cache: LatentCache, pids: Iterable[str], keys: Sequence[str] = ("mr_mu", "ct_mu"),
                 preload: bool = False, crop: int | Sequence[int] | None = None, seed: int = 0,
                 normalise: bool = True, body_fraction: float = 0.0,
                 exclude_z: Mapping[str, Iterable[int]] | None = None) -> None:
        self.cache = cache
        self.pids = list(pids)
        self.exclude_z = {pid: np.array(sorted(set(z)), dtype=np.int64) for pid, z in (exclude_z or {}).items()
                          if pid in self.pids and len(set(z))}
        self.keys = tuple(keys)
        unknown = [key for key in self.keys if key not in ARRAY_KEYS]
        if unknown:
            raise ValueError(f"unknown keys {unknown}; allowed: {list(ARRAY_KEYS)}")
        lacking = [pid for pid in self.pids if not cache.has_case(pid, need=self.keys)]
        if lacking:
            raise CacheError(f"{len(lacking)} case(s) lack {list(self.keys)} or are not cached: "
                             f"{lacking[:10]}")
        self.crop = None if crop is None else _triple(crop)
        self.downsample = cache.downsample  # pixel keys are cropped this many times larger
        if self.crop is not None and self.downsample is None and set(self.keys) & set(PIXEL_KEYS):
            raise CacheError(f"producer {cache.key} records no pixel-to-latent factor")
        if not 0.0 <= body_fraction <= 1.0:
            raise ValueError(f"body_fraction must be in [0, 1], got {body_fraction}")
        self.body_fraction = body_fraction if self.crop is not None else 0.0
        self._read_keys = self.keys + (("mask_latent",) if self.body_fraction and "mask_latent" not in self.keys else ())
        self.seed = seed
        self.epoch = 0
        self.stats = {}
        if normalise and any(key in LATENT_KEYS for key in self.keys):
            stored = cache.latent_stats() or {}
            for key in (k for k in self.keys if k in LATENT_KEYS):
                if not stored.get(key):
                    raise CacheError(f"no latent statistics for {key} in producer {cache.key}; "
                                     "run update_latent_stats(train_pids) or pass normalise=False")
                self.stats[key] = stored[key]
        self._memory = ({pid: cache.read_case(pid, self._read_keys, as_float32=False) for pid in self.pids}
                        if preload else None)

    @classmethod
    def from_split(cls, cache: LatentCache, split_json_path: str | Path, split_name: str,
                   **kwargs) -> LatentPairDataset:
        """Dataset of the cases listed under ``split_name`` in a split JSON file."""
        return cls(cache, read_split(split_json_path, split_name), **kwargs)

    def set_epoch(self, epoch: int) -> None:
        """Draw a new set of crops (call once per epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.pids)

    def __getitem__(self, index: int) -> dict:
        pid = self.pids[index]
        arrays = (self._memory[pid] if self._memory is not None
                  else self.cache.read_case(pid, self._read_keys, as_float32=False))
        excluded = self.exclude_z.get(pid)
        start_z = 0
        if self.crop is not None:
            arrays, start_z = self._crop(arrays, np.random.default_rng([self.seed, self.epoch, index]), excluded)
        if excluded is not None:
            arrays = self._without_slices(arrays, excluded, start_z)
        item = {"pid": pid}
        for key in self.keys:
            # np.array copies: a tensor must never alias the preloaded arrays
            tensor = torch.from_numpy(np.array(arrays[key], dtype=np.float32))
            if tensor.ndim == 3:
                tensor = tensor.unsqueeze(0)
            if key in self.stats:
                tensor = standardise(tensor, self.stats[key]["mean"], self.stats[key]["std"])
            item[key] = tensor
        return item

    def _crop(self, arrays: dict[str, np.ndarray], rng: np.random.Generator,
              excluded: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], int]:
        """One random box in latent voxels (padded up to the crop first), scaled for pixel keys;
        returns the crops and the box's first pixel z. With ``excluded`` pixel z, boxes that
        contain one are redrawn."""
        first = next(iter(arrays))
        grid = arrays[first].shape[-3:]
        if first in PIXEL_KEYS:
            grid = tuple(n // self.downsample for n in grid)
        if any(c > n for c, n in zip(self.crop, grid)):
            arrays = {key: self._pad(key, data, grid) for key, data in arrays.items()}
            grid = tuple(max(c, n) for c, n in zip(self.crop, grid))
        scale = self.downsample or 1
        for _ in range(CROP_DRAWS if excluded is not None else 1):
            start = self._draw_start(arrays, grid, rng)
            low, high = start[0] * scale, (start[0] + self.crop[0]) * scale
            if excluded is None or not np.any((excluded >= low) & (excluded < high)):
                break
        out = {}
        for key, data in arrays.items():
            scale = self.downsample if key in PIXEL_KEYS else 1
            box = tuple(slice(s * scale, (s + c) * scale) for s, c in zip(start, self.crop))
            out[key] = data[(..., *box)]
        return out, start[0] * scale

    def _draw_start(self, arrays: dict[str, np.ndarray], grid: Sequence[int], rng: np.random.Generator) -> list[int]:
        """A box corner: uniform, or (``body_fraction`` of the time) centred on a body voxel."""
        start = [int(rng.integers(0, n - c + 1)) for c, n in zip(self.crop, grid)]
        if self.body_fraction and rng.random() < self.body_fraction:
            body = np.argwhere(np.asarray(arrays["mask_latent"]).reshape(grid) > 0)
            if len(body):
                centre = body[int(rng.integers(len(body)))]
                start = [int(min(max(v - c // 2, 0), n - c)) for v, c, n in zip(centre, self.crop, grid)]
        return start

    def _without_slices(self, arrays: dict[str, np.ndarray], excluded: np.ndarray, start_z: int
                        ) -> dict[str, np.ndarray]:
        """Body masks zeroed on the excluded pixel slices (and the latent slices holding them)."""
        out = dict(arrays)
        scale = self.downsample or 1
        for key in ("mask_pixels", "mask_latent"):
            if key not in out:
                continue
            mask = np.array(out[key], copy=True)
            per_slice = scale if key == "mask_latent" else 1
            local = np.unique((excluded - start_z) // per_slice)
            local = local[(local >= 0) & (local < mask.shape[-3])]
            mask[..., local, :, :] = 0
            out[key] = mask
        return out

    def _pad(self, key: str, data: np.ndarray, grid: Sequence[int]) -> np.ndarray:
        """Pad a case up to the crop at its far end: edge values, or 0 for masks."""
        scale = self.downsample if key in PIXEL_KEYS else 1
        widths = [(0, 0)] * (data.ndim - 3) + [(0, max(c - n, 0) * scale) for c, n in zip(self.crop, grid)]
        if key.startswith("mask"):
            return np.pad(np.asarray(data), widths, mode="constant")
        return np.pad(np.asarray(data), widths, mode="edge")


def _triple(size: int | Sequence[int]) -> tuple[int, int, int]:
    sizes = (size,) * 3 if isinstance(size, int) else tuple(int(s) for s in size)
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"crop must be a positive int or three of them, got {size!r}")
    return sizes
