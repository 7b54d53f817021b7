"""Intensity normalisation (MAISI conventions) with exact inverses, all in one place.

- CT for the VAE: clip [-1000, 1000] HU -> [0, 1]. Nothing above 1000 HU survives this map.
- CT for pixel-space models and the direct latent-to-sCT decoder: [-1024, 3071] -> [-1, 1].
- MR: divided by its 99.5th percentile inside the body mask (0 -> 0, p99.5 -> 1, no upper clip).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from latent.core.errors import BadFileError
#: MAISI CT window for the VAE.
VAE_CT_MIN_HU, VAE_CT_MAX_HU = -1000.0, 1000.0
#: SynthRAD CT range (HU): CTs are clipped to it and the metrics use it as dynamic range.
FULL_CT_MIN_HU, FULL_CT_MAX_HU = -1024.0, 3071.0
#: Value of air written outside the body in predictions (the organisers' water baseline uses it).
AIR_HU = -1000.0
#: Pad value of CT outside the native field of view on canonical grids.
CT_PAD_HU = -1024.0
#: MR percentile mapped to 1 (inside the mask).
MR_PERCENTILE = 99.5


def ct_to_vae(hu: np.ndarray) -> np.ndarray:
    """HU -> [0, 1] for the VAE (clips to [-1000, 1000] first)."""
    clipped = np.clip(np.asarray(hu, dtype=np.float32), VAE_CT_MIN_HU, VAE_CT_MAX_HU)
    return (clipped - VAE_CT_MIN_HU) / (VAE_CT_MAX_HU - VAE_CT_MIN_HU)


def vae_to_ct(normalised: np.ndarray) -> np.ndarray:
    """Inverse of :func:`ct_to_vae` (decoder output is clipped to [0, 1] first)."""
    clipped = np.clip(np.asarray(normalised, dtype=np.float32), 0.0, 1.0)
    return clipped * (VAE_CT_MAX_HU - VAE_CT_MIN_HU) + VAE_CT_MIN_HU


def ct_to_full(hu: np.ndarray) -> np.ndarray:
    """HU -> [-1, 1] over the full SynthRAD range [-1024, 3071] (pixel models, l2sct)."""
    clipped = np.clip(np.asarray(hu, dtype=np.float32), FULL_CT_MIN_HU, FULL_CT_MAX_HU)
    return (clipped - FULL_CT_MIN_HU) / (FULL_CT_MAX_HU - FULL_CT_MIN_HU) * 2.0 - 1.0


def full_to_ct(normalised: np.ndarray) -> np.ndarray:
    """Inverse of :func:`ct_to_full` (input clipped to [-1, 1] first)."""
    clipped = np.clip(np.asarray(normalised, dtype=np.float32), -1.0, 1.0)
    return (clipped + 1.0) / 2.0 * (FULL_CT_MAX_HU - FULL_CT_MIN_HU) + FULL_CT_MIN_HU


@dataclass(frozen=True)
class MRScaling:
    """Per-volume MR scale: ``normalised = mr / scale``."""

    scale: float
    percentile: float = MR_PERCENTILE

    def to_dict(self) -> dict[str, float]:
        """JSON form."""
        return {"scale": self.scale, "percentile": self.percentile}


def fit_mr_scaling(mr: np.ndarray, mask: np.ndarray | None = None, percentile: float = MR_PERCENTILE) -> MRScaling:
    """The MR's ``percentile`` inside ``mask`` (whole volume when no mask).

    Raises:
        ValueError: empty mask or a volume with no positive signal.
    """
    values = mr[mask > 0] if mask is not None else mr.ravel()
    if values.size == 0:
        raise BadFileError("empty body mask: cannot normalise the MR")
    scale = float(np.percentile(values, percentile))
    if not np.isfinite(scale) or scale <= 0:
        raise BadFileError(f"MR {percentile}th percentile inside the mask is {scale}: no usable signal")
    return MRScaling(scale=scale, percentile=percentile)


def mr_to_unit(mr: np.ndarray, scaling: MRScaling) -> np.ndarray:
    """MR -> normalised (0 -> 0, percentile -> 1, no upper clip)."""
    return np.asarray(mr, dtype=np.float32) / np.float32(scaling.scale)


def unit_to_mr(normalised: np.ndarray, scaling: MRScaling) -> np.ndarray:
    """Inverse of :func:`mr_to_unit`."""
    return np.asarray(normalised, dtype=np.float32) * np.float32(scaling.scale)


def normalisation_record() -> dict[str, object]:
    """What the normalisation is, for cache producer keys and run records."""
    return {
        "ct_vae_hu": [VAE_CT_MIN_HU, VAE_CT_MAX_HU],
        "ct_full_hu": [FULL_CT_MIN_HU, FULL_CT_MAX_HU],
        "mr": f"divide by p{MR_PERCENTILE} inside mask",
    }


#: Physically plausible CT values (HU, after the file's rescale slope/intercept). SynthRAD CTs
#: lie in [-1024, 3071]; a volume with any voxel outside this range is refused
#: (:func:`check_ct_range`, docs/intensities.md).
PLAUSIBLE_CT_MIN_HU, PLAUSIBLE_CT_MAX_HU = -2000.0, 4000.0


def check_ct_range(path: object, ct: np.ndarray) -> None:
    """Refuse a CT with any voxel outside [PLAUSIBLE_CT_MIN_HU, PLAUSIBLE_CT_MAX_HU].

    Raises:
        BadFileError: naming ``path``, the CT's minimum and maximum and how many voxels lie outside.
    """
    low, high = float(ct.min()), float(ct.max())
    if low >= PLAUSIBLE_CT_MIN_HU and high <= PLAUSIBLE_CT_MAX_HU:
        return
    outside = int(np.count_nonzero((ct < PLAUSIBLE_CT_MIN_HU) | (ct > PLAUSIBLE_CT_MAX_HU)))
    raise BadFileError(f"{path}: CT values from {low:g} to {high:g} HU, {outside} voxel(s) outside the plausible "
                       f"range [{PLAUSIBLE_CT_MIN_HU:g}, {PLAUSIBLE_CT_MAX_HU:g}] HU; is it a CT in HU?")


def check_mask_values(path: object, mask: np.ndarray) -> None:
    """Refuse a body mask with negative values (a mask holds 0 outside, 1 (or > 0) inside).

    Raises:
        BadFileError: naming ``path`` and up to three of the offending values.
    """
    if mask.size and mask.min() < 0:
        values = ", ".join(f"{float(v):g}" for v in np.unique(mask[mask < 0])[:3])
        raise BadFileError(f"mask {path}: values other than 0 and 1 ({values}); a body mask holds 0 outside "
                           "the body and 1 inside")
