"""Image and bone metrics for synthetic CT, identical to the SynthRAD2025 leaderboard code.

All volumes are numpy arrays in SimpleITK (z, y, x) order; ``mask`` is any array where
``> 0`` marks the voxels to score; ``spacing_xyz`` is (x, y, z) in mm as SimpleITK gives it.
Definitions follow docs/metrics.md (voxels outside the mask are -1024 HU in both images).

The SSIM-type metrics never build full-volume SSIM maps. The map is only needed at mask
voxels >= 3 from the border, so each level works on their bounding box grown by the window
radius 3 (no scored window reaches past it, so ``uniform_filter``'s reflect border never
matters); outside the mask's box the images are exactly 0 (-1024 HU shifted), so the
downsampling only needs that box too. The five windowed moments are streamed slice by slice
through 7-tap box sums on cache-sized planes, the map is evaluated at the scored voxels only,
and the 2x2x2 box of ``fftconvolve(..., mode='same')`` + ``[::2]`` is done as strided pair sums
with the same implicit zero before index 0. All arithmetic is float64; values match the plain
numpy/scipy implementation to ~1e-15 relative (see ``benchmarks/bench_metrics.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

#: SynthRAD2025 dynamic range in HU: air floor and the 12-bit CT ceiling.
HU_MIN = -1024.0
HU_MAX = 3071.0
DATA_RANGE = HU_MAX - HU_MIN
#: SynthRAD2023 used a narrower ceiling for its single-scale SSIM.
SSIM2023_HU_MAX = 3000.0
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
#: HU at or above which a voxel counts as bone.
BONE_HU = 250.0

Box = tuple[tuple[int, int], ...]


def _inputs(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ct, sct, mask = np.asarray(ct), np.asarray(sct), np.asarray(mask)
    if ct.ndim != 3 or ct.shape != sct.shape or ct.shape != mask.shape:
        raise ValueError(f"ct, sct and mask must be 3D with one shape, got {ct.shape}, {sct.shape}, {mask.shape}")
    return ct, sct, mask > 0


def _bbox(mask: np.ndarray) -> Box | None:
    """Per-axis half-open bounding box of the set voxels, None when there are none."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append((int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _grow(box: Box, margin: int, shape: Sequence[int]) -> Box:
    return tuple((max(lo - margin, 0), min(hi + margin, n)) for (lo, hi), n in zip(box, shape))


def _slices(box: Box, origin: Box | None = None) -> tuple[slice, ...]:
    offsets = [0] * len(box) if origin is None else [lo for lo, _ in origin]
    return tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(box, offsets))


