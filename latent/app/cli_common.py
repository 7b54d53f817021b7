"""Helpers shared by the CLI modules: one-line errors, logging set-up, split selection."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import NoReturn, Optional

import typer
from pydantic import ValidationError

from latent.core.atomic import write_text_atomic
from latent.core.errors import BadFileError, InputError, one_line, user_message

#: Errors that may end a command with one line on stderr and exit status 2 (no traceback): the
#: project's own input errors (latent/core/errors.py), a recipe that fails validation, and what the
#: machine refuses (a full disk, a read-only or non-folder target, a name too long, out of
#: memory; :func:`latent.core.errors.user_message` decides). Anything else is a bug and keeps its traceback.
USER_ERRORS = (InputError, ValidationError, OSError, MemoryError)
#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED_EXIT = 130


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
    """Report an input or environment error on one line (exit 2); with ``--debug``, or when it is
    a bug (:func:`latent.core.errors.user_message` has no line for it), re-raise it with its traceback."""
    message = user_message(error)
    if message is None or debug_requested(ctx):
        raise error
    fail(message)


def check_output_folder(path: Path, option: str) -> Path:
    """Refuse an output folder that is an existing file, or that cannot be written (read-only).

    Raises:
        BadFileError: naming the option and the path.
    """
    import os

    if path.exists() and not path.is_dir():
        raise BadFileError(f"{option} {path}: exists and is a file, not a folder")
    existing = next((parent for parent in (path, *path.parents) if parent.exists()), None)
    if existing is not None and not existing.is_dir():
        raise BadFileError(f"{option} {path}: {existing} is a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise BadFileError(f"{option} {path}: {existing} is not writable (read-only or no permission)")
    return path


def report_interrupted(done: int, planned: int, summary: Path | None) -> NoReturn:
    """After Ctrl-C: one line (cases done, where the summary is) and exit status 130."""
    where = f"; summary in {summary}" if summary is not None else ""
    typer.echo(f"interrupted: {done} of {planned} case(s) done{where}; rerun to continue", err=True)
    raise typer.Exit(INTERRUPTED_EXIT)


def setup_logging(quiet: bool) -> None:
    """INFO to stderr, or WARNING with ``--quiet``."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    # Library chatter (checkpoint saves, per-case phantom timings) stays out of the user's way.
    for name in ("accelerate", "latent.core.phantom.generate"):
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

    typer.echo(run.summary(), err=True)
    for message in run.skipped.values():
        typer.echo(f"skipped: {message}", err=True)
    if manifest is not None:
        write_text_atomic(manifest, json.dumps(run.manifest(), indent=2) + "\n")
    if run.interrupted is not None:
        report_interrupted(*run.interrupted, manifest)
    report_failures(run.failures, exit_code=0 if keep_going else 1)


def split_pids(split_file: Optional[Path], split: Optional[str]) -> Optional[list[str]]:
    """Patient ids of one split of a split file (None without a split file)."""
    if split_file is None:
        return None
    from latent.core.cases import read_split

    return read_split(split_file, split)
