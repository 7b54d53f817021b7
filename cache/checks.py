"""Consistency checks of cached arrays (shapes across keys and cases) and latent statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
import zarr

from latent.cache.layout import LATENT_KEYS, MASK_KEYS, PIXEL_KEYS


def latent_statistics(blocks: Iterable[np.ndarray]) -> dict:
    """Per-channel and overall mean/std of (C, d, h, w) blocks, merged exactly in float64.

    Uses the pairwise (Chan et al.) update, so no block is held longer than it is read.
    """
    count, mean, m2, n_cases = 0, None, None, 0
    for block in blocks:
        values = np.asarray(block, dtype=np.float64).reshape(block.shape[0], -1)
        if mean is None:
            mean, m2 = np.zeros(values.shape[0]), np.zeros(values.shape[0])
        elif values.shape[0] != mean.shape[0]:
            raise ValueError(f"channel counts differ: {values.shape[0]} vs {mean.shape[0]}")
        n, block_mean = values.shape[1], values.mean(axis=1)
        block_m2 = ((values - block_mean[:, None]) ** 2).sum(axis=1)
        delta, total = block_mean - mean, count + n
        mean = mean + delta * n / total
        m2 = m2 + block_m2 + delta**2 * count * n / total
        count, n_cases = total, n_cases + 1
    if mean is None:
        raise ValueError("no latents to compute statistics from")
    std = np.sqrt(m2 / count)
    mean_all = float(mean.mean())
    std_all = float(np.sqrt((m2.sum() + count * ((mean - mean_all) ** 2).sum()) / (count * mean.size)))
    if not np.all(std > 0):
        raise ValueError(f"a latent channel is constant (std {std.tolist()}): cannot standardise")
    return {"mean": mean.tolist(), "std": std.tolist(), "mean_overall": mean_all,
            "std_overall": std_all, "scale_factor": 1.0 / std_all, "n_cases": n_cases,
            "n_voxels_per_channel": count}


def _pixel_factor(shapes: dict[str, tuple]) -> int | None:
    """Pixel-to-latent factor suggested by a case's first pixel volume (None without one)."""
    pixel = next((shapes[key] for key in PIXEL_KEYS if key in shapes), None)
    if pixel is None or "mr_mu" not in shapes or len(pixel) != 3 or len(shapes["mr_mu"]) != 4:
        return None
    return max(1, pixel[0] // max(1, shapes["mr_mu"][1]))


def shape_problems(shapes: dict[str, tuple], latent_channels: int | None = None,
                   downsample: int | None = None) -> list[str]:
    """Shape rules of one case: ``{key: shape}`` -> messages (empty when consistent).

    Pixel volumes must be ``downsample`` times the latent grid on every axis; without a
    known factor the case's own z ratio is used (so the other axes and keys must agree).
    """
    problems = []
    for key, shape in shapes.items():
        want = 4 if key in LATENT_KEYS else 3
        if len(shape) != want:
            problems.append(f"{key} has {len(shape)} axes, expected {want}")
    if problems or "mr_mu" not in shapes:
        return problems
    mr_mu = tuple(shapes["mr_mu"])
    if "ct_mu" in shapes and tuple(shapes["ct_mu"]) != mr_mu:
        problems.append(f"ct_mu shape {tuple(shapes['ct_mu'])} != mr_mu shape {mr_mu}")
    if latent_channels is not None and mr_mu[0] != latent_channels:
        problems.append(f"mr_mu has {mr_mu[0]} channels, the VAE makes {latent_channels}")
    if "mask_latent" in shapes and tuple(shapes["mask_latent"]) != mr_mu[1:]:
        problems.append(f"mask_latent shape {tuple(shapes['mask_latent'])} != latent grid {mr_mu[1:]}")
    factor = downsample or _pixel_factor(shapes)
    if factor is None:
        return problems
    pixel_grid = tuple(factor * n for n in mr_mu[1:])
    for key in PIXEL_KEYS:
        if key in shapes and tuple(shapes[key]) != pixel_grid:
            problems.append(f"{key} shape {tuple(shapes[key])} != {factor} x latent "
                            f"grid {mr_mu[1:]} = {pixel_grid}")
    return problems


def case_problems(case_dir: Path, keys: list[str]) -> tuple[dict[str, tuple], list[str]]:
    """Open and fully read every array of a case directory.

    Returns:
        ``({key: shape}, problems)``: unreadable or corrupt chunks (CRC32C), missing chunk
        files (which zarr would silently read as zeros), wrong dtypes, non-finite values,
        masks other than 0/1, a missing ``mr_mu``.
    """
    shapes, problems = {}, []
    if "mr_mu" not in keys:
        problems.append("mr_mu is missing")
    for key in keys:
        try:
            array = zarr.open_array(case_dir / key, mode="r")
            shapes[key] = tuple(array.shape)
            if array.nchunks_initialized != array.nchunks:
                problems.append(f"{key}: chunk file missing (would read as zeros)")
                continue
            data = array[...]
        except Exception as exc:  # noqa: BLE001 - any failure to decode is the finding
            problems.append(f"{key}: unreadable ({type(exc).__name__}: {exc})")
            continue
        if key in MASK_KEYS:
            if data.dtype != np.uint8 or np.any(data > 1):
                problems.append(f"{key}: expected uint8 0/1, got {data.dtype} max {data.max()}")
        elif data.dtype not in (np.float16, np.float32):
            problems.append(f"{key}: dtype {data.dtype}, expected float16 or float32")
        elif not np.all(np.isfinite(data)):
            problems.append(f"{key}: holds NaN or inf")
    return shapes, problems


def _cross_case_problems(shapes: dict[str, dict[str, tuple]]) -> list[str]:
    """Every case of one producer shares one channel count and one latent grid."""
    problems = []
    for label, pick in (("latent channel count", lambda s: s["mr_mu"][0]),
                        ("latent grid", lambda s: tuple(s["mr_mu"][1:]))):
        groups: dict[Any, list[str]] = {}
        for pid, case_shapes in shapes.items():
            if "mr_mu" in case_shapes:
                groups.setdefault(pick(case_shapes), []).append(pid)
        if len(groups) > 1:
            majority = max(groups, key=lambda value: len(groups[value]))
            for value, pids in groups.items():
                if value != majority:
                    problems += [f"{pid}: {label} {value} differs from the other cases' {majority}"
                                 for pid in pids]
    return problems