def _masked_values(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    box = _bbox(mask)
    if box is None:
        return np.empty(0), np.empty(0)
    crop = _slices(box)
    inside = mask[crop]
    return ct[crop][inside].astype(np.float64), sct[crop][inside].astype(np.float64)


def _mae_psnr(ct_values: np.ndarray, sct_values: np.ndarray) -> tuple[float, float]:
    if ct_values.size == 0:
        return math.nan, math.nan
    mae_value = float(np.abs(ct_values - sct_values).sum() / ct_values.size)
    diff = np.clip(ct_values, HU_MIN, HU_MAX) - np.clip(sct_values, HU_MIN, HU_MAX)
    mse = float(np.mean(diff * diff))
    return mae_value, (math.inf if mse == 0 else 10.0 * math.log10(DATA_RANGE**2 / mse))


def mae(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute error in HU over the mask, sCT not clipped (nan for an empty mask)."""
    return _mae_psnr(*_masked_values(*_inputs(ct, sct, mask)))[0]


def psnr(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> float:
    """PSNR in dB over the mask, both clipped to [-1024, 3071], peak 4095; inf when identical."""
    return _mae_psnr(*_masked_values(*_inputs(ct, sct, mask)))[1]


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


def _masked_ssim_mean(
    x: np.ndarray, y: np.ndarray, scored: np.ndarray, weight: float | None, data_range: float
) -> float:
    """Mean SSIM map over ``scored`` voxels; x, y extend ``scored`` by 3 voxels on every side.

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
    # Scored voxels as flat indices into the wide plane layout, grouped by output slice.
    flat = np.flatnonzero(scored)
    per_slice = scored.shape[1] * scored.shape[2]
    z_index, in_plane = np.divmod(flat, per_slice)
    wide = in_plane + (in_plane // scored.shape[2]) * (width - scored.shape[2])
    bounds = np.searchsorted(z_index, np.arange(scored.shape[0] + 1))
    total = 0.0
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
        lo, hi = bounds[t - (WIN - 1)], bounds[t - (WIN - 2)]
        if hi > lo:
            total += _ssim_map_sum(running.take(wide[lo:hi], axis=1), weight, data_range)
    return total / flat.size if flat.size else math.nan


def _level_value(
    x: np.ndarray, y: np.ndarray, region: Box, mask: np.ndarray, weight: float | None, data_range: float
) -> float:
    """Mean map over mask voxels >= 3 from every border; x, y hold the image on ``region``."""
    inner = mask[(slice(HALF_WIN, -HALF_WIN),) * 3]
    box = _bbox(inner)
    if box is None:
        return math.nan
    box = tuple((lo + HALF_WIN, hi + HALF_WIN) for lo, hi in box)
    work = _slices(_grow(box, HALF_WIN, mask.shape), region)
    scored = inner[_slices(box, ((HALF_WIN, 0),) * 3)]
    return _masked_ssim_mean(x[work], y[work], scored, weight, data_range)


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


def ms_ssim(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> float:
    """Masked MS-SSIM of the SynthRAD2025 leaderboard (5 levels, see docs/metrics.md).

    Args:
        ct, sct: (z, y, x) volumes in HU; mask: (z, y, x), ``> 0`` inside.
    Returns:
        Product of the 5 per-level masked means, each clipped to [0, 1]; nan when a level has
        no mask voxel at least 3 voxels from the (padded) border.
    """
    ct, sct, inside = _inputs(ct, sct, mask)
    # Edge-pad every axis shorter than 97: (97 - n) // 2 before, the rest after.
    pads = tuple(
        (max((MS_SSIM_MIN_SIZE - n) // 2, 0), max(MS_SSIM_MIN_SIZE - n - (MS_SSIM_MIN_SIZE - n) // 2, 0))
        for n in ct.shape
    )
    level_mask = np.pad(inside, pads, mode="edge")
    box = _bbox(level_mask)
    if box is None:
        return math.nan
    region = _grow(box, HALF_WIN, level_mask.shape)
    mask_block = level_mask[_slices(region)]
    x = _prepared_block(ct, mask_block, pads, region, HU_MAX)
    y = _prepared_block(sct, mask_block, pads, region, HU_MAX)
    values = []
    for level, weight in enumerate(MS_SSIM_WEIGHTS):
        values.append(_level_value(x, y, region, level_mask, weight, DATA_RANGE))
        if level < len(MS_SSIM_WEIGHTS) - 1:
            shape = level_mask.shape
            x, _ = _halve(x, region, shape)
            y, region = _halve(y, region, shape)
            level_mask = level_mask[::2, ::2, ::2]
    return float(np.prod(np.clip(values, 0.0, 1.0)))


def ssim_2023(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> float:
    """SynthRAD2023 masked SSIM: [-1024, 3000] HU, data range 4024, skimage defaults.

    Equals ``crop(structural_similarity(ct', sct', data_range=4024, full=True)[1], 3)``
    averaged over ``crop(mask, 3)``, with ct', sct' clipped, masked to -1024 and shifted +1024.
    """
    ct, sct, inside = _inputs(ct, sct, mask)
    if min(ct.shape) < WIN:
        raise ValueError(f"ssim_2023 needs every axis >= {WIN} voxels, got shape {ct.shape}")
    box = _bbox(inside)
    if box is None:
        return math.nan
    region = _grow(box, HALF_WIN, ct.shape)
    mask_block = inside[_slices(region)]
    no_pad = ((0, 0),) * 3
    x = _prepared_block(ct, mask_block, no_pad, region, SSIM2023_HU_MAX)
    y = _prepared_block(sct, mask_block, no_pad, region, SSIM2023_HU_MAX)
    return _level_value(x, y, region, inside, None, SSIM2023_HU_MAX - HU_MIN)


def _bone(image: np.ndarray, inside: np.ndarray, threshold: float) -> np.ndarray:
    return (image >= threshold) & inside


def bone_dice(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray, threshold: float = BONE_HU) -> float:
    """Dice of ``HU >= threshold`` inside the mask; 1.0 when neither volume has bone."""
    ct, sct, inside = _inputs(ct, sct, mask)
    ref, pred = _bone(ct, inside, threshold), _bone(sct, inside, threshold)
    total = int(ref.sum()) + int(pred.sum())
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(ref & pred)) / total


def bone_hd95(
    ct: np.ndarray, sct: np.ndarray, mask: np.ndarray, spacing_xyz: Sequence[float], threshold: float = BONE_HU
) -> float:
    """Symmetric 95th-percentile surface Hausdorff distance (mm) of bone inside the mask.

    As MONAI's ``compute_hausdorff_distance(percentile=95)``: surface voxels are
    ``bone ^ binary_erosion(bone)``; the value is the larger of the two directed 95th
    percentiles of surface-to-nearest-surface Euclidean distances. Returns 0.0 when neither
    volume has bone and inf when exactly one has (the distance to an empty set).
    """
    ct, sct, inside = _inputs(ct, sct, mask)
    if len(spacing_xyz) != 3:
        raise ValueError(f"spacing_xyz must have 3 values (x, y, z), got {spacing_xyz}")
    ref, pred = _bone(ct, inside, threshold), _bone(sct, inside, threshold)
    has_ref, has_pred = bool(ref.any()), bool(pred.any())
    if not (has_ref or has_pred):
        return 0.0
    if has_ref != has_pred:
        return math.inf
    # Every surface voxel lies in the union's bounding box, so distances computed there are exact.
    crop = _slices(_bbox(ref | pred))  # type: ignore[arg-type]
    ref, pred = ref[crop], pred[crop]
    sampling = tuple(float(s) for s in spacing_xyz)[::-1]
    ref_surface = ref ^ ndimage.binary_erosion(ref)
    pred_surface = pred ^ ndimage.binary_erosion(pred)
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=sampling)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sampling)[ref_surface]
    return float(max(np.percentile(to_ref, 95), np.percentile(to_pred, 95)))


def image_metrics(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """The SynthRAD2025 leaderboard metrics ``mae``, ``psnr``, ``ms_ssim``, sharing the mask gather."""
    ct, sct, inside = _inputs(ct, sct, mask)
    mae_value, psnr_value = _mae_psnr(*_masked_values(ct, sct, inside))
    return {"mae": mae_value, "psnr": psnr_value, "ms_ssim": ms_ssim(ct, sct, inside)}


def score_case(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray, spacing_xyz: Sequence[float]) -> dict[str, float]:
    """All metrics of one case: mae, psnr, ms_ssim, ssim (2023), bone_dice, bone_hd95 (mm), and
    MAE / bias per tissue class of the true CT (:func:`tissue_errors`)."""
    scores = image_metrics(ct, sct, mask)
    scores["ssim"] = ssim_2023(ct, sct, mask)
    scores["bone_dice"] = bone_dice(ct, sct, mask)
    scores["bone_hd95"] = bone_hd95(ct, sct, mask, spacing_xyz)
    scores.update(tissue_errors(ct, sct, mask))
    return scores


#: Tissue classes of the true CT (HU, [low, high)): where an error is made, not only how large.
#: "above_1000" is what the MAISI VAE window [-1000, 1000] cannot represent.
TISSUE_CLASSES = {"air": (-2000.0, -500.0), "soft": (-500.0, BONE_HU), "bone": (BONE_HU, 1000.0),
                  "above_1000": (1000.0, 4000.0)}


def tissue_errors(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """MAE and bias (mean sCT - CT) in HU per tissue class of the true CT, inside the mask.

    Returns:
        ``{"mae_air", "bias_air", ..., "mae_above_1000", "bias_above_1000"}``; NaN for a class
        with no voxel in the mask.
    """
    inside = np.asarray(mask) > 0
    ct, sct = np.asarray(ct, dtype=np.float32), np.asarray(sct, dtype=np.float32)
    out = {}
    for name, (low, high) in TISSUE_CLASSES.items():
        region = inside & (ct >= low) & (ct < high)
        difference = (sct[region] - ct[region]).astype(np.float64)
        out[f"mae_{name}"] = float(np.abs(difference).mean()) if difference.size else float("nan")
        out[f"bias_{name}"] = float(difference.mean()) if difference.size else float("nan")
    return out
