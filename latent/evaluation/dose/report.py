"""Dose report: per-case figures (DVH curves, dose difference slices) and summary tables.

Figures use matplotlib's object API (no pyplot state, no display needed); matplotlib comes with
the dose extra and is imported only when a figure is drawn.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import numpy as np

#: Summary columns and their display precision: dose MAE and DVH metric as fractions, gamma
#: pass rate in percent, range shift in mm water.
DOSE_COLUMNS = {
    "photon_mae": 4, "photon_dvh": 4, "photon_gamma": 2,
    "proton_mae": 4, "proton_dvh": 4, "proton_gamma": 2,
    "range_shift_mm": 2,
}
#: Colours of successive structures in the DVH plot.
STRUCTURE_COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:gray")


def cumulative_dvh(dose: np.ndarray, mask: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Percentage of ``mask`` receiving at least each dose in ``bins``."""
    values = np.sort(dose[mask])
    if values.size == 0:
        return np.zeros_like(bins)
    return 100.0 * (values.size - np.searchsorted(values, bins, side="left")) / values.size


def plot_dvh(path: Path, doses: dict[str, tuple[np.ndarray, np.ndarray]], structures: dict[str, tuple[str, np.ndarray]],
             prescription_gy: float, title: str) -> Path:
    """DVH curves per modality: CT dose solid, sCT dose dashed.

    Args:
        path: PNG to write.
        doses: modality -> (CT dose, sCT dose), (z, y, x) Gy.
        structures: name -> (kind, mask) on the dose grid.
        prescription_gy: the x axis is in % of it.
        title: figure title (the case).
    """
    from matplotlib.figure import Figure  # noqa: PLC0415 - optional dependency

    figure = Figure(figsize=(5.5 * len(doses), 4.2), layout="constrained")
    axes = figure.subplots(1, len(doses), squeeze=False)[0]
    for axis, (mode, (dose_ct, dose_sct)) in zip(axes, doses.items()):
        top = max(float(dose_ct.max()), float(dose_sct.max()), prescription_gy) * 1.05
        bins = np.linspace(0.0, top, 300)
        for colour, (name, (_, mask)) in zip(STRUCTURE_COLOURS, structures.items()):
            if not mask.any():
                continue
            x = 100.0 * bins / prescription_gy
            axis.plot(x, cumulative_dvh(dose_ct, mask, bins), color=colour, label=f"{name} CT")
            axis.plot(x, cumulative_dvh(dose_sct, mask, bins), color=colour, linestyle="--", label=f"{name} sCT")
        axis.set_xlabel("dose (% of prescription)")
        axis.set_ylabel("volume (%)")
        axis.set_title(f"{mode}")
        axis.set_ylim(0, 102)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def plot_dose_difference(path: Path, hu: np.ndarray, doses: dict[str, tuple[np.ndarray, np.ndarray]], target: np.ndarray,
                         prescription_gy: float, title: str) -> Path:
    """Axial slice through the target centre: CT dose, sCT dose and sCT - CT (% of prescription).

    Args:
        path: PNG to write.
        hu: planning CT (z, y, x) shown underneath.
        doses: modality -> (CT dose, sCT dose) on the same grid.
        target: target mask, outlined.
        prescription_gy: dose scale.
        title: figure title.
    """
    from matplotlib.figure import Figure  # noqa: PLC0415

    z = int(round(np.argwhere(target)[:, 0].mean())) if target.any() else hu.shape[0] // 2
    figure = Figure(figsize=(12, 3.8 * len(doses)), layout="constrained")
    axes = figure.subplots(len(doses), 3, squeeze=False)
    for row, (mode, (dose_ct, dose_sct)) in enumerate(doses.items()):
        difference = 100.0 * (dose_sct[z] - dose_ct[z]) / prescription_gy
        limit = max(2.0, float(np.percentile(np.abs(difference), 99.5)))
        panels = (
            (f"{mode}: CT dose (% Rx)", 100.0 * dose_ct[z] / prescription_gy, "jet", (0, 110)),
            (f"{mode}: sCT dose (% Rx)", 100.0 * dose_sct[z] / prescription_gy, "jet", (0, 110)),
            (f"{mode}: sCT - CT (% Rx)", difference, "RdBu_r", (-limit, limit)),
        )
        for axis, (label, image, colour_map, (low, high)) in zip(axes[row], panels):
            axis.imshow(hu[z], cmap="gray", vmin=-400, vmax=600)
            shown = np.ma.masked_where(np.abs(image) < 1.0, image) if colour_map == "jet" else image
            artist = axis.imshow(shown, cmap=colour_map, vmin=low, vmax=high, alpha=0.6 if colour_map == "jet" else 0.85)
            if target[z].any():
                axis.contour(target[z], levels=[0.5], colors="white", linewidths=0.8)
            axis.set_title(label, fontsize=9)
            axis.set_axis_off()
            figure.colorbar(artist, ax=axis, shrink=0.8)
    figure.suptitle(f"{title} (axial slice {z})")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def format_summary(summary: list[dict], columns: Iterable[str], group_key: str = "region") -> str:
    """Markdown table (mean +- std) of :func:`summarise` output, ``latent evaluate`` style."""
    columns = list(columns)
    lines = [f"| {group_key} | n | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 2)]
    for entry in summary:
        cells = []
        for column in columns:
            digits = DOSE_COLUMNS.get(column, 3)
            mean, std = entry[column], entry[f"{column}_std"]
            cells.append("-" if math.isnan(mean) else f"{mean:.{digits}f} +- {std:.{digits}f}" if not math.isnan(std) and entry["n"] > 1 else f"{mean:.{digits}f}")
        lines.append(f"| {entry[group_key]} | {entry['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
