"""``tune.html``: a self-contained page of a study (the bench report's page, tables and embedded
PNGs): optimisation history, validation curves, fANOVA importances, slice and parallel-coordinate
plots, the table of every trial."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import numpy as np

from latent.app.bench import figures as bench_figures
from latent.app.bench.report import HTML_TEMPLATE, html_figure, html_table, png_data
from latent.app.tune.space import SearchSpace, cell
from latent.core.atomic import write_text_atomic

plt = bench_figures.plt
STATE_STYLE = {"COMPLETE": ("tab:blue", "o"), "PRUNED": ("tab:orange", "v"), "FAIL": ("tab:red", "x")}


def _complete(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [row for row in record["trials"] if row["state"] == "COMPLETE" and row["value"] is not None]


def history(record: dict[str, Any]) -> str:
    """Each complete trial's value by trial number, and the best so far."""
    rows = _complete(record)
    fig, ax = plt.subplots(figsize=(7.0, 3.6), layout="constrained")
    numbers = [row["number"] for row in rows]
    values = [row["value"] for row in rows]
    ax.plot(numbers, values, "o", color="tab:blue", label="complete trial")
    ax.step(numbers, np.minimum.accumulate(values) if values else [], where="post", color="tab:red", label="best so far")
    for state in ("PRUNED", "FAIL"):
        marks = [row["number"] for row in record["trials"] if row["state"] == state]
        if marks:
            colour, marker = STATE_STYLE[state]
            ax.plot(marks, [max(values, default=1.0)] * len(marks), marker, color=colour, label=state.lower())
    ax.set(xlabel="trial", ylabel="validation MAE (HU)", title="Optimisation history")
    ax.legend(fontsize=8)
    return png_data(fig)


def importance_bars(found: dict[str, float]) -> str:
    """fANOVA importance per field."""
    names = list(found)[::-1]
    fig, ax = plt.subplots(figsize=(6.0, 0.5 + 0.4 * len(names)), layout="constrained")
    ax.barh(names, [found[name] for name in names], color="tab:blue")
    ax.set(xlabel="fANOVA importance", xlim=(0, 1))
    return png_data(fig)


def _axis_values(rows: list[dict[str, Any]], name: str, space: SearchSpace) -> tuple[list[float], list[str] | None]:
    """A field's values as numbers (categorical: the choice's index) and the choice labels."""
    distribution = space.root[name]
    if distribution.type != "categorical":
        return [float(row[name]) for row in rows], None
    labels = [str(cell(choice)) for choice in distribution.choices]
    texts = [str(row[name]) for row in rows]
    return [float(labels.index(text)) if text in labels else math.nan for text in texts], labels


def slices(record: dict[str, Any], space: SearchSpace) -> str:
    """Validation MAE against each field, one panel per field (complete trials)."""
    rows, names = _complete(record), list(space.root)
    columns = min(3, len(names))
    lines = -(-len(names) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4.0 * columns, 3.0 * lines), layout="constrained", squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        xs, labels = _axis_values(rows, name, space)
        ax.scatter(xs, [row["value"] for row in rows], c=[row["number"] for row in rows], cmap="viridis", s=18)
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
        elif space.root[name].type == "loguniform":
            ax.set_xscale("log")
        ax.set(xlabel=name, ylabel="val MAE (HU)")
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    return png_data(fig)


def parallel_coordinates(record: dict[str, Any], space: SearchSpace) -> str:
    """One line per complete trial across every field (scaled to its range) and the MAE."""
    rows, names = _complete(record), list(space.root)
    columns = []
    for name in names:
        xs, _ = _axis_values(rows, name, space)
        distribution = space.root[name]
        if distribution.type == "loguniform":
            xs, low, high = np.log(xs), math.log(distribution.low), math.log(distribution.high)
        elif distribution.type == "categorical":
            low, high = 0.0, max(1.0, len(distribution.choices) - 1.0)
        else:
            low, high = distribution.low, distribution.high
        columns.append((np.asarray(xs, dtype=float) - low) / (high - low))
    values = np.asarray([row["value"] for row in rows], dtype=float)
    spread = (values.max() - values.min()) if values.size else 0.0
    columns.append((values - values.min()) / spread if spread > 0 else np.zeros_like(values))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * (len(names) + 1)), 3.8), layout="constrained")
    colours = plt.get_cmap("viridis_r")
    for index in np.argsort(-values):
        ax.plot(range(len(columns)), [column[index] for column in columns],
                color=colours(columns[-1][index]), alpha=0.8)
    ax.set_xticks(range(len(columns)), [*names, "val MAE"], rotation=20, fontsize=8)
    ax.set(ylabel="scaled to the range searched", title="Parallel coordinates (dark: low MAE)")
    return png_data(fig)


def curves(record: dict[str, Any], intermediate: dict[int, dict[int, float]]) -> str:
    """Each trial's validation MAE against the training step (what the pruner saw)."""
    fig, ax = plt.subplots(figsize=(7.0, 3.6), layout="constrained")
    states = {row["number"]: row["state"] for row in record["trials"]}
    for number, values in intermediate.items():
        colour, marker = STATE_STYLE.get(states.get(number, "FAIL"), ("grey", "."))
        steps = sorted(values)
        ax.plot(steps, [values[s] for s in steps], marker=marker, color=colour, alpha=0.7, markersize=4)
    ax.set(xlabel="training step", ylabel="validation MAE (HU)",
           title="Validation during each trial (blue: complete, orange: pruned, red: failed)")
    return png_data(fig)


def write_html(path: Path, record: dict[str, Any], space: SearchSpace,
               intermediate: dict[int, dict[int, float]] | None = None) -> Path:
    """The page: settings, best trial, importances, figures, every trial."""
    trials = record["trials"]
    headers = list(trials[0]) if trials else ["number"]
    table = (headers, [["" if row.get(h) is None else (f"{row[h]:.4g}" if isinstance(row[h], float) else str(row[h]))
                        for h in headers] for row in trials])
    best = record["best"]
    page = [f"<h1>latent tune: study {html.escape(record['study'])}</h1>",
            "<p>" + html.escape("; ".join(f"{k}: {v}" for k, v in record["settings"].items())) + "</p>",
            "<p>" + html.escape(", ".join(f"{n} {state.lower()}" for state, n in record["counts"].items())) + "</p>",
            f"<p><b>Best</b>: trial {best['number']}, validation MAE {best['value']:.2f} HU</p>" if best else
            "<p>No trial completed.</p>"]
    complete = _complete(record)
    if complete:
        page.append(html_figure(history(record), "Complete trials' native-grid validation MAE and the best so far; "
                                "pruned and failed trials marked at the top."))
    if intermediate:
        page.append(html_figure(curves(record, intermediate), "Intermediate values reported to the pruner."))
    page.append("<h2>fANOVA importances</h2>")
    if record["importances"]:
        page.append(html_table((["field", "importance"], [[k, f"{v:.3f}"] for k, v in record["importances"].items()])))
        page.append(html_figure(importance_bars(record["importances"]), "fANOVA importance (Optuna's evaluator)."))
    else:
        page.append(f"<p>{html.escape(record['importances_note'])}</p>")
    if len(complete) >= 2:
        page.append(html_figure(slices(record, space), "Validation MAE against each searched field (colour: trial)."))
        page.append(html_figure(parallel_coordinates(record, space), "Every complete trial across the fields."))
    page += ["<h2>Trials</h2>", html_table(table)]
    return write_text_atomic(path, HTML_TEMPLATE.format(title=f"latent tune {record['study']}", body="\n".join(page)))
