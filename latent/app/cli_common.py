"""Helpers shared by the CLI modules: one-line errors, logging set-up, split selection."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import NoReturn, Optional

import typer
from pydantic import ValidationError

from latent.errors import InputError, one_line

#: Errors that end a command with one line on stderr and exit status 2 (no traceback): the
#: project's own input errors (latent/errors.py), a recipe that fails validation, and a path the
#: user gave that is missing or unreadable. Anything else is a bug and keeps its traceback.
USER_ERRORS = (InputError, ValidationError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one error line and exit."""
    text = one_line(Exception(message)) if str(message).strip() else "failed"
    typer.echo(f"error: {text}", err=True)
    raise typer.Exit(code)


def debug_requested(ctx: typer.Context) -> bool:
    """True when ``latent --debug ...`` asked for full tracebacks (kept on the root context)."""
    obj = ctx.find_root().obj
    return bool(isinstance(obj, dict) and obj.get("debug"))


def user_error(error: BaseException, ctx: typer.Context) -> NoReturn:
    """Report an input error on one line (exit 2); with ``--debug`` re-raise it with its traceback."""
    if debug_requested(ctx):
        raise error
    fail(one_line(error))


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


def report_run(run, keep_going: bool = False, manifest: Path | None = None) -> None:
    """End a command that walked cases: one summary line, every skipped and failed case named,
    the outcome written to ``manifest`` (JSON, atomic), exit 1 when a case failed unless
    ``keep_going``."""
    import json
    import os

    typer.echo(run.summary(), err=True)
    for message in run.skipped.values():
        typer.echo(f"skipped: {message}", err=True)
    if manifest is not None:
        manifest.parent.mkdir(parents=True, exist_ok=True)
        temporary = manifest.with_name(f".{manifest.name}.tmp")
        temporary.write_text(json.dumps(run.manifest(), indent=2) + "\n")
        os.replace(temporary, manifest)
    report_failures(run.failures, exit_code=0 if keep_going else 1)


def split_pids(split_file: Optional[Path], split: Optional[str]) -> Optional[list[str]]:
    """Patient ids of one split of a split file (None without a split file)."""
    if split_file is None:
        return None
    from latent.cases import read_split

    return read_split(split_file, split)
