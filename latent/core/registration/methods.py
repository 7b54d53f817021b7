"""The one place that turns ``--method`` into a displacement field, and into what a result depends on."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from latent.core.errors import BadConfigError
from latent.core.registration.elastix import parameter_files, register_arrays
from latent.core.registration.settings import METHODS, RegisterSettings


def method_files(settings: RegisterSettings) -> list[Path]:
    """The elastix parameter maps ``settings.method`` uses (``feature``: the rigid map of its start, if any).

    Raises:
        BadConfigError: an unknown method, or a map file that is missing.
    """
    if settings.method not in METHODS:
        raise BadConfigError(f"--method: unknown method {settings.method!r}; expected one of {', '.join(METHODS)}")
    if settings.method == "feature":
        return parameter_files("rigid", settings.parameter_dir) if settings.feature.initial == "rigid" else []
    return parameter_files(settings.method, settings.parameter_dir)


def method_identity(settings: RegisterSettings) -> dict[str, str]:
    """What a result depends on besides the images and the maps (``feature``: its settings and VAE weights)."""
    if settings.method != "feature":
        return {}
    from latent.core.registration.feature import feature_identity

    return feature_identity(settings.feature)


def register_field(mr: np.ndarray, ct: np.ndarray, mask: np.ndarray, spacing_zyx: Sequence[float],
                   settings: RegisterSettings) -> np.ndarray:
    """Register ``ct`` (moving) onto ``mr`` (fixed) by ``settings.method``.

    Returns:
        The displacement field (3, z, y, x) in mm, components (z, y, x): the CT value that lands
        on voxel ``p`` is read at ``p + field[:, p] / spacing`` (every method, one convention).
    """
    method_files(settings)
    if settings.method != "feature":
        return register_arrays(mr, ct, mask, spacing_zyx, settings.method, settings.parameter_dir, settings.threads)
    from latent.core.registration.feature import register_feature

    initial = None
    if settings.feature.initial == "rigid":
        initial = register_arrays(mr, ct, mask, spacing_zyx, "rigid", settings.parameter_dir, settings.threads)
    return register_feature(mr, ct, mask, spacing_zyx, settings.feature, initial)
