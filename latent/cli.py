"""The ``latent`` command line: thin wrappers that parse arguments and call library functions."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from latent.cases import CaseError
from latent.grid import GridError
from latent.io import VolumeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="MR -> synthetic CT in a VAE latent space.")

#: Input errors that end a command with one line on stderr and exit status 2 (no traceback).
USER_ERRORS = (VolumeError, CaseError, GridError, FileNotFoundError, ValueError)


def fail(message: str, code: int = 2) -> None:
    """Print one error line and exit."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)


def _report_failures(failures: dict[str, str]) -> None:
    for message in failures.values():
        typer.echo(f"error: {message}", err=True)
    if failures:
        typer.echo(f"{len(failures)} case(s) failed", err=True)
        raise typer.Exit(1)


def _split_pids(split_file: Optional[Path], split: Optional[str]) -> Optional[list[str]]:
    if split_file is None:
        return None
    from latent.cases import load_splits

    splits = load_splits(split_file)
    if split not in splits:
        raise CaseError(f"{split_file}: no split {split!r} (has {', '.join(splits)})")
    return splits[split]


@app.command()
def phantom(
    out: Path = typer.Option(..., help="Output data set root (Task1/<region>/<pid>/ is written inside)."),
    cases: int = typer.Option(12, min=1, help="Number of cases, spread over regions and centres."),
    regions: str = typer.Option("AB,HN,TH", help="Comma-separated regions."),
    seed: int = typer.Option(0, help="Random seed (same seed, same data)."),
    size: str = typer.Option("small", help="small (fast, demo/tests) or synthrad (1 x 1 x 3 mm, SynthRAD extents)."),
    misregistration: bool = typer.Option(False, help="Small rigid MR/CT misregistration."),
    metal: bool = typer.Option(False, help="Add metal implants to some cases."),
) -> None:
    """Generate a paired MR/CT phantom data set in the SynthRAD2025 layout."""
    from latent.phantom import generate_phantom_dataset

    region_list = [r.strip() for r in regions.split(",") if r.strip()]
    try:
        folders = generate_phantom_dataset(out, cases, region_list, seed=seed, size=size,
                                           misregistration=misregistration, metal=metal)
    except USER_ERRORS as error:
        fail(str(error))
    typer.echo(f"wrote {len(folders)} cases under {out}")


@app.command()
def split(
    data: Path = typer.Option(..., help="Data set root."),
    out: Path = typer.Option(..., help="Split JSON to write."),
    seed: int = typer.Option(0),
    val: float = typer.Option(0.1, help="Validation fraction."),
    test: float = typer.Option(0.2, help="Test fraction."),
) -> None:
    """Deterministic train/val/test split stratified by region and centre."""
    from latent.cases import discover_cases, make_splits, save_splits

    try:
        splits = make_splits(discover_cases(data), (1 - val - test, val, test), seed=seed)
    except USER_ERRORS as error:
        fail(str(error))
    save_splits(splits, out)
    typer.echo(" ".join(f"{name}={len(pids)}" for name, pids in splits.items()))


@app.command()
def predict(
    out: Path = typer.Option(..., help="Prediction folder (<pid>.mha per case)."),
    data: Optional[Path] = typer.Option(None, help="Data set root."),
    method: Optional[str] = typer.Option(None, help="Baseline: water or bulk."),
    split_file: Optional[Path] = typer.Option(None, "--split-file", help="Split JSON."),
    split: str = typer.Option("test", help="Which split to predict when --split-file is given."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Write one sCT per case on the MR's native grid."""
    from latent.predict import predict_baseline

    _setup_logging(quiet)
    if method is None or data is None:
        fail("give --method water|bulk and --data ROOT")
    try:
        pids = _split_pids(split_file, split)
        fit_pids = _split_pids(split_file, "train") if split_file else None
        run = predict_baseline(method, data, out, pids=pids, fit_pids=fit_pids, quiet=quiet)
    except USER_ERRORS as error:
        fail(str(error))
    typer.echo(f"wrote {len(run.results)} predictions to {out}")
    _report_failures(run.failures)


@app.command()
def evaluate(
    pred: Path = typer.Option(..., help="Prediction folder."),
    data: Path = typer.Option(..., help="Data set root with ct.mha and mask.mha per case."),
    out: Optional[Path] = typer.Option(None, help="Per-case CSV to write (a JSON is written beside it)."),
    split_file: Optional[Path] = typer.Option(None, "--split-file", help="Split JSON."),
    split: str = typer.Option("test", help="Which split to score when --split-file is given."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Score predictions with SynthRAD2025 metrics (MAE, PSNR, MS-SSIM) plus SSIM and bone Dice/HD95."""
    from latent.evaluate import evaluate_predictions, format_summary

    _setup_logging(quiet)
    try:
        evaluation = evaluate_predictions(pred, data, out, pids=_split_pids(split_file, split), quiet=quiet)
    except USER_ERRORS as error:
        fail(str(error))
    if evaluation.summary:
        typer.echo(format_summary(evaluation.summary))
    _report_failures(evaluation.run.failures)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_run"), help="Output folder."),
    cases: int = typer.Option(30, min=6, help="Phantom cases."),
    seed: int = typer.Option(0),
) -> None:
    """The main job: phantom data -> baselines -> evaluation, with a report."""
    from latent.demo import DemoConfig, run_demo

    _setup_logging(False)
    run_demo(out, DemoConfig(cases=cases, seed=seed))
    typer.echo(f"wrote {out / 'metrics.csv'} and {out / 'report.md'}")


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
