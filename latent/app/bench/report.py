"""The benchmark report: tables, paired statistics and figures of several methods on one test split.

:func:`write_report` turns per-case evaluation rows (``latent.evaluation.scoring``) of each method, plus
their compute figures, into ``report.md``, a self-contained ``report.html`` (figures embedded
as base64 PNG), ``results.json`` and ``results.csv`` (one row per method).
"""

from __future__ import annotations

import base64
import html
import importlib.metadata
import importlib.util
import io
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

from latent.app.bench import figures as bench_figures
from latent.app.bench.cohort import cohort_columns, cohort_results, cohort_tables
from latent.app.bench.config import REFERENCES
from latent.app.bench.stats import compare_to_best, method_table
from latent.evaluation.scoring import write_rows_csv
from latent.evaluation.metrics import METRICS, metric_digits, metric_names
from latent.core.provenance import git_revision, machine_description

#: Image-similarity metrics of the overall table, per-tissue columns and the std-map Spearman, with
#: their titles (one table: latent.evaluation.metrics.METRICS).
METRIC_LABELS = {name: METRICS[name].label for name in metric_names("image")}
TISSUE_LABELS = {name: METRICS[name].label for name in metric_names("tissue")}
UNCERTAINTY = metric_names("uncertainty")[0]
UNCERTAINTY_TITLE = ("Uncertainty: Spearman correlation of the per-voxel std with |sCT - CT| inside the mask "
                     "(mean +- std [95 % CI] over the test cases; methods with a std map)")
#: Metrics the methods are paired against the best on: True where lower is better.
PAIRED_METRICS = {name: metric.lower_is_better for name, metric in METRICS.items() if metric.paired}
#: Compute columns with their titles; any other key of a method's compute dict is appended.
COMPUTE_LABELS = {"train_seconds": "train s", "seconds_per_volume": "s/volume", "encode_s": "encode s",
                  "translate_s": "translate s", "decode_s": "decode s", "parameters": "params (M)",
                  "peak_memory_mb": "train peak memory (MB)", "predict_peak_memory_mb": "predict peak memory (MB)"}
#: Paired-table columns; the difference is method minus best, so its sign says which way the gap goes.
PAIRED_HEADERS = ["method", "n", "mean difference (method - best)", "Wilcoxon p", "Wilcoxon p (Holm)",
                  "paired t p", "Cohen's dz"]
#: Libraries whose versions are recorded (only those installed).
LIBRARIES = ("numpy", "scipy", "torch", "monai", "SimpleITK", "matplotlib")
#: Captions of the figures the report draws itself or commonly receives.
CAPTIONS = {"pareto": ("MAE against inference seconds per volume of the methods that see only the MR; red: their "
                       "Pareto front. Lines: references (baselines, and oracles that see the test CT), not choices."),
            "region_mae": "MAE per region with 95 % bootstrap confidence intervals.",
            "step_curve": "DDIM sampling steps: MAE and seconds per volume.",
            "training_curves": "Validation MAE against training seconds."}
#: First bytes of every PNG: an extra figure must be one to be embedded as image/png.
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

Table = tuple[list[str], list[list[str]]]


def library_versions() -> dict[str, str]:
    """Installed versions of :data:`LIBRARIES`, read from package metadata (nothing is imported)."""
    versions = {}
    for name in LIBRARIES:
        if importlib.util.find_spec(name) is None:
            continue
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def _number(value: object, digits: int = 3) -> str:
    """A float at ``digits`` decimals; NaN as ``n/a`` (not scored), infinity as ``inf``."""
    if value is None:
        return "n/a"
    value = float(value)
    if math.isnan(value):
        return "n/a"
    return ("inf" if value > 0 else "-inf") if math.isinf(value) else f"{value:.{digits}f}"


def _p_value(value: float) -> str:
    """A p-value to 3 significant digits (small ones stay readable)."""
    return "n/a" if math.isnan(value) else f"{value:.3g}"


def _cell(entry: Mapping, metric: str, with_std: bool = True) -> str:
    """``mean +- std [CI low, CI high]`` of ``metric`` in a method-table entry."""
    digits = metric_digits(metric)
    text = _number(entry.get(metric), digits)
    if with_std and not math.isnan(float(entry.get(f"{metric}_std", math.nan))):
        text += f" +- {_number(entry[f'{metric}_std'], digits)}"
    low, high = entry.get(f"{metric}_ci_low", math.nan), entry.get(f"{metric}_ci_high", math.nan)
    if not (math.isnan(low) and math.isnan(high)):
        text += f" [{_number(low, digits)}, {_number(high, digits)}]"
    return text


