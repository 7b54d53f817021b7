"""CLI verbs that shape the data set before any training: `latent split` (with `latent qa`'s labels)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import typer

from latent.app.cli_common import USER_ERRORS, user_error
from latent.core.errors import BadFileError

#: Labels ``--exclude`` accepts, in the order ``latent qa`` grades them.
QA_LABELS = ("RED", "YELLOW")


def qa_labels(folder: Path) -> dict[str, str]:
    """``{pid: label}`` of ``latent qa``'s ``qa.csv`` in ``folder``.

    Raises:
        BadFileError: no ``qa.csv`` there, or one without the ``pid`` and ``label`` columns.
    """
    path = folder / "qa.csv"
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as error:
        raise BadFileError(f"--qa {folder}: {path.name} cannot be read ({error.strerror}); run latent qa first") from None
    if rows and not {"pid", "label"} <= set(rows[0]):
        raise BadFileError(f"--qa {path}: expected the columns pid and label of latent qa's qa.csv")
    return {row["pid"]: row["label"] for row in rows}


def parse_exclude(text: str) -> tuple[str, ...]:
    """``red`` or ``red,yellow`` -> the labels kept out of training.

    Raises:
        typer.BadParameter: a label ``latent qa`` does not give.
    """
    labels = tuple(label.strip().upper() for label in text.split(",") if label.strip())
    unknown = [label for label in labels if label not in QA_LABELS]
    if unknown or not labels:
        raise typer.BadParameter(f"{text!r}: expected red or red,yellow")
    return labels


def split(
    ctx: typer.Context,
    data: Path = typer.Option(..., help="Data set root."),
    out: Path = typer.Option(..., help="Split JSON to write."),
    seed: int = typer.Option(0),
    val: float = typer.Option(0.1, help="Validation fraction."),
    test: float = typer.Option(0.2, help="Test fraction."),
    qa: Optional[Path] = typer.Option(None, "--qa", help=(
        "A `latent qa` output folder: its cases labelled --exclude leave train and val for the list "
        "qa_excluded (the test split is always kept whole).")),
    exclude: str = typer.Option("red", help="With --qa: red, or red,yellow."),
) -> None:
    """Deterministic train/val/test split stratified by region and centre."""
    from latent.core.cases import QA_EXCLUDED, discover_cases, exclude_by_label, make_splits, save_splits

    try:
        splits = make_splits(discover_cases(data), (1 - val - test, val, test), seed=seed)
        if qa is not None:
            splits = exclude_by_label(splits, qa_labels(qa), parse_exclude(exclude))
            for pid in splits[QA_EXCLUDED]:
                typer.echo(f"kept out of training by latent qa: {pid}", err=True)
    except USER_ERRORS as error:
        user_error(error, ctx)
    save_splits(splits, out)
    typer.echo(" ".join(f"{name}={len(pids)}" for name, pids in splits.items()))
