"""Figures of a method comparison; every function writes one PNG and returns its path.

The Agg backend is selected here, before pyplot is imported, so figures render headless (CI,
GPU nodes) whatever the caller's environment says.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, ScalarFormatter  # noqa: E402

from latent.app.bench.stats import pareto_front  # noqa: E402

#: Resolution of every PNG: sharp enough for a report page, small enough to embed as base64.
DPI = 110
#: CT display window in HU: air to dense cortical bone, the range sCT errors matter in.
CT_WINDOW = (-1000.0, 1500.0)
#: Error display range in HU (sCT - CT): +-500 HU separates soft-tissue slips from bone misses.
ERROR_RANGE = 500.0
#: Smallest seconds shown on a log axis: a baseline can take ~0 s and log(0) is undefined.
MIN_SECONDS = 1e-3
#: MR display percentiles inside the mask: MR has no absolute unit, so window on its own spread.
MR_PERCENTILES = (1.0, 99.0)
#: Line style of a reference in the Pareto plot, by its reason (latent.app.bench.config.REFERENCES).
REFERENCE_STYLES = {"sees the CT": ":", "baseline": "--"}
#: Grey shown where the error or std is undefined (outside the mask).
OUTSIDE_GREY = "0.85"


def save_png(fig: plt.Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG at :data:`DPI`, close it and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    plt.close(fig)
    return path


def _choices_and_references(points: Sequence[Mapping]) -> tuple[list[dict], list[dict]]:
    """The plottable methods that are choices (finite MAE and seconds) and references (finite MAE)."""
    choices = [dict(p, seconds_per_volume=max(float(p["seconds_per_volume"]), MIN_SECONDS)) for p in points
               if not p.get("reference") and math.isfinite(float(p["mae"]))
               and math.isfinite(float(p["seconds_per_volume"]))]
    references = sorted((dict(p) for p in points if p.get("reference") and math.isfinite(float(p["mae"]))),
                        key=lambda p: float(p["mae"]))
    return choices, references


def pareto_plot(points: Sequence[Mapping], path: str | Path) -> Path:
    """MAE against inference seconds per volume: the choices as labelled points with their Pareto
    front, each reference as a labelled horizontal line at its MAE.

    Args:
        points: ``{"name", "mae", "seconds_per_volume"}`` per method; a reference (a baseline, or an
            oracle that sees the CT) also has ``"reference"``, the reason shown in its label.
        path: PNG to write.

    Returns:
        ``path``.
    """
    choices, references = _choices_and_references(points)
    if not choices and not references:
        raise ValueError("pareto_plot: no method with a finite MAE and seconds per volume")
    front = pareto_front(choices)
    on_front = {p["name"] for p in front}
    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    for point in choices:
        best = point["name"] in on_front
        ax.scatter(point["seconds_per_volume"], point["mae"], s=60 if best else 40, zorder=3,
                   color="tab:red" if best else "tab:blue", edgecolor="black" if best else "none")
        ax.annotate(point["name"], (point["seconds_per_volume"], point["mae"]), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    if front:
        # Post step: a method's MAE stays attainable at every larger time budget until the next front point.
        ax.step([p["seconds_per_volume"] for p in front], [p["mae"] for p in front], where="post",
                color="tab:red", alpha=0.7, label="Pareto front (methods that see only the MR)")
    for index, reference in enumerate(references):
        style = REFERENCE_STYLES.get(str(reference["reference"]), "--")
        ax.axhline(reference["mae"], color="0.35", linestyle=style, linewidth=1.0, zorder=1)
        # Alternate sides, in MAE order, so close references (the two grid floors) keep apart labels.
        left = index % 2 == 0
        ax.annotate(f"{reference['name']} ({reference['reference']})", (0.01 if left else 0.99, reference["mae"]),
                    xycoords=("axes fraction", "data"), ha="left" if left else "right", va="bottom", fontsize=7,
                    color="0.25")
    for reason, style in REFERENCE_STYLES.items():
        if any(r["reference"] == reason for r in references):
            ax.plot([], [], color="0.35", linestyle=style, linewidth=1.0, label=f"reference: {reason}")
    ax.set_xscale("log")
    if not choices:
        ax.set_xlim(MIN_SECONDS, 1.0)
    # Ticks at 1-2-5 per decade, labelled plainly: a split of methods often spans under one decade.
    ax.xaxis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("inference seconds per volume (log)")
    ax.set_ylabel("MAE (HU)")
    ax.set_title("Accuracy against inference time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return save_png(fig, path)


def step_curve(points: Sequence[tuple[float, float, float]], path: str | Path) -> Path:
    """DDIM step curve: MAE against sampling steps, with seconds per volume on a second axis.

    Args:
        points: ``(steps, mae, seconds)`` per sampling setting.
        path: PNG to write.

    Returns:
        ``path``.
    """
    if not points:
        raise ValueError("step_curve: no points")
    steps, mae, seconds = (np.asarray(column, dtype=float) for column in zip(*sorted(points)))
    fig, ax = plt.subplots(figsize=(6.0, 4.0), layout="constrained")
    ax.plot(steps, mae, "o-", color="tab:blue", label="MAE")
    ax.set_xscale("log")
    ax.set_xticks(steps)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("MAE (HU)", color="tab:blue")
    ax.grid(True, alpha=0.3)
    twin = ax.twinx()
    twin.plot(steps, seconds, "s--", color="tab:orange", label="seconds / volume")
    twin.set_ylabel("seconds per volume", color="tab:orange")
    ax.set_title("DDIM sampling steps")
    return save_png(fig, path)


def region_bars(table: Sequence[Mapping], metric: str, path: str | Path, group_key: str = "region") -> Path:
    """Bars of ``metric`` per region (and ``all``), one bar per method, bootstrap CIs as error bars.

    Args:
        table: :func:`latent.app.bench.stats.method_table` output.
        metric: the metric to plot (needs ``metric``, ``metric_ci_low`` and ``metric_ci_high``).
        path: PNG to write.
        group_key: the grouping key of the table.

    Returns:
        ``path``.
    """
    if not table:
        raise ValueError("region_bars: empty table")
    methods = list(dict.fromkeys(entry["method"] for entry in table))
    groups = list(dict.fromkeys(entry[group_key] for entry in table if entry[group_key] != "all"))
    groups += ["all"] if any(entry[group_key] == "all" for entry in table) else []
    lookup = {(entry["method"], entry[group_key]): entry for entry in table}
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(groups) * max(1, len(methods)) * 0.5 + 2), 4.2),
                           layout="constrained")
    centres = np.arange(len(groups), dtype=float)
    for index, method in enumerate(methods):
        heights, errors = [], [[], []]
        for group in groups:
            entry = lookup.get((method, group), {})
            mean = float(entry.get(metric, math.nan))
            low, high = float(entry.get(f"{metric}_ci_low", math.nan)), float(entry.get(f"{metric}_ci_high", math.nan))
            finite = math.isfinite(mean)
            heights.append(mean if finite else math.nan)
            # A missing or unbounded interval draws no whisker rather than an infinite one.
            errors[0].append(mean - low if finite and math.isfinite(low) else 0.0)
            errors[1].append(high - mean if finite and math.isfinite(high) else 0.0)
        ax.bar(centres + (index - (len(methods) - 1) / 2) * width, heights, width, yerr=errors, capsize=3,
               label=method)
    ax.set_xticks(centres, groups)
    ax.set_xlabel(group_key)
    ax.set_ylabel(metric + (" (HU)" if metric.startswith(("mae", "bias")) else ""))
    ax.set_title(f"{metric} per {group_key} (95 % bootstrap CI)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=min(4, len(methods)))
    return save_png(fig, path)


def training_curves(curves: Mapping[str, Sequence[tuple[float, float]]], path: str | Path) -> Path:
    """Validation MAE in HU against training seconds, one line per method.

    Args:
        curves: method name -> ``(seconds, val_mae_hu)`` points.
        path: PNG to write.

    Returns:
        ``path``.
    """
    if not any(curves.values()):
        raise ValueError("training_curves: no points")
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    for name, points in curves.items():
        if points:
            seconds, mae = zip(*sorted(points))
            ax.plot(seconds, mae, "o-", markersize=3, label=name)
    ax.set_xlabel("training seconds")
    ax.set_ylabel("validation MAE (HU)")
    ax.set_title("Training curves")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def _centre(mask: np.ndarray) -> tuple[int, int, int]:
    """Centre of the mask's bounding box (of the volume when the mask is empty), as (z, y, x)."""
    inside = np.argwhere(mask > 0)
    if inside.size == 0:
        return tuple(int(s // 2) for s in mask.shape)
    return tuple(int(v) for v in (inside.min(axis=0) + inside.max(axis=0)) // 2)


def _views(volume: np.ndarray, centre: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial (y, x), coronal (z, x) and sagittal (z, y) slices through ``centre``."""
    z, y, x = centre
    return [volume[z], volume[:, y, :], volume[:, :, x]]


def slice_panel(mr: np.ndarray, ct: np.ndarray, sct: np.ndarray, mask: np.ndarray, path: str | Path,
                std: np.ndarray | None = None, title: str = "",
                spacing_zyx: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Path:
    """Axial, coronal and sagittal slices of one case: MR | CT | sCT | error (sCT - CT) [| std].

    Args:
        mr, ct, sct, mask: (z, y, x) arrays on one grid; CT and sCT in HU.
        path: PNG to write.
        std: optional per-voxel std of several samples (HU), shown in a last column.
        title: figure title (case id, method).
        spacing_zyx: voxel spacing in mm, for the aspect ratio of each view.

    Returns:
        ``path``.
    """
    volumes = [np.asarray(v, dtype=np.float32) for v in (mr, ct, sct)]
    mask = np.asarray(mask) > 0
    if any(v.shape != mask.shape for v in volumes) or (std is not None and np.shape(std) != mask.shape):
        raise ValueError(f"slice_panel: volumes must share one (z, y, x) shape, mask is {mask.shape}")
    mr, ct, sct = volumes
    centre = _centre(mask)
    sz, sy, sx = (float(s) for s in spacing_zyx)
    aspects = [sy / sx, sz / sx, sz / sy]
    # Axial with anterior up; coronal and sagittal with superior (larger z) up.
    origins = ["upper", "lower", "lower"]
    reference = mr[mask] if mask.any() else mr.ravel()
    mr_low, mr_high = np.percentile(reference, MR_PERCENTILES)
    mr_high = mr_high if mr_high > mr_low else mr_low + 1.0
    error = np.ma.masked_where(~mask, sct - ct)
    columns = [("MR", _views(mr, centre), {"cmap": "gray", "vmin": mr_low, "vmax": mr_high}),
               ("CT", _views(ct, centre), {"cmap": "gray", "vmin": CT_WINDOW[0], "vmax": CT_WINDOW[1]}),
               ("sCT", _views(sct, centre), {"cmap": "gray", "vmin": CT_WINDOW[0], "vmax": CT_WINDOW[1]}),
               ("error sCT - CT", _views(error, centre),
                {"cmap": plt.get_cmap("RdBu_r").with_extremes(bad=OUTSIDE_GREY), "vmin": -ERROR_RANGE,
                 "vmax": ERROR_RANGE})]
    if std is not None:
        std_masked = np.ma.masked_where(~mask, np.asarray(std, dtype=np.float32))
        std_high = float(std_masked.max()) if std_masked.count() and float(std_masked.max()) > 0 else 1.0
        columns.append(("std", _views(std_masked, centre),
                        {"cmap": plt.get_cmap("magma").with_extremes(bad=OUTSIDE_GREY), "vmin": 0.0,
                         "vmax": std_high}))
    fig, axes = plt.subplots(3, len(columns), figsize=(2.4 * len(columns), 8.0), layout="constrained",
                             squeeze=False)
    images = []
    for col, (name, views, style) in enumerate(columns):
        for row, view in enumerate(views):
            ax = axes[row, col]
            image = ax.imshow(view, aspect=aspects[row], origin=origins[row], interpolation="nearest", **style)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
            if col == 0:
                ax.set_ylabel(("axial", "coronal", "sagittal")[row], fontsize=9)
        images.append(image)
    # One bar per display scale: CT and sCT share the HU window, so they share one bar.
    fig.colorbar(images[1], ax=list(axes[:, 1:3].ravel()), location="bottom", shrink=0.8, label="HU")
    fig.colorbar(images[3], ax=list(axes[:, 3]), location="bottom", shrink=0.9, label="error (HU)")
    if std is not None:
        fig.colorbar(images[4], ax=list(axes[:, 4]), location="bottom", shrink=0.9, label="std (HU)")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_png(fig, path)
