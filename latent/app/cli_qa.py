"""CLI verb `latent qa` (registered in latent/app/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from latent.app.cli_common import USER_ERRORS, check_output_folder, report_run, setup_logging, user_error


def qa(
    ctx: typer.Context,
    data: Path = typer.Option(..., help="Data set root (SynthRAD layout)."),
    out: Path = typer.Option(..., help="Output folder: qa.csv, slices.csv, qa.json, qa.html."),
    split_file: Optional[Path] = typer.Option(None, "--split-file", help="Split JSON: review its cases only."),
    split: Optional[str] = typer.Option(None, help="With --split-file: only this split (default every split)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML/JSON of QAConfig fields (docs/qa.md)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Processes describing cases side by side."),
    keep_going: bool = typer.Option(False, "--keep-going", help="Exit 0 even if some cases failed."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Data quality review: per-case descriptors, cohort z-scores, GREEN / YELLOW / RED labels with
    reasons, flagged slices, and an HTML page with overlays of the flagged cases (docs/qa.md)."""
    from latent.app.qa_run import run_qa
    from latent.core.cases import load_splits, read_split
    from latent.core.qa.config import load_qa_config

    setup_logging(quiet)
    try:
        settings = load_qa_config(config)
        check_output_folder(out, "--out")
        pids = None
        if split_file is not None:
            pids = (read_split(split_file, split) if split is not None
                    else [pid for ids in load_splits(split_file).values() for pid in ids])
        outcome = run_qa(data, out, settings, pids=pids, workers=workers, quiet=quiet)
    except USER_ERRORS as error:
        user_error(error, ctx)
    typer.echo(f"wrote {out / 'qa.csv'}, {out / 'slices.csv'}, {out / 'qa.json'} and {out / 'qa.html'}: "
               f"{outcome.counts()} in {outcome.seconds:.1f} s")
    try:
        report_run(outcome.run, keep_going)
    except USER_ERRORS as error:
        user_error(error, ctx)
