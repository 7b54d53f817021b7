"""Windowed similarity metrics: SynthRAD2025 MS-SSIM and SynthRAD2023 SSIM (docs/metrics.md).

Neither metric builds a full-volume SSIM map. The map is only needed at mask voxels >= 3 from
the border, so each level works on their bounding box grown by the window radius 3 (no scored
window reaches past it, so ``uniform_filter``'s reflect border never matters); outside the
mask's box the images are exactly 0 (-1024 HU shifted), so the downsampling only needs that
box too. The five windowed moments are streamed slice by slice through 7-tap box sums on
cache-sized planes, the map is evaluated at the scored voxels only, and the 2x2x2 box of
``fftconvolve(..., mode='same')`` + ``[::2]`` is done as strided pair sums with the same
implicit zero before index 0. :func:`windowed_scores` evaluates the SSIM at level 0 of the
MS-SSIM from the same moments whenever the two clipping ceilings (3071 and 3000 HU) give the
same images. All arithmetic is float64; values match the plain numpy/scipy implementation to
~1e-15 relative (``benchmarks/bench_metrics.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: SynthRAD2025 dynamic range in HU: air floor and the 12-bit CT ceiling.
HU_MIN = -1024.0
HU_MAX = 3071.0
DATA_RANGE = HU_MAX - HU_MIN
#: SynthRAD2023 used a narrower ceiling for its single-scale SSIM.
SSIM2023_HU_MAX = 3000.0
SSIM2023_RANGE = SSIM2023_HU_MAX - HU_MIN
#: Per-level MS-SSIM exponents (Wang et al. 2003, eq. 7), used for L, C and S alike.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
#: Smallest axis length that still holds a 7-voxel window after four halvings.
MS_SSIM_MIN_SIZE = 97
#: SSIM window edge (scipy ``uniform_filter`` size), its radius and the SSIM constants.
WIN = 7
HALF_WIN = WIN // 2
K1, K2 = 0.01, 0.03
#: Sample covariance correction NP / (NP - 1) with NP = 7^3 voxels per window.
COV_NORM = WIN**3 / (WIN**3 - 1)

Box = tuple[tuple[int, int], ...]
#: One map to average: scored voxels (shape of the working block less 3 per side), MS-SSIM
#: level weight (None: skimage SSIM) and data range.
Scorer = tuple[np.ndarray, "float | None", float]


def checked_inputs(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three arrays, the mask as booleans; ValueError unless 3D with one shape."""
    ct, sct, mask = np.asarray(ct), np.asarray(sct), np.asarray(mask)
    if ct.ndim != 3 or ct.shape != sct.shape or ct.shape != mask.shape:
        raise ValueError(f"ct, sct and mask must be 3D with one shape, got {ct.shape}, {sct.shape}, {mask.shape}")
    return ct, sct, mask > 0


