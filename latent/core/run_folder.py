"""What a run folder may hold, when a new run may write into it, and whether a checkpoint can be resumed.

Finished work is never overwritten (README, error contract): a fresh run refuses a folder that holds
a model or a run record (:data:`RUN_RECORDS`) unless ``overwrite`` is given, in which case those
entries, and only those, are removed just before the new run writes its own. A resume reads every
file of its checkpoint before anything is written: a truncated weight or optimiser file, or an
unreadable ``trainer_state.json``, stops it with one line; an unreadable random state is an error
too unless the caller accepts an inexact resume (``--resume-inexact``), which is then logged as a
warning.
"""

from __future__ import annotations

import json
import logging
import shutil
import zipfile
from pathlib import Path

from latent.core.errors import BadConfigError, BadFileError

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"
#: Entries of a run folder that belong to a run (translation runs, the VAE fit, adapted decoders):
#: a fresh run refuses a folder holding any of them; ``--overwrite`` removes exactly these.
RUN_RECORDS = ("best", "final", "model.safetensors", "config.json", "config.yaml", "producer.json", "metrics.jsonl",
               "validation.json", TRAINER_STATE, CHECKPOINT_DIR, "checkpoint", "fit_config.json",
               "training_grid.json", "tensorboard")
#: Accelerate's random-state file of each process (``random_states_<i>.pkl``).
RANDOM_STATES = "random_states_{}.pkl"


class RunExistsError(BadFileError, FileExistsError):
    """A fresh run would overwrite a run folder that holds a model or a run record."""


class NoCheckpointError(BadFileError, FileNotFoundError):
    """The folder named to resume from holds no complete checkpoint."""


class DamagedCheckpointError(BadFileError):
    """A checkpoint file cannot be read: the run cannot continue from it."""


def run_records(run_dir: Path) -> list[str]:
    """The :data:`RUN_RECORDS` present in ``run_dir`` (folders with a trailing ``/``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return [name + ("/" if (run_dir / name).is_dir() else "") for name in RUN_RECORDS if (run_dir / name).exists()]


def refuse_finished_run(run_dir: Path, *, overwrite: bool) -> None:
    """Raise unless ``run_dir`` holds no run (or ``overwrite`` allows replacing it).

    Raises:
        RunExistsError: naming the folder and what it holds.
    """
    found = run_records(run_dir)
    if found and not overwrite:
        raise RunExistsError(f"{run_dir}: already holds a run ({', '.join(found)}): resume it (--resume), "
                             "choose another folder, or pass --overwrite to replace it")


def clear_run_records(run_dir: Path) -> list[str]:
    """Remove the :data:`RUN_RECORDS` of ``run_dir`` (``--overwrite``); other files stay. Returns what went."""
    removed = run_records(run_dir)
    for name in removed:
        path = Path(run_dir) / name.rstrip("/")
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if removed:
        logger.warning("%s: --overwrite: removed the earlier run's %s", run_dir, ", ".join(removed))
    return removed


def check_resume_flags(resume: bool | str, overwrite: bool) -> None:
    """``--resume`` continues a run and ``--overwrite`` replaces it: never both."""
    if resume and overwrite:
        raise BadConfigError("--resume and --overwrite exclude each other: continue the run or replace it")


def read_trainer_state(checkpoint: Path) -> dict:
    """``trainer_state.json`` of a checkpoint as a dict.

    Raises:
        DamagedCheckpointError: missing, not JSON, or without an integer ``step``.
    """
    path = Path(checkpoint) / TRAINER_STATE
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = error.msg if isinstance(error, json.JSONDecodeError) else type(error).__name__
        raise DamagedCheckpointError(f"{path}: not a readable trainer state ({reason}); "
                                     "the checkpoint cannot be resumed") from None
    if not isinstance(values, dict) or not isinstance(values.get("step"), int):
        raise DamagedCheckpointError(f"{path}: not a trainer state (no integer 'step'); "
                                     "the checkpoint cannot be resumed")
    return values


def file_problem(path: Path) -> str | None:
    """Why a checkpoint file cannot be loaded (None when it reads whole).

    ``.safetensors``: the header parses and the file is as long as the header says. ``.bin`` /
    ``.pkl`` / ``.pt`` (``torch.save`` zip archives): every member's CRC checks.
    """
    try:
        if path.suffix == ".safetensors":
            with path.open("rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(size))
            end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
            actual = path.stat().st_size
            needed = 8 + size + end
            return None if actual == needed else f"truncated ({actual} bytes, the header needs {needed})"
        if path.suffix in (".bin", ".pkl", ".pt", ".pth"):
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            return None if bad is None else f"damaged member {bad}"
    except (OSError, ValueError, KeyError, TypeError, IndexError, zipfile.BadZipFile) as error:
        if isinstance(error, zipfile.BadZipFile):
            return "truncated or damaged"
        return f"not readable ({type(error).__name__})"
    return None


def validate_checkpoint(checkpoint: Path, *, inexact: bool = False) -> None:
    """Read every file of ``checkpoint`` before a resume writes anything.

    Args:
        checkpoint: a ``checkpoints/step_NNNNNNN`` folder.
        inexact: accept unreadable or missing random-state files (warned: the resume is not exact).

    Raises:
        DamagedCheckpointError: the trainer state, a weight/optimiser file or (unless ``inexact``)
            a random state cannot be read; the message names the file.
    """
    checkpoint = Path(checkpoint)
    state = read_trainer_state(checkpoint)
    files = sorted(path for path in checkpoint.rglob("*") if path.is_file() and path.name != TRAINER_STATE)
    if not any(path.suffix in (".safetensors", ".bin") for path in files):
        raise DamagedCheckpointError(f"{checkpoint}: no weight or optimiser file; the checkpoint cannot be resumed")
    random_states = {checkpoint / RANDOM_STATES.format(i) for i in range(int(state.get("num_processes", 1)))}
    for path in files:
        problem = file_problem(path)
        if problem is not None and path not in random_states:
            raise DamagedCheckpointError(f"{path}: {problem}; the checkpoint cannot be resumed")
    for path in sorted(random_states):
        problem = "missing" if not path.is_file() else file_problem(path)
        if problem is None:
            continue
        if not inexact:
            raise DamagedCheckpointError(f"{path}: random state {problem}: the resume would not be exact; "
                                         "pass --resume-inexact to continue anyway")
        logger.warning("%s: random state %s: the resume is NOT exact (losses will differ from an uninterrupted run)",
                       path, problem)
