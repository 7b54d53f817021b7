"""CLI verb `latent evaluate` (registered in latent/app/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from latent.app.cli_common import USER_ERRORS, report_run, setup_logging, split_pids, user_error


def evaluate(
    ctx: typer.Context,
    pred: Path = typer.Option(..., help="Prediction folder (with predict_manifest.json: only the cases it lists are scored)."),
    data: Path = typer.Option(..., help="Data set root with ct.mha and mask.mha per case."),
    out: Optional[Path] = typer.Option(None, help="Per-case CSV to write (a JSON is written beside it)."),
    split_file: Optional[Path] = typer.Option(None, "--split-file", help="Split JSON."),
    split: str = typer.Option("test", help="Which split to score when --split-file is given."),
    keep_going: bool = typer.Option(False, "--keep-going", help="Exit 0 even if some cases failed."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1,
                                          help="Processes scoring cases side by side (default: the CPU cores up to 2 for "
                                               "SynthRAD-size cases, 1 for small ones)."),
    structb_grid: Optional[str] = typer.Option(None, "--structb-grid",
                                               help="Common grid of the structural bias: a fixed-shape grid spec "
                                                    "or preset (default synthrad-3mm; docs/metrics.md)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or log lines."),
) -> None:
    """Score predictions with SynthRAD2025 metrics (MAE, PSNR, MS-SSIM) plus SSIM and bone Dice/HD95,
    and per region the structural bias of bone and body (StructB)."""
    from latent.evaluation.case_uncertainty import format_case_uncertainty
    from latent.evaluation.scoring import evaluate_predictions, format_summary
    from latent.evaluation.structb import STRUCTB_GRID, format_structb

    setup_logging(quiet)
    try:
        evaluation = evaluate_predictions(pred, data, out, pids=split_pids(split_file, split), quiet=quiet,
                                          workers=workers, structb=structb_grid or STRUCTB_GRID)
    except USER_ERRORS as error:
        user_error(error, ctx)
    if evaluation.summary:
        typer.echo(format_summary(evaluation.summary))
    if evaluation.structural_bias and evaluation.structural_bias["regions"]:
        typer.echo(format_structb(evaluation.structural_bias))
    if evaluation.case_uncertainty:
        typer.echo(format_case_uncertainty(evaluation.case_uncertainty))
    if evaluation.unlisted:
        typer.echo(evaluation.unlisted_line(), err=True)
    report_run(evaluation.run, keep_going)
