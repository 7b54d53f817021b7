"""HU -> relative stopping power (RSP) / relative electron density, piecewise linear.

The default table is the one matRad and pyRadPlan ship as their generic CT calibration (one
table for photons and protons): air up to -999 HU, fat-like values around -90 HU, water at
0 HU, bone up to 2.5 at 3000 HU. A measured scanner calibration replaces it through the
protocol (``hlut_hu`` / ``hlut_rsp``), and the same table then drives the plans and the range
proxy, so the proton dose and the range shift see the same physics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: matRad / pyRadPlan generic calibration points (HU).
DEFAULT_HLUT_HU = (-1024.0, -999.0, -90.0, -45.0, 0.0, 100.0, 350.0, 3000.0)
#: Relative stopping power (= relative electron density in this generic table) at those HU.
DEFAULT_HLUT_RSP = (0.001, 0.001, 0.95, 0.99, 1.0, 1.095, 1.199, 2.505)


@dataclass(frozen=True)
class StoppingPowerCurve:
    """Piecewise-linear HU -> RSP map, clamped outside the table, with its inverse."""

    hu: tuple[float, ...] = DEFAULT_HLUT_HU
    rsp: tuple[float, ...] = DEFAULT_HLUT_RSP

    def __post_init__(self) -> None:
        if len(self.hu) != len(self.rsp) or len(self.hu) < 2:
            raise ValueError("a stopping power curve needs >= 2 (HU, RSP) points of equal count")
        if np.any(np.diff(self.hu) <= 0) or np.any(np.diff(self.rsp) < 0):
            raise ValueError("HU must increase strictly and RSP must not decrease")

    def __call__(self, hu: np.ndarray) -> np.ndarray:
        """RSP of each HU value (float32, same shape)."""
        return np.interp(np.asarray(hu, dtype=np.float32), self.hu, self.rsp).astype(np.float32)

    def inverse(self, rsp: np.ndarray) -> np.ndarray:
        """An HU value whose RSP is ``rsp`` (exact inside the table's RSP range, clamped outside).

        Flat stretches of the table (e.g. air from -1024 to -999 HU) map to their upper end.
        """
        hu_points, rsp_points = np.asarray(self.hu), np.asarray(self.rsp)
        keep = np.r_[np.diff(rsp_points) > 0, True]  # last HU of every flat run
        return np.interp(np.asarray(rsp, dtype=np.float64), rsp_points[keep], hu_points[keep]).astype(np.float32)

    def as_table(self) -> np.ndarray:
        """(n, 2) array of (HU, RSP) rows, the layout pyRadPlan's ``hlut`` expects."""
        return np.stack([np.asarray(self.hu, float), np.asarray(self.rsp, float)], axis=1)
