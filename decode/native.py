"""Canonical grid -> exactly the native MR grid, with air outside the body.

The prediction is resampled onto the MR's own grid (size, spacing, origin and direction copied
from the recorded :class:`latent.core.grid.GridMapping`); voxels outside the canonical field of view
or outside the native body mask become air (sCT) or 0 (uncertainty maps).
"""

from __future__ import annotations

import numpy as np

from latent.core.grid import GridMapping, to_native
from latent.core.intensity import AIR_HU, FULL_CT_MAX_HU, FULL_CT_MIN_HU


def _check_canonical(array: np.ndarray, mapping: GridMapping, name: str) -> np.ndarray:
    array = np.asarray(array)
    if tuple(array.shape) != tuple(mapping.canonical.shape):
        raise ValueError(
            f"{name} shape {tuple(array.shape)} does not match the canonical grid (z, y, x) {tuple(mapping.canonical.shape)}"
        )
    return array


def _check_mask(native_mask: np.ndarray | None, mapping: GridMapping) -> None:
    if native_mask is None:
        return
    expected = tuple(reversed(mapping.native.size))
    if tuple(np.shape(native_mask)) != expected:
        raise ValueError(f"native mask shape {tuple(np.shape(native_mask))} does not match the native grid (z, y, x) {expected}")


def canonical_to_native_sct(hu: np.ndarray, mapping: GridMapping, native_mask: np.ndarray | None) -> np.ndarray:
    """Resample a canonical sCT onto the native grid; air outside the FOV and the mask.

    Args:
        hu: canonical sCT in HU, (z, y, x) = ``mapping.canonical.shape``.
        mapping: the case's recorded native <-> canonical mapping.
        native_mask: native body mask (z, y, x), or ``None`` to keep every in-FOV voxel.

    Returns:
        float32 array (z, y, x) of the native size, clipped to [-1024, 3071] HU.
    """
    hu = _check_canonical(hu, mapping, "sCT")
    _check_mask(native_mask, mapping)
    native = to_native(hu, mapping, outside_value=AIR_HU, native_mask=native_mask)
    return np.clip(native, FULL_CT_MIN_HU, FULL_CT_MAX_HU).astype(np.float32, copy=False)


def std_to_native(std_map: np.ndarray, mapping: GridMapping, native_mask: np.ndarray | None) -> np.ndarray:
    """Resample a canonical uncertainty (standard deviation) map; 0 outside the FOV and mask.

    Args:
        std_map: canonical per-voxel standard deviation in HU, (z, y, x).
        mapping: the case's recorded mapping.
        native_mask: native body mask (z, y, x) or ``None``.

    Returns:
        float32 array (z, y, x) of the native size, >= 0.
    """
    std_map = _check_canonical(std_map, mapping, "std map")
    _check_mask(native_mask, mapping)
    native = to_native(std_map, mapping, outside_value=0.0, native_mask=native_mask)
    return np.maximum(native, 0.0).astype(np.float32, copy=False)
