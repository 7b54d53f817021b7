"""The self-contained ``qa.html`` of ``latent qa``: a summary table coloured by label, cohort
distributions with the flagged cases marked, and overlays of each flagged case's worst slices
(figures embedded as base64 PNG; the bench report's page and table helpers)."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from latent.app.bench import figures as bench_figures
from latent.app.bench.report import HTML_TEMPLATE, html_figure, html_table, png_data
from latent.core.atomic import write_text_atomic
from latent.core.cases import Case
from latent.core.errors import user_message
from latent.core.prepare import read_native
from latent.core.qa.case import CaseQA
from latent.core.qa.cohort import Cohort
from latent.core.qa.config import QAConfig
from latent.core.qa.descriptors import metal_components
from latent.core.qa.fov import ranges

plt = bench_figures.plt
#: Main features drawn as cohort distributions, with their titles.
DISTRIBUTIONS = {"ct_soft_median": "CT soft-tissue median (HU)", "ct_p99": "CT p99 (HU)",
                 "air_fraction": "CT air fraction in the mask", "metal_volume_mm3": "metal volume (mm^3)",
                 "nmi_before": "CT-MR NMI", "nmi_delta": "NMI gain of the rigid registration",
                 "rigid_motion_mm": "in-plane motion of the rigid registration (mm)",
                 "mr_cv": "MR coefficient of variation", "bias_field_ratio": "MR bias field p95/p5",
                 "flagged_slices": "flagged slices"}
COLOURS = {"GREEN": "tab:green", "YELLOW": "orange", "RED": "tab:red"}
#: Row colours of the summary table.
ROW_STYLE = """<style>tr.GREEN td{background:#e3f5e1}tr.YELLOW td{background:#fff3c4}tr.RED td{background:#fbd5d5}
td.reasons{text-align:left}</style>"""


def distributions(cohort: Cohort) -> str:
    """Strip plots of :data:`DISTRIBUTIONS`, one point per case coloured by label, flagged cases named."""
    names = [n for n in DISTRIBUTIONS if n in cohort.features]
    columns = 3
    rows = max(1, -(-len(names) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(4.0 * columns, 2.6 * rows), layout="constrained", squeeze=False)
    jitter = np.random.default_rng(0)
    for ax, name in zip(axes.ravel(), names):
        for qa in cohort.cases:
            value = float(qa.values[name])
            label = str(qa.values.get("label"))
            y = jitter.uniform(-0.3, 0.3)
            ax.scatter(value, y, s=30 if label != "GREEN" else 14, color=COLOURS.get(label, "grey"),
                       edgecolor="black" if label != "GREEN" else "none", zorder=3 if label != "GREEN" else 2)
            if label != "GREEN":
                ax.annotate(qa.pid, (value, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.set_title(DISTRIBUTIONS[name], fontsize=9)
        ax.set_yticks([])
        ax.set_ylim(-0.6, 0.6)
        ax.grid(True, axis="x", alpha=0.3)
    for ax in axes.ravel()[len(names):]:
        ax.set_visible(False)
    return png_data(fig)


def overlay(case: Case, qa: CaseQA, config: QAConfig) -> str:
    """The case's worst slices: CT grey with the MR in magenta, the mask contour yellow, metal red."""
    mr, mask, ct, properties = read_native(case)
    metal = metal_components(ct, mask, properties.spacing, config).mask
    picks = qa.worst_slices(config.worst_slices) or [int(np.argmax(mask.reshape(mask.shape[0], -1).sum(axis=1)))]
    low, high = np.percentile(mr[mask > 0], bench_figures.MR_PERCENTILES)
    fig, axes = plt.subplots(1, len(picks), figsize=(3.6 * len(picks), 3.6), layout="constrained", squeeze=False)
    reasons = {}
    for k, code in qa.slices:
        reasons.setdefault(k, []).append(code)
    for ax, k in zip(axes.ravel(), picks):
        grey = np.clip((ct[k] - bench_figures.CT_WINDOW[0]) / np.subtract(*bench_figures.CT_WINDOW[::-1]), 0, 1)
        magenta = np.clip((mr[k] - low) / max(high - low, 1e-6), 0, 1)
        ax.imshow(np.stack([0.6 * grey + 0.4 * magenta, 0.6 * grey, 0.6 * grey + 0.4 * magenta], axis=-1),
                  interpolation="nearest", aspect=properties.spacing[1] / properties.spacing[0])
        if mask[k].any():
            ax.contour(mask[k], levels=[0.5], colors="yellow", linewidths=0.8)
        if metal[k].any():
            ax.contour(metal[k], levels=[0.5], colors="red", linewidths=1.0)
        ax.set_title(f"slice {k}: {', '.join(reasons.get(k, ['context']))}", fontsize=8)
        ax.axis("off")
    return png_data(fig)


def summary_table(cohort: Cohort) -> str:
    """One row per case coloured by label: pid, region, label, flagged slices, reasons."""
    head = "".join(f"<th>{h}</th>" for h in ("case", "region", "label", "flagged slices", "reasons"))
    body = []
    for qa in cohort.cases:
        label = str(qa.values.get("label"))
        text = "; ".join(f.text for f in qa.findings) or "-"
        cells = [qa.pid, qa.region, label, ranges([k for k, _ in qa.slices]) or "-"]
        body.append(f'<tr class="{label}">' + "".join(f"<td>{html.escape(c)}</td>" for c in cells)
                    + f'<td class="reasons">{html.escape(text)}</td></tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def write_qa_html(path: Path, cohort: Cohort, cases: dict[str, Case], config: QAConfig,
                  failures: dict[str, str]) -> Path:
    """Write ``qa.html`` (atomically); a flagged case whose volumes cannot be read again gets a line instead."""
    counts = {label: sum(qa.values.get("label") == label for qa in cohort.cases) for label in COLOURS}
    page = [ROW_STYLE, "<h1>Data quality review</h1>",
            f"<p>{len(cohort.cases)} case(s) reviewed: " + ", ".join(f"{n} {label}" for label, n in counts.items())
            + f"; {len(failures)} failed. The label rule and every column: docs/qa.md.</p>"]
    page += [f"<p>{html.escape(note)}</p>" for note in cohort.notes]
    page += ["<h2>Cases</h2>", summary_table(cohort)]
    if failures:
        page.append("<h2>Failed cases</h2>" + html_table((["case", "error"], [[p, m] for p, m in failures.items()])))
    if cohort.cases:
        page += ["<h2>Cohort distributions</h2>",
                 html_figure(distributions(cohort), "One point per case; YELLOW and RED cases outlined and named.")]
    flagged = [qa for qa in cohort.cases if qa.values.get("label") != "GREEN"]
    if flagged:
        page.append("<h2>Flagged cases</h2>")
    for qa in flagged:
        page.append(f"<h3>{html.escape(qa.pid)} ({html.escape(str(qa.values.get('label')))})</h3><ul>"
                    + "".join(f"<li>{html.escape(f.text)}</li>" for f in qa.findings) + "</ul>")
        try:
            page.append(html_figure(overlay(cases[qa.pid], qa, config), (
                "CT (grey) with the MR (magenta), the mask contour (yellow) and metal (red)")))
        except (OSError, ValueError) as error:
            page.append(f"<p>no overlay: {html.escape(user_message(error) or str(error))}</p>")
    return write_text_atomic(path, HTML_TEMPLATE.format(title="Data quality review", body="\n".join(page)))
