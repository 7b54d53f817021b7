"""``latent register``: register every case's CT onto its MR, write register.csv, register.json and
register.html (overlays before / after, figures from the bench report helpers)."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from latent.app.bench import figures as bench_figures
from latent.app.bench.report import HTML_TEMPLATE, html_table
from latent.core.atomic import remove_stale_temporaries, write_atomic, write_text_atomic
from latent.core.cases import Case
from latent.core.io import read_volume
from latent.core.registration.case import (COLUMNS, RECORD_DIR, RegisterSettings, case_folder, register_case)
from latent.core.runner import CaseRun, run_over_cases, select_cases

plt = bench_figures.plt


@dataclass
class RegisterOutcome:
    """The walk over the cases, the files written and the seconds taken."""

    run: CaseRun[dict]
    written: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0


def overlay_png(case: Case, out_root: Path, path: Path) -> Path:
    """MR (magenta) over the CT (grey) before and after, on the mask's middle axial and coronal slices."""
    folder = case_folder(out_root, case)
    mr, properties = read_volume(folder / case.mr.name, dtype=np.float32)
    mask = read_volume(folder / case.mask.name)[0] > 0
    before = read_volume(next(folder.glob("ct_orig.*")), dtype=np.float32)[0]
    after = read_volume(folder / "ct.mha", dtype=np.float32)[0]
    inside = np.argwhere(mask)
    z, y, _ = ((inside.min(axis=0) + inside.max(axis=0)) // 2) if inside.size else np.array(mask.shape) // 2
    low, high = np.percentile(mr[mask] if mask.any() else mr, bench_figures.MR_PERCENTILES)
    sx, sy, sz = properties.spacing
    fig, axes = plt.subplots(2, 2, figsize=(7.2, 7.2), layout="constrained")
    for col, (name, ct) in enumerate((("before", before), ("after", after))):
        for row, (view, aspect, mr_view, ct_view) in enumerate((
                ("axial", sy / sx, mr[z], ct[z]), ("coronal", sz / sx, mr[:, y, :][::-1], ct[:, y, :][::-1]))):
            grey = np.clip((ct_view - bench_figures.CT_WINDOW[0]) / np.subtract(*bench_figures.CT_WINDOW[::-1]), 0, 1)
            magenta = np.clip((mr_view - low) / max(high - low, 1e-6), 0, 1)
            axes[row, col].imshow(np.stack([0.6 * grey + 0.4 * magenta, 0.6 * grey, 0.6 * grey + 0.4 * magenta],
                                           axis=-1), interpolation="nearest", aspect=aspect)
            axes[row, col].set_title(f"{case.pid} {view}, {name}", fontsize=8)
            axes[row, col].axis("off")
    return bench_figures.save_png(fig, path)


def columns(rows: list[dict]) -> list[str]:
    """:data:`COLUMNS` that some row has (the truth columns appear only for cases that know their truth)."""
    return [column for column in COLUMNS if any(column in row for row in rows)] or list(COLUMNS)


def write_tables(out: Path, rows: list[dict], run: CaseRun[dict], settings: RegisterSettings) -> dict[str, Path]:
    """``register.csv`` (one row per registered case) and ``register.json`` (settings, rows, outcome)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns(rows), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    summary = {"method": settings.method, "parameter_dir": str(settings.parameter_dir or "latent/configs/elastix"),
               "nmi_tolerance": settings.nmi_tolerance, "max_negative_jacobian": settings.max_negative_jacobian,
               **({"feature": settings.feature.model_dump()} if settings.method == "feature" else {}),
               "cases": rows, **run.manifest()}
    return {"register.csv": write_text_atomic(out / "register.csv", buffer.getvalue()),
            "register.json": write_text_atomic(out / "register.json", json.dumps(summary, indent=2) + "\n")}


def write_html(out: Path, rows: list[dict], cases: dict[str, Case], run: CaseRun[dict]) -> Path:
    """``register.html``: the table, the failures and each case's overlay before / after."""
    page = [f"<h1>latent register ({html.escape(rows[0]['method'] if rows else '-')})</h1>",
            f"<p>{html.escape(run.summary())}. Columns: docs/registration.md.</p>",
            html_table((columns(rows), [[str(row.get(c, "")) for c in columns(rows)] for row in rows]))]
    if run.failures:
        page.append("<h2>Failed cases</h2>" + html_table((["case", "error"], sorted(run.failures.items()))))
    for row in rows:
        case = cases[row["pid"]]
        try:
            path = overlay_png(case, out, out / RECORD_DIR / "overlays" / f"{case.pid}.png")
        except (OSError, ValueError, StopIteration) as error:
            page.append(f"<p>{html.escape(case.pid)}: no overlay ({html.escape(str(error))})</p>")
            continue
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        page.append(f'<h3>{html.escape(case.pid)}</h3><figure><img src="data:image/png;base64,{data}" '
                    f'alt="{html.escape(case.pid)}"><figcaption>MR (magenta) over the CT (grey), before and after'
                    "</figcaption></figure>")
    return write_atomic(out / "register.html", lambda temporary: temporary.write_text(
        HTML_TEMPLATE.format(title="latent register", body="\n".join(page))))


def run_register(data: Path, out: Path, settings: RegisterSettings, workers: int = 1,
                 quiet: bool = False) -> RegisterOutcome:
    """Register every case (a bad case is a one-line failure) and write the tables and the page."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    selection = select_cases(data, need_mask=False)
    run = run_over_cases(None, partial(register_case, data_root=data, out_root=out, settings=settings),
                         "register", quiet=quiet, selection=selection, workers=workers)
    order = [case.pid for case in selection.cases if case.pid in run.results]
    rows = [run.results[pid] for pid in order]
    written = write_tables(out, rows, run, settings)
    written["register.html"] = write_html(out, rows, {case.pid: case for case in selection.cases}, run)
    return RegisterOutcome(run, written, time.perf_counter() - started)
