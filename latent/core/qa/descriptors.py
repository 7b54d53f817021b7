"""Per-case intensity descriptors inside the body mask: CT histogram, metal components, MR."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from latent.core.qa.config import QAConfig


@dataclass
class MetalComponents:
    """Metal components of one case kept by the minimum size, largest first (a label volume)."""

    labels: np.ndarray
    volumes_mm3: list[float]

    @property
    def mask(self) -> np.ndarray:
        """Every kept component as one boolean volume."""
        return self.labels > 0


def ct_descriptors(ct: np.ndarray, mask: np.ndarray, config: QAConfig) -> dict[str, float]:
    """Mean, std, p95, p99, p99.9 HU, the high-HU fractions, the air fraction and the soft-tissue median."""
    inside = ct[mask > 0].astype(np.float64)
    p95, p99, p999 = np.percentile(inside, [95.0, 99.0, 99.9])
    low, high = config.soft_range_hu
    soft = inside[(inside > low) & (inside < high)]
    first, second = config.metal_fraction_hu
    return {"ct_mean": float(inside.mean()), "ct_std": float(inside.std()), "ct_p95": float(p95),
            "ct_p99": float(p99), "ct_p999": float(p999),
            "ct_frac_ge_2900": float(np.mean(inside >= first)), "ct_frac_ge_3000": float(np.mean(inside >= second)),
            "air_fraction": float(np.mean(inside <= config.air_hu)),
            "ct_soft_median": float(np.median(soft)) if soft.size else float("nan")}


def metal_components(ct: np.ndarray, mask: np.ndarray, spacing_xyz, config: QAConfig) -> MetalComponents:
    """3D connected components (26-neighbourhood) of CT >= ``metal_hu`` of at least ``metal_min_mm3``, searched
    in the mask grown by ``metal_margin_mm`` (an implant under the skin voids the MR the mask is drawn from)."""
    voxel_mm3 = float(np.prod(spacing_xyz))
    search = mask > 0
    if config.metal_margin_mm > 0:
        radius = [max(1, int(round(config.metal_margin_mm / s))) for s in spacing_xyz[::-1]]
        search = ndimage.binary_dilation(search, _ellipsoid(radius))
    labels, count = ndimage.label((ct >= config.metal_hu) & search, np.ones((3, 3, 3), bool))
    if count == 0:
        return MetalComponents(np.zeros(ct.shape, np.int32), [])
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:] * voxel_mm3
    keep = [index + 1 for index in np.argsort(-sizes, kind="stable") if sizes[index] >= config.metal_min_mm3]
    relabel = np.zeros(count + 1, np.int32)
    relabel[keep] = np.arange(1, len(keep) + 1)
    return MetalComponents(relabel[labels], [float(sizes[k - 1]) for k in keep])


def metal_descriptors(ct: np.ndarray, mr: np.ndarray, mask: np.ndarray, spacing_xyz, config: QAConfig,
                      metal: MetalComponents) -> dict[str, float]:
    """Volume, count, the largest component's slice span, centroid and box, streak ratio and MR void."""
    empty = float("nan")
    result = {"metal_volume_mm3": float(sum(metal.volumes_mm3)), "metal_components": float(len(metal.volumes_mm3)),
              "metal_largest_mm3": metal.volumes_mm3[0] if metal.volumes_mm3 else 0.0,
              "metal_slice_first": empty, "metal_slice_last": empty, "metal_centroid_z": empty,
              "metal_centroid_y": empty, "metal_centroid_x": empty, "metal_box_zyx": "",
              "streak_ratio": 0.0, "metal_mr_ratio": empty, "metal_mr_std_ratio": empty}
    if not metal.volumes_mm3:
        return result
    largest = metal.labels == 1
    where = np.nonzero(largest)
    low, high = [int(a.min()) for a in where], [int(a.max()) for a in where]
    result.update(metal_slice_first=float(low[0]), metal_slice_last=float(high[0]),
                  metal_centroid_z=float(where[0].mean()), metal_centroid_y=float(where[1].mean()),
                  metal_centroid_x=float(where[2].mean()),
                  metal_box_zyx=" ".join(f"{a}-{b}" for a, b in zip(low, high)))
    every = metal.mask
    radius = [max(1, int(round(config.streak_radius_mm / s))) for s in spacing_xyz[::-1]]
    near = ndimage.binary_dilation(every, _ellipsoid(radius)) & ~every & (mask > 0)
    if near.any():
        result["streak_ratio"] = float(np.mean(ct[near] <= config.streak_hu))
    body = mr[mask > 0].astype(np.float64)
    reference, spread = float(np.median(body)), float(body.std())
    inside = mr[ndimage.binary_dilation(largest)].astype(np.float64)
    if reference > 0:
        result["metal_mr_ratio"] = float(inside.mean() / reference)
    if spread > 0:
        result["metal_mr_std_ratio"] = float(inside.std() / spread)
    return result


def _ellipsoid(radius_zyx) -> np.ndarray:
    """A boolean ellipsoid of the given radii in voxels (a structuring element)."""
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radius_zyx)]
    return sum((g / max(r, 1)) ** 2 for g, r in zip(grids, radius_zyx)) <= 1.0