def results_rows(table: list[dict], paired: Mapping[str, tuple[str | None, list[dict]]],
                 compute: Mapping[str, Mapping]) -> list[dict]:
    """One flat row per method: overall metrics with std and CI, per-region means, paired tests, compute.

    Args:
        table: :func:`latent.app.bench.stats.method_table` output.
        paired: metric -> :func:`latent.app.bench.stats.compare_to_best` output.
        compute: method -> compute figures.

    Returns:
        Rows with ``method``, ``n``, ``<m>``, ``<m>_std``, ``<m>_ci_low``, ``<m>_ci_high``,
        ``<region>_<m>``, ``<m>_best``, ``<m>_vs_best_{difference,wilcoxon_p,wilcoxon_p_holm,
        ttest_p,cohens_dz}`` and every compute key.
    """
    rows = []
    for entry in (e for e in table if e["region"] == "all"):
        name = entry["method"]
        row = {key: value for key, value in entry.items() if key != "region"}
        for regional in (e for e in table if e["method"] == name and e["region"] != "all"):
            row.update({f"{regional['region']}_{metric}": regional[metric] for metric in METRIC_LABELS})
        for metric, (best, comparisons) in paired.items():
            row[f"{metric}_best"] = best
            found = next((c for c in comparisons if c["method"] == name), {})
            for key, source in (("difference", "mean_difference"), ("wilcoxon_p", "wilcoxon_p"),
                                ("wilcoxon_p_holm", "wilcoxon_p_holm"), ("ttest_p", "ttest_p"),
                                ("cohens_dz", "cohens_dz")):
                row[f"{metric}_vs_best_{key}"] = found.get(source, math.nan)
        row.update({key: compute.get(name, {}).get(key, math.nan) for key in COMPUTE_LABELS})
        row.update(compute.get(name, {}))
        rows.append(row)
    return rows


def build_tables(table: list[dict], paired: Mapping[str, tuple[str | None, list[dict]]],
                 compute: Mapping[str, Mapping]) -> dict[str, Table]:
    """Every report table as ``(headers, rows of cell strings)``, keyed by section title."""
    overall = [entry for entry in table if entry["region"] == "all"]
    methods = [entry["method"] for entry in overall]
    tables: dict[str, Table] = {"Methods (mean +- std [95 % bootstrap CI] over the test cases)": (
        ["method", "n", *METRIC_LABELS.values()],
        [[e["method"], str(e["n"]), *(_cell(e, m) for m in METRIC_LABELS)] for e in overall])}
    regions = list(dict.fromkeys(e["region"] for e in table if e["region"] != "all"))
    lookup = {(e["method"], e["region"]): e for e in table}
    def regional(name: str, region: str) -> str:
        entry = lookup.get((name, region))
        return "-" if entry is None else f"{_cell(entry, 'mae', with_std=False)} (n={entry['n']})"

    tables["MAE (HU) per region (mean [95 % CI])"] = (
        ["method", *regions, "all"], [[name, *(regional(name, r) for r in [*regions, "all"])] for name in methods])
    tables["Per-tissue MAE and bias (HU, mean +- std [95 % CI])"] = (
        ["method", *TISSUE_LABELS.values()], [[e["method"], *(_cell(e, c) for c in TISSUE_LABELS)] for e in overall])
    with_std_map = [e for e in overall if math.isfinite(float(e.get(UNCERTAINTY, math.nan)))]
    if with_std_map:
        tables[UNCERTAINTY_TITLE] = (["method", "n", "Spearman (std, |error|)"],
                                     [[e["method"], str(e["n"]), _cell(e, UNCERTAINTY)] for e in with_std_map])
    for metric, (best, comparisons) in paired.items():
        direction = "lower" if PAIRED_METRICS.get(metric, True) else "higher"
        best_mean = next((e[metric] for e in overall if e["method"] == best), math.nan)
        title = (f"Paired against the best on {METRIC_LABELS.get(metric, metric)} ({direction} is better): "
                 f"{best} ({_number(best_mean, metric_digits(metric))})")
        tables[title] = (PAIRED_HEADERS, [
            [c["method"], str(c["n"]), _number(c["mean_difference"], metric_digits(metric)),
             _p_value(c["wilcoxon_p"]), _p_value(c["wilcoxon_p_holm"]), _p_value(c["ttest_p"]),
             _number(c["cohens_dz"], 2)] for c in comparisons])
    extras = list(dict.fromkeys(k for name in methods for k in compute.get(name, {}) if k not in COMPUTE_LABELS))
    compute_rows = []
    for name in methods:
        figures = compute.get(name, {})
        cells = [_number(figures.get(k, math.nan) / 1e6 if k == "parameters" else figures.get(k, math.nan),
                         0 if k == "train_seconds" else 2) for k in COMPUTE_LABELS]
        compute_rows.append([name, *cells, *(_extra(figures.get(k)) for k in extras)])
    tables["Compute"] = (["method", *COMPUTE_LABELS.values(), *extras], compute_rows)
    return tables