def bbox(mask: np.ndarray) -> Box | None:
    """Per-axis half-open bounding box of the set voxels, None when there are none."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append((int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def grow(box: Box, margin: int, shape: Sequence[int]) -> Box:
    """``box`` grown by ``margin`` on every side, kept inside ``shape``."""
    return tuple((max(lo - margin, 0), min(hi + margin, n)) for (lo, hi), n in zip(box, shape))


def slices(box: Box, origin: Box | None = None) -> tuple[slice, ...]:
    """Slices of ``box``, relative to the corner of ``origin`` when given."""
    offsets = [0] * len(box) if origin is None else [lo for lo, _ in origin]
    return tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(box, offsets))


def _box7(src: np.ndarray, step: int, tmp: tuple[np.ndarray, np.ndarray, np.ndarray], out: np.ndarray) -> None:
    """``out[i] = sum(src[i + k * step] for k in range(7))`` on flat arrays, 4 adds."""
    n = src.size - 6 * step
    pair, quad, six = (t[: src.size - d * step] for t, d in zip(tmp, (1, 3, 5)))
    np.add(src[:-step], src[step:], out=pair)
    np.add(pair[: -2 * step], pair[2 * step :], out=quad)
    np.add(quad[: -2 * step], pair[4 * step :], out=six)
    np.add(six[:n], src[6 * step :], out=out[:n])


def _ssim_map_sum(sums: np.ndarray, weight: float | None, data_range: float) -> float:
    """Sum of SSIM map values from window sums ``(sx, sy, sxx, syy, sxy)`` of shape (5, n).

    ``weight`` None gives skimage's SSIM; a float gives the SynthRAD2025 MS-SSIM level map
    ``L^w C^w S^w = (L C S)^w`` with L, C and S clipped below at 0 and C3 = C2 / 2.
    Overwrites ``sums``.
    """
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    sums *= 1.0 / WIN**3
    ux, uy, vx, vy, vxy = sums
    uxuy = ux * uy
    ux2, uy2 = ux * ux, uy * uy
    vx -= ux2
    vy -= uy2
    vxy -= uxuy
    sums[2:] *= COV_NORM
    ux2 += uy2
    ux2 += c1
    uxuy *= 2.0
    uxuy += c1
    lum = np.divide(uxuy, ux2, out=uxuy)
    var_sum = vx + vy
    var_sum += c2
    if weight is None:
        vxy *= 2.0
        vxy += c2
        lum *= vxy
        lum /= var_sum
        return float(lum.sum())
    c3 = c2 / 2.0
    np.maximum(vx, 0.0, out=vx)
    np.maximum(vy, 0.0, out=vy)
    sxsy = np.sqrt(np.multiply(vx, vy, out=vx), out=vx)
    struct = np.divide(np.add(vxy, c3, out=vxy), sxsy + c3, out=vxy)
    sxsy *= 2.0
    sxsy += c2
    con = np.divide(sxsy, var_sum, out=sxsy)
    for part in (lum, con, struct):
        np.maximum(part, 0.0, out=part)
    lum *= con
    lum *= struct
    # p^w as exp(w log p): same value to rounding, faster than np.power; log(0) -> -inf -> 0.
    with np.errstate(divide="ignore"):
        np.log(lum, out=lum)
    lum *= weight
    return float(np.exp(lum, out=lum).sum())


def _wide_index(scored: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Scored voxels as flat indices into the "wide" plane layout, and per-slice bounds."""
    flat = np.flatnonzero(scored)
    z_index, in_plane = np.divmod(flat, scored.shape[1] * scored.shape[2])
    wide = in_plane + (in_plane // scored.shape[2]) * (width - scored.shape[2])
    return wide, np.searchsorted(z_index, np.arange(scored.shape[0] + 1))


def _masked_map_means(x: np.ndarray, y: np.ndarray, scorers: Sequence[Scorer]) -> list[float]:
    """Mean map over each scorer's voxels; x, y extend the scored block by 3 voxels per side.

    Streams z-slices: each slice's five moment planes get the in-plane 7x7 box sum on flat
    arrays (x step 1, y step W: results in a "wide" layout whose last 6 columns are unused),
    and a running 7-slice sum along z gives the windowed sums at the scored voxels.
    """
    depth, height, width = x.shape
    plane = height * width
    kept = plane - 6 - 6 * width
    tmp = tuple(np.empty(plane) for _ in range(3))
    row = np.empty(plane - 6)
    src = np.empty((5, plane))
    ring = np.empty((WIN, 5, kept))
    running = np.zeros((5, kept))
    index = [_wide_index(scored, width) for scored, _, _ in scorers]
    totals = [0.0] * len(scorers)
    for t in range(depth):
        np.copyto(src[0].reshape(height, width), x[t])
        np.copyto(src[1].reshape(height, width), y[t])
        np.multiply(src[0], src[0], out=src[2])
        np.multiply(src[1], src[1], out=src[3])
        np.multiply(src[0], src[1], out=src[4])
        slot = ring[t % WIN]
        if t >= WIN:
            running -= slot
        for k in range(5):
            _box7(src[k], 1, tmp, row)
            _box7(row, width, tmp, slot[k])
        running += slot
        if t < WIN - 1:
            continue
        for s, ((wide, bounds), (_, weight, data_range)) in enumerate(zip(index, scorers)):
            lo, hi = bounds[t - (WIN - 1)], bounds[t - (WIN - 2)]
            if hi > lo:
                totals[s] += _ssim_map_sum(running.take(wide[lo:hi], axis=1), weight, data_range)
    counts = [int(np.count_nonzero(scored)) for scored, _, _ in scorers]
    return [total / count if count else math.nan for total, count in zip(totals, counts)]


def _scored_box(mask: np.ndarray) -> tuple[Box, np.ndarray] | None:
    """Bounding box of the mask voxels >= 3 from every border and those voxels on it."""
    inner = mask[(slice(HALF_WIN, -HALF_WIN),) * 3]
    box = bbox(inner)
    if box is None:
        return None
    return tuple((lo + HALF_WIN, hi + HALF_WIN) for lo, hi in box), inner[slices(box)]


def _prepared_block(image: np.ndarray, mask: np.ndarray, pads: Box, region: Box, hu_max: float) -> np.ndarray:
    """Clipped, masked (outside -> -1024) and +1024-shifted image, edge-padded, on ``region``."""
    block = image
    for axis, ((lo, hi), (before, _)) in enumerate(zip(region, pads)):
        index = np.clip(np.arange(lo, hi) - before, 0, image.shape[axis] - 1)
        if index.size and np.array_equal(index, np.arange(index[0], index[0] + index.size)):
            block = block[(slice(None),) * axis + (slice(int(index[0]), int(index[-1]) + 1),)]
        else:
            block = np.take(block, index, axis=axis)
    block = block.astype(np.float64)
    np.clip(block, HU_MIN, hu_max, out=block)
    block -= HU_MIN
    np.copyto(block, 0.0, where=~mask)
    return block


def _halve(block: np.ndarray, region: Box, shape: Sequence[int]) -> tuple[np.ndarray, Box]:
    """``fftconvolve(image, ones((2, 2, 2)) / 8, mode='same')[::2, ::2, ::2]`` of an image that
    is zero outside ``region`` (where ``block`` holds it); returns the result on its own region."""
    out_region = []
    for axis, ((lo, hi), n) in enumerate(zip(region, shape)):
        # out[j] = (in[2j - 1] + in[2j]) / 2, in[-1] = 0 as in fftconvolve 'same'; out[j] != 0
        # only for j in [ceil(lo / 2), hi // 2]; keep a 3-voxel zero margin for the next window.
        out_lo = max((lo + 1) // 2 - HALF_WIN, 0)
        out_hi = min(hi // 2 + 1 + HALF_WIN, (n + 1) // 2)
        out = np.zeros(block.shape[:axis] + (out_hi - out_lo,) + block.shape[axis + 1 :])
        for shift in (0, 1):  # source index 2j - shift
            j_lo, j_hi = max((lo + shift + 1) // 2, out_lo), min((hi + shift + 1) // 2, out_hi)
            if j_hi > j_lo:
                src = slice(2 * j_lo - shift - lo, 2 * j_hi - shift - lo, 2)
                dst = slice(j_lo - out_lo, j_hi - out_lo)
                lead = (slice(None),) * axis
                out[lead + (dst,)] += block[lead + (src,)]
        out *= 0.5
        block = out
        out_region.append((out_lo, out_hi))
    return block, tuple(out_region)


def _ssim_2023_scored(scored: np.ndarray, box: Box, pads: Box, shape: Sequence[int]) -> np.ndarray:
    """The SSIM's scored voxels (>= 3 from the unpadded border) among the MS-SSIM's level-0 ones."""
    keep = scored.copy()
    for axis, ((lo, hi), (before, _), n) in enumerate(zip(box, pads, shape)):
        index = np.arange(lo, hi)
        inside = (index >= before + HALF_WIN) & (index < before + n - HALF_WIN)
        keep &= inside.reshape([-1 if a == axis else 1 for a in range(3)])
    return keep


def _windowed(ct: np.ndarray, sct: np.ndarray, inside: np.ndarray, with_ssim: bool) -> tuple[float, float | None]:
    """MS-SSIM and, when ``with_ssim`` and the 3000 HU ceiling changes nothing, the SSIM."""
    # Edge-pad every axis shorter than 97: (97 - n) // 2 before, the rest after.
    pads = tuple(
        (max((MS_SSIM_MIN_SIZE - n) // 2, 0), max(MS_SSIM_MIN_SIZE - n - (MS_SSIM_MIN_SIZE - n) // 2, 0))
        for n in ct.shape
    )
    level_mask = np.pad(inside, pads, mode="edge")
    box = bbox(level_mask)
    if box is None:
        return math.nan, (math.nan if with_ssim else None)
    region = grow(box, HALF_WIN, level_mask.shape)
    mask_block = level_mask[slices(region)]
    x = _prepared_block(ct, mask_block, pads, region, HU_MAX)
    y = _prepared_block(sct, mask_block, pads, region, HU_MAX)
    share = with_ssim and max(float(x.max()), float(y.max())) <= SSIM2023_RANGE
    values, ssim = [], None
    for level, weight in enumerate(MS_SSIM_WEIGHTS):
        scored = _scored_box(level_mask)
        if scored is None:
            values.append(math.nan)
        else:
            scorers: list[Scorer] = [(scored[1], weight, DATA_RANGE)]
            if share and level == 0:
                scorers.append((_ssim_2023_scored(scored[1], scored[0], pads, ct.shape), None, SSIM2023_RANGE))
            work = slices(grow(scored[0], HALF_WIN, level_mask.shape), region)
            means = _masked_map_means(x[work], y[work], scorers)
            values.append(means[0])
            ssim = means[1] if len(means) > 1 else ssim
        if share and level == 0 and ssim is None:
            ssim = math.nan
        if level < len(MS_SSIM_WEIGHTS) - 1:
            shape = level_mask.shape
            x, _ = _halve(x, region, shape)
            y, region = _halve(y, region, shape)
            level_mask = level_mask[::2, ::2, ::2]
    return float(np.prod(np.clip(values, 0.0, 1.0))), ssim


def ms_ssim(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> float:
    """Masked MS-SSIM of the SynthRAD2025 leaderboard (5 levels, see docs/metrics.md).

    Args:
        ct, sct: (z, y, x) volumes in HU; mask: (z, y, x), ``> 0`` inside.
    Returns:
        Product of the 5 per-level masked means, each clipped to [0, 1]; nan when a level has
        no mask voxel at least 3 voxels from the (padded) border.
    """
    return _windowed(*checked_inputs(ct, sct, mask), with_ssim=False)[0]


def ssim_2023(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> float:
    """SynthRAD2023 masked SSIM: [-1024, 3000] HU, data range 4024, skimage defaults.

    Equals ``crop(structural_similarity(ct', sct', data_range=4024, full=True)[1], 3)``
    averaged over ``crop(mask, 3)``, with ct', sct' clipped, masked to -1024 and shifted +1024.
    """
    ct, sct, inside = checked_inputs(ct, sct, mask)
    if min(ct.shape) < WIN:
        raise ValueError(f"ssim_2023 needs every axis >= {WIN} voxels, got shape {ct.shape}")
    box = bbox(inside)
    if box is None:
        return math.nan
    region = grow(box, HALF_WIN, ct.shape)
    mask_block = inside[slices(region)]
    no_pad = ((0, 0),) * 3
    x = _prepared_block(ct, mask_block, no_pad, region, SSIM2023_HU_MAX)
    y = _prepared_block(sct, mask_block, no_pad, region, SSIM2023_HU_MAX)
    scored = _scored_box(inside)
    if scored is None:
        return math.nan
    work = slices(grow(scored[0], HALF_WIN, ct.shape), region)
    return _masked_map_means(x[work], y[work], [(scored[1], None, SSIM2023_RANGE)])[0]


def windowed_scores(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """``(ms_ssim, ssim_2023)``, sharing the level-0 moments when no voxel is above 3000 HU."""
    ct, sct, inside = checked_inputs(ct, sct, mask)
    if min(ct.shape) < WIN:
        raise ValueError(f"ssim_2023 needs every axis >= {WIN} voxels, got shape {ct.shape}")
    ms_value, ssim = _windowed(ct, sct, inside, with_ssim=True)
    return ms_value, (ssim_2023(ct, sct, inside) if ssim is None else ssim)
