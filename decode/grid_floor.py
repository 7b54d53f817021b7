"""The grid floor: the true CT taken to the canonical grid and straight back, with no model.

Every canonical-grid method passes its output through canonical -> native resampling, and its
input through native -> canonical; this oracle does only that, with the true CT, so its error is
the part of every method's error that is the grid's (docs/grids.md). ``window="vae"`` also clips
the CT to the VAE window [-1000, 1000] HU on the way, the floor of latent-to-latent routes
before the VAE adds its own error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from latent.core.cases import Case, CaseError
from latent.decode.native import canonical_to_native_sct
from latent.decode.predictors import NativePrediction
from latent.core.grid import CanonicalGrid
from latent.core.intensity import full_to_ct, vae_to_ct
from latent.core.io import VolumeProperties
from latent.core.prepare import prepare_case

Window = Literal["full", "vae"]


@dataclass
class GridFloorPredictor:
    """The true CT native -> canonical -> native, air outside the mask.

    ``window``: ``"full"`` ([-1024, 3071] HU, what pixel-space models and l2sct predict) or
    ``"vae"`` (clipped to the VAE window [-1000, 1000] HU on the canonical grid);
    ``allow_truncation``: score a case whose body the grid cuts (else a one-line error).
    """

    grid: CanonicalGrid
    window: Window = "full"
    allow_truncation: bool = False

    @property
    def label(self) -> str:
        return f"grid floor ({self.window})"

    def predict(self, case: Case) -> NativePrediction:
        if case.ct is None:
            raise CaseError(f"{case.pid}: the grid floor needs the CT, and {case.folder} has none")
        if self.window not in ("full", "vae"):
            raise ValueError(f"grid floor window must be 'full' or 'vae', got {self.window!r}")
        prepared = prepare_case(case, self.grid, allow_truncation=self.allow_truncation)
        canonical = full_to_ct(prepared.ct_full) if self.window == "full" else vae_to_ct(prepared.ct_vae)
        native = canonical_to_native_sct(canonical, prepared.mapping, prepared.native_mask)
        return NativePrediction(native, prepared.mapping.native,
                                outside_fraction=prepared.mapping.mask_fraction_outside)


def grid_floor_sct(case: Case, grid: CanonicalGrid, window: Window = "full",
                   allow_truncation: bool = False) -> tuple[np.ndarray, VolumeProperties]:
    """``(hu, native properties)`` of the case's grid floor: float32 (z, y, x) on the MR's grid."""
    prediction = GridFloorPredictor(grid, window, allow_truncation).predict(case)
    return prediction.hu, prediction.properties