def _extra(value: object) -> str:
    """An extra compute cell: numbers at 2 decimals, anything else as text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _number(value, 2)
    return "-" if value is None else str(value)


def _markdown(table: Table) -> str:
    """A GitHub markdown table (``|`` in a cell escaped)."""
    headers, rows = table
    lines = ["| " + " | ".join(_pipes(headers)) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(_pipes(row)) + " |" for row in rows])


def _pipes(cells: Sequence[str]) -> list[str]:
    """Cells with ``|`` escaped, so a name cannot split a markdown row."""
    return [cell.replace("|", "\\|") for cell in cells]


def html_table(table: Table) -> str:
    """The same table as HTML, every cell escaped."""
    headers, rows = table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def png_data(fig) -> str:
    """A matplotlib figure as base64 PNG text at the reports' resolution (the figure is closed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=bench_figures.DPI, format="png")
    bench_figures.plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def html_figure(data: str, caption: str) -> str:
    """An embedded PNG (base64 text, :func:`png_data`) with its caption, for a self-contained page."""
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _metadata_lines(metadata: Mapping) -> list[tuple[str, str]]:
    """``(key, text)`` per metadata entry; mappings as ``k: v`` lists, the rest as text."""
    lines = []
    for key, value in metadata.items():
        if isinstance(value, Mapping):
            value = "; ".join(f"{k}: {v}" for k, v in value.items())
        lines.append((str(key), str(value)))
    return lines


def _collect_figures(out_dir: Path, rows_by_method: Mapping[str, Sequence[dict]], table: list[dict],
                     compute: Mapping[str, Mapping], extra: Mapping[str, Path]) -> dict[str, Path]:
    """The Pareto plot and region bars drawn here, plus the given figures copied under ``figures/``."""
    figure_dir = out_dir / "figures"
    drawn: dict[str, Path] = {}
    overall = {e["method"]: e for e in table if e["region"] == "all"}
    points = [{"name": name, "mae": overall[name]["mae"], "reference": REFERENCES.get(name),
               "seconds_per_volume": compute.get(name, {}).get("seconds_per_volume", math.nan)}
              for name in rows_by_method if name in overall]
    if any(math.isfinite(p["mae"]) and (p["reference"] or math.isfinite(float(p["seconds_per_volume"])))
           for p in points):
        drawn["pareto"] = bench_figures.pareto_plot(points, figure_dir / "pareto.png")
    if table:
        drawn["region_mae"] = bench_figures.region_bars(table, "mae", figure_dir / "region_mae.png")
    for name, source in extra.items():
        source = Path(source)
        if source.read_bytes()[:len(PNG_MAGIC)] != PNG_MAGIC:
            raise ValueError(f"figure {name}: {source} is not a PNG")
        target = figure_dir / f"{name}.png"
        if source.resolve() != target.resolve():
            figure_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        drawn[name] = target
    return drawn


def _case_note(rows_by_method: Mapping[str, Sequence[dict]]) -> str:
    """One line on the test split: its size per region and whether every method has every case."""
    pid_sets = [{str(row["pid"]) for row in rows} for rows in rows_by_method.values()]
    if not pid_sets:
        return "No method has a scored case."
    every, shared = set().union(*pid_sets), set.intersection(*pid_sets)
    region_of = {str(row["pid"]): str(row.get("region")) for rows in rows_by_method.values() for row in rows}
    counts = {}
    for pid in shared:
        counts[region_of[pid]] = counts.get(region_of[pid], 0) + 1
    note = f"Test split: {len(shared)} cases scored by every method (" + \
        ", ".join(f"{region} {n}" for region, n in sorted(counts.items())) + ")."
    if shared != every:
        missing = len(every - shared)
        note += (f" {missing} case{'s' if missing > 1 else ''} lack{'' if missing > 1 else 's'} a score for some"
                 " method; paired tests use the cases both methods have.")
    return note