def mr_descriptors(mr: np.ndarray, mask: np.ndarray, spacing_xyz, config: QAConfig) -> dict[str, float]:
    """MR mean, std, coefficient of variation, dark and flat shares in the mask, bias-field strength."""
    body = mask > 0
    inside = mr[body].astype(np.float64)
    p99 = float(np.percentile(inside, 99.0)) or 1.0
    local_std = np.sqrt(np.maximum(ndimage.uniform_filter(mr.astype(np.float32) ** 2, 3)
                                   - ndimage.uniform_filter(mr.astype(np.float32), 3) ** 2, 0.0))
    mean = float(inside.mean())
    return {"mr_mean": mean, "mr_std": float(inside.std()), "mr_cv": float(inside.std() / mean) if mean else 0.0,
            "mr_dark_fraction": float(np.mean(inside < config.mr_dark_fraction * p99)),
            "mr_flat_fraction": float(np.mean(local_std[body] < config.mr_flat_std * p99)),
            "bias_field_ratio": bias_field_ratio(mr, body, spacing_xyz, config.bias_sigma_mm)}


def bias_field_ratio(mr: np.ndarray, body: np.ndarray, spacing_xyz, sigma_mm: float) -> float:
    """p95 / p5 of the MR smoothed heavily inside the mask (normalised convolution): the bias field's strength."""
    sigma = [sigma_mm / s for s in spacing_xyz[::-1]]
    weight = ndimage.gaussian_filter(body.astype(np.float32), sigma)
    smooth = ndimage.gaussian_filter(np.where(body, mr, 0).astype(np.float32), sigma)
    core = body & (weight > 0.5)
    if not core.any():
        return float("nan")
    field_ = smooth[core] / weight[core]
    low, high = np.percentile(field_, [5.0, 95.0])
    return float(high / low) if low > 0 else float("inf")


def slice_log_ratios(mr: np.ndarray, ct: np.ndarray, mask: np.ndarray, min_voxels: int, dark: float,
                     same_hu: float) -> tuple[np.ndarray, np.ndarray]:
    """Per pair of neighbouring slices (k, k + 1), the shift of the whole slice: the quartile of the voxel
    log-ratios log(MR[k + 1] / MR[k]) nearer zero (0 when the quartiles disagree in sign).

    Only voxels in the mask on both slices, brighter than ``dark``, whose CT changes by less than
    ``same_hu`` count, and only pairs with at least ``min_voxels`` of them. A band (a gain change of
    the MR slice) moves three quarters of the voxels and more; a change of anatomy (a tissue of the
    same HU but another MR contrast) moves some of them, so its nearer quartile stays near zero.

    Returns:
        ``(k of each judged pair, its shift)``.
    """
    body = (mask > 0) & (mr > dark)
    pairs, ratios = [], []
    for k in range(mr.shape[0] - 1):
        both = body[k] & body[k + 1] & (np.abs(ct[k + 1].astype(np.float32) - ct[k]) < same_hu)
        if np.count_nonzero(both) < min_voxels:
            continue
        pairs.append(k)
        low, high = np.percentile(np.log(mr[k + 1][both].astype(np.float64) / mr[k][both]), [25.0, 75.0])
        ratios.append(float(low if low > 0 else high if high < 0 else 0.0))
    return np.asarray(pairs, dtype=int), np.asarray(ratios)


def banding_slices(mr: np.ndarray, ct: np.ndarray, mask: np.ndarray, config: QAConfig) -> tuple[list[int], float]:
    """Slices inside an MR band (a jump of :func:`slice_log_ratios` and its return) and the largest jump's robust z.

    The robust z of each slice-to-slice log-ratio is 0.6745 (d - median) / MAD (MAD at least
    0.02); a jump needs |z| > ``banding_z`` and |d| > ``banding_min_log``. An up jump followed by
    a down jump within ``banding_max_slices`` flags the slices between; with ``banding_lone_jumps`` a lone jump flags the slice after it (not the body's last judged slice).
    """
    dark = config.mr_dark_fraction * float(np.percentile(mr[mask > 0], 99.0))
    slices, ratio = slice_log_ratios(mr, ct, mask, config.min_slice_voxels, dark, config.banding_same_hu)
    if slices.size < 2:
        return [], 0.0
    mad = max(float(np.median(np.abs(ratio - np.median(ratio)))), 0.02)
    z = 0.6745 * (ratio - np.median(ratio)) / mad
    jumps = [k for k in range(ratio.size) if abs(z[k]) > config.banding_z and abs(ratio[k]) > config.banding_min_log]
    flagged: set[int] = set()
    used: set[int] = set()
    for k in jumps:
        if k in used:
            continue
        partner = next((j for j in jumps if j > k and j not in used and np.sign(ratio[j]) != np.sign(ratio[k])
                        and slices[j] - slices[k] <= config.banding_max_slices), None)
        if partner is not None:
            flagged.update(range(int(slices[k]) + 1, int(slices[partner]) + 1))
            used.update((k, partner))
        elif config.banding_lone_jumps and int(slices[k]) + 1 < int(slices[-1]):  # not the body's partial end
            flagged.add(int(slices[k]) + 1)
    return sorted(flagged), float(np.max(np.abs(z)))
