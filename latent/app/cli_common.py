"""Helpers shared by the CLI modules: one-line errors, logging set-up, split selection."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from latent.cases import CaseError
from latent.grid import GridError
from latent.io import VolumeError

#: Input errors that end a command with one line on stderr and exit status 2 (no traceback).
USER_ERRORS = (VolumeError, CaseError, GridError, FileNotFoundError, ValueError, KeyError, LookupError)


def fail(message: str, code: int = 2) -> None:
    """Print one error line and exit."""
    first_line = str(message).strip().splitlines()[0] if str(message).strip() else "failed"
    typer.echo(f"error: {first_line}", err=True)
    raise typer.Exit(code)


def setup_logging(quiet: bool) -> None:
    """INFO to stderr, or WARNING with ``--quiet``."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    # Library chatter (checkpoint saves, per-case phantom timings) stays out of the user's way.
    for name in ("accelerate", "latent.phantom"):
        logging.getLogger(name).setLevel(logging.WARNING)


def report_failures(failures: dict[str, str], exit_code: int = 1) -> None:
    """Print each case failure on one line; exit non-zero when there were any."""
    for message in failures.values():
        typer.echo(f"error: {message}", err=True)
    if failures:
        typer.echo(f"{len(failures)} case(s) failed", err=True)
        raise typer.Exit(exit_code)


def split_pids(split_file: Optional[Path], split: Optional[str]) -> Optional[list[str]]:
    """Patient ids of one split of a split file (None without a split file)."""
    if split_file is None:
        return None
    from latent.cases import load_splits

    splits = load_splits(split_file)
    if split not in splits:
        raise CaseError(f"{split_file}: no split {split!r} (has {', '.join(splits)})")
    return splits[split]