def write_report(out_dir: str | Path, rows_by_method: Mapping[str, Sequence[dict]],
                 compute: Mapping[str, Mapping] | None = None, figures: Mapping[str, Path] | None = None,
                 metadata: Mapping | None = None, tables: Mapping[str, Table] | None = None,
                 structural_bias: Mapping[str, Mapping | None] | None = None) -> tuple[Path, Path]:
    """Write ``report.md``, ``report.html``, ``results.json`` and ``results.csv`` under ``out_dir``.

    Args:
        out_dir: output folder (created; figures go to ``out_dir/figures``).
        rows_by_method: method -> per-case evaluation rows on the shared test split.
        compute: method -> ``{"train_seconds", "seconds_per_volume", "encode_s", "translate_s",
            "decode_s", "parameters", "peak_memory_mb", ...}``; any extra key gets a column.
        figures: extra PNGs by name (slice panels, step curve, training curves), embedded too.
        metadata: machine, library versions, git revision, recipes, note; missing machine, git
            revision and library versions are filled in.
        tables: extra sections ``title -> (headers, rows of cell strings)`` after the compute table.
        structural_bias: method -> its evaluation's StructB per region
            (:func:`latent.evaluation.structb.structb_by_region`); a table per structure.

    Returns:
        ``(report.md path, report.html path)``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    compute = {name: dict(values) for name, values in (compute or {}).items()}
    metadata = dict(metadata or {})
    note = str(metadata.pop("note", ""))
    metadata.setdefault("machine", machine_description())
    metadata.setdefault("git_revision", git_revision())
    metadata.setdefault("library_versions", library_versions())
    metadata.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))

    uncertain = any(UNCERTAINTY in row for rows in rows_by_method.values() for row in rows)
    metrics = [*METRIC_LABELS, *TISSUE_LABELS, *([UNCERTAINTY] if uncertain else [])]
    table = method_table(rows_by_method, metrics)
    paired = {metric: compare_to_best(rows_by_method, metric, lower) for metric, lower in PAIRED_METRICS.items()}
    cohort = cohort_results(rows_by_method, structural_bias or {})
    rows, columns = results_rows(table, paired, compute), cohort_columns(cohort)
    for row in rows:
        row.update(columns.get(row["method"], {}))
    extra_tables = dict(tables or {})
    tables = {**build_tables(table, paired, compute), **cohort_tables(cohort), **extra_tables}
    drawn = _collect_figures(out_dir, rows_by_method, table, compute, figures or {})

    write_rows_csv(rows, out_dir / "results.csv")
    results = {"methods": rows, "table": table,
               "paired": {m: {"best": best, "comparisons": c} for m, (best, c) in paired.items()},
               "compute": compute, "cohort": cohort, "tables": {title: {"headers": h, "rows": r} for title, (h, r) in extra_tables.items()},
               "metadata": metadata, "note": note,
               "figures": {name: str(path.relative_to(out_dir)) for name, path in drawn.items()}}
    # Python's json writes NaN / Infinity (as latent.evaluation.scoring does): unscored and unbounded values survive.
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")

    intro = " ".join(filter(None, [note, _case_note(rows_by_method)]))
    markdown = ["# Benchmark report", "", intro, ""]
    page = [f"<h1>Benchmark report</h1><p>{html.escape(intro)}</p>"]
    for title, content in tables.items():
        markdown += [f"## {title}", "", _markdown(content), ""]
        page.append(f"<h2>{html.escape(title)}</h2>{html_table(content)}")
    if drawn:
        markdown += ["## Figures", ""]
        page.append("<h2>Figures</h2>")
    for name, path in drawn.items():
        caption = CAPTIONS.get(name, name.replace("_", " "))
        markdown += [f"![{name}]({path.relative_to(out_dir).as_posix()})", "", f"*{caption}*", ""]
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        page.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(name)}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    markdown += ["## Metadata", ""] + [f"- **{key}**: {value}" for key, value in _metadata_lines(metadata)]
    page.append("<h2>Metadata</h2><ul>" + "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>"
                                                  for k, v in _metadata_lines(metadata)) + "</ul>")
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(markdown) + "\n")
    html_path = out_dir / "report.html"
    html_path.write_text(HTML_TEMPLATE.format(title="Benchmark report", body="\n".join(page)))
    return md_path, html_path


#: Page around a report body (the bench report, ``latent qa``); inline CSS only, so the file stands alone.
HTML_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0;font-size:0.9em}}th,td{{border:1px solid #bbb;padding:3px 8px}}
th{{background:#eee}}td{{text-align:right}}td:first-child{{text-align:left}}img{{max-width:100%}}
figure{{margin:1.5em 0}}</style></head>
<body>
{body}
</body></html>
"""
