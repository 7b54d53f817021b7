"""`latent demo`: the main job on the embedded phantom data, end to end, with a report.

Stages (each writes under ``out``): phantom data -> split -> baselines -> evaluation, and the
comparison table in ``metrics.csv`` + ``report.md``.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from latent.cases import discover_cases, make_splits, save_splits
from latent.evaluate import METRIC_COLUMNS, evaluate_predictions, format_summary, summarise, write_rows_csv

logger = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Size of the demo: phantom cases and seed."""

    cases: int = 30
    seed: int = 0
    regions: tuple[str, ...] = ("AB", "HN", "TH")
    size: str = "small"


@dataclass
class MethodResult:
    """One method's evaluation on the test split plus its compute."""

    name: str
    rows: list[dict]
    seconds_per_volume: float
    train_seconds: float = 0.0
    notes: str = ""
    extra: dict = field(default_factory=dict)


def _baseline_results(data: Path, out: Path, splits: dict[str, list[str]]) -> list[MethodResult]:
    from latent.predict import predict_baseline

    results = []
    for method in ("water", "bulk"):
        started = time.perf_counter()
        run = predict_baseline(method, data, out / "predictions" / method, pids=splits["test"],
                               fit_pids=splits["train"], quiet=True)
        seconds = (time.perf_counter() - started) / max(1, len(run.results))
        evaluation = evaluate_predictions(out / "predictions" / method, data, out / "scores" / f"{method}.csv",
                                          pids=splits["test"], quiet=True)
        results.append(MethodResult(method, evaluation.rows, seconds))
    return results


def comparison_rows(results: list[MethodResult]) -> list[dict]:
    """One row per method: mean metrics over the test split and compute columns."""
    rows = []
    for result in results:
        overall = summarise(result.rows)[-1] if result.rows else {}
        row = {"method": result.name, "n": overall.get("n", 0)}
        for column in METRIC_COLUMNS:
            row[column] = overall.get(column, float("nan"))
            row[f"{column}_std"] = overall.get(f"{column}_std", float("nan"))
        row.update({"train_seconds": result.train_seconds, "seconds_per_volume": result.seconds_per_volume})
        row.update(result.extra)
        rows.append(row)
    return rows


def format_comparison(rows: list[dict]) -> str:
    """Markdown table of :func:`comparison_rows`."""
    header = "| method | n | MAE (HU) | PSNR (dB) | MS-SSIM | SSIM | bone Dice | bone HD95 (mm) | train s | s/volume |"
    lines = [header, "|" + "---|" * 10]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['n']} | {row['mae']:.1f} +- {row['mae_std']:.1f} | {row['psnr']:.2f} | "
            f"{row['ms_ssim']:.4f} | {row['ssim']:.4f} | {row['bone_dice']:.3f} | {row['bone_hd95']:.2f} | "
            f"{row['train_seconds']:.0f} | {row['seconds_per_volume']:.2f} |"
        )
    return "\n".join(lines)


def run_demo(out: str | Path, config: DemoConfig | None = None) -> list[dict]:
    """Run the demo; return the comparison rows (also written to ``out/metrics.csv``)."""
    from latent.phantom import generate_phantom_dataset

    config = config or DemoConfig()
    out = Path(out)
    data = out / "data"
    started = time.perf_counter()
    if data.exists():
        shutil.rmtree(data)
    generate_phantom_dataset(data, config.cases, list(config.regions), seed=config.seed, size=config.size)
    cases = discover_cases(data)
    splits = make_splits(cases, seed=config.seed)
    save_splits(splits, out / "splits.json")
    logger.info("phantom: %d cases (%s)", len(cases), ", ".join(f"{k} {len(v)}" for k, v in splits.items()))

    results = _baseline_results(data, out, splits)

    rows = comparison_rows(results)
    write_rows_csv(rows, out / "metrics.csv")
    table = format_comparison(rows)
    per_region = "\n\n".join(f"### {r.name}\n\n{format_summary(summarise(r.rows))}" for r in results if r.rows)
    report = (
        "# Demo report (phantom data)\n\n"
        f"{len(cases)} phantom cases, split {', '.join(f'{k} {len(v)}' for k, v in splits.items())}; "
        f"scored on the test split with the SynthRAD2025 metrics inside the body mask.\n"
        "These are phantom numbers: they say nothing about accuracy on real patients.\n\n"
        f"{table}\n\n## Per region\n\n{per_region}\n\n"
        f"Total demo time: {time.perf_counter() - started:.0f} s.\n"
    )
    (out / "report.md").write_text(report)
    print(table)
    return rows
