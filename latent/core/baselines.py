"""The two floors every method must beat: water and bulk density.

- ``water``: 0 HU inside the body mask, -1000 HU outside (the organisers' baseline).
- ``bulk``: three MR intensity classes inside the mask, each given one HU value. No MR window
  separates cortical bone from air (both are dark), so the classes are *dark* (air or cortical
  bone), *intermediate* (soft tissue) and *bright* (fat, marrow). The HU of each class is the
  median CT HU of that class over training cases that have a CT (median because MAE is the
  score); without training CTs, literature values are used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from latent.core.intensity import AIR_HU, fit_mr_scaling, mr_to_unit

#: Normalised-MR class edges (MR / p99.5 inside the mask): dark < 0.15 <= soft < 0.7 <= bright.
BULK_THRESHOLDS = (0.15, 0.7)
#: Class HU without training data: dark as air/bone mixture, muscle-like soft tissue, fat.
DEFAULT_BULK_HU = (-500.0, 40.0, -100.0)


@dataclass(frozen=True)
class BulkModel:
    """Class thresholds on normalised MR and the HU assigned to each class."""

    thresholds: tuple[float, float] = BULK_THRESHOLDS
    class_hu: tuple[float, float, float] = DEFAULT_BULK_HU
    fitted_on: list[str] = field(default_factory=list)

    def classify(self, mr: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Class index (0 dark, 1 soft, 2 bright) per voxel from the normalised MR."""
        normalised = mr_to_unit(mr, fit_mr_scaling(mr, mask))
        return np.digitize(normalised, self.thresholds).astype(np.uint8)

    def predict(self, mr: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Bulk-density sCT (z, y, x) in HU; air outside the mask."""
        classes = self.classify(mr, mask)
        sct = np.asarray(self.class_hu, dtype=np.float32)[classes]
        sct[mask == 0] = AIR_HU
        return sct


def fit_bulk_model(pairs: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> BulkModel:
    """Fit class HU values as the median CT of each MR class over ``(pid, mr, ct, mask)`` pairs."""
    model = BulkModel()
    if not pairs:
        return model
    per_class: list[list[np.ndarray]] = [[], [], []]
    for _, mr, ct, mask in pairs:
        classes = model.classify(mr, mask)
        inside = mask > 0
        for index in range(3):
            per_class[index].append(ct[inside & (classes == index)].astype(np.float32))
    class_hu = tuple(
        float(np.median(np.concatenate(values))) if sum(v.size for v in values) else default
        for values, default in zip(per_class, DEFAULT_BULK_HU)
    )
    return BulkModel(class_hu=class_hu, fitted_on=[pid for pid, *_ in pairs])


def water_sct(mask: np.ndarray) -> np.ndarray:
    """Water baseline: 0 HU inside the mask, -1000 HU outside."""
    return np.where(mask > 0, 0.0, AIR_HU).astype(np.float32)
