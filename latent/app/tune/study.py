"""The Optuna study of ``latent tune``: its storage, sampler and pruner, joining and resuming it,
and how many trials are left.

The study lives in Optuna's own storage: ``sqlite:///<out>/study.db`` by default, any database URL
Optuna accepts otherwise (several processes or machines on one URL share the study). A trial that
was RUNNING when its process died is marked FAILED with the reason ``interrupted`` by ``--resume``;
the trials still to run are the target minus the complete, pruned and failed-not-interrupted ones,
so nothing is counted twice.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from latent.core.errors import BadConfigError, BadFileError, one_line

#: File of the default storage inside the output folder.
STUDY_FILE = "study.db"
#: The reason recorded on a trial whose process died (or was stopped) while it ran.
INTERRUPTED = "interrupted"
#: Seconds a process waits for another one's lock on a SQLite study before giving up.
SQLITE_TIMEOUT_S = 60
PRUNERS = ("median", "hyperband", "none")
#: Tries at opening a new storage: two processes starting on one fresh database race to create its tables.
CREATE_ATTEMPTS = 5


def default_storage(out: Path) -> str:
    """The SQLite URL of the study file in ``out``."""
    return f"sqlite:///{(Path(out) / STUDY_FILE).resolve()}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Optuna's storage at ``url`` (SQLite waits :data:`SQLITE_TIMEOUT_S` for another process's lock).

    Raises:
        BadConfigError: the URL cannot be opened (no driver, unknown scheme, unreachable, no folder).
    """
    engine = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else None
    for attempt in range(CREATE_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine)
        except Exception as error:  # noqa: BLE001 - sqlalchemy / driver errors of every kind: the URL is the problem
            if creation_race(error) and attempt + 1 < CREATE_ATTEMPTS:
                time.sleep(0.2 * (attempt + 1))  # another process created the schema between check and create
                continue
            raise BadConfigError(f"--storage {redact(url)}: cannot be opened ({type(error).__name__}: "
                                 f"{one_line(error).split('(Background on this error')[0].rstrip('; ')})") from None
    raise AssertionError("unreachable: the last attempt returns or raises")


def creation_race(error: Exception) -> bool:
    """True for the errors of two processes creating one new database's schema at once."""
    text = str(error)
    return any(sign in text for sign in ("already exists", "UNIQUE constraint failed", "database is locked"))


def redact(url: str) -> str:
    """The URL without its password (recorded in tune.json, printed in errors)."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        credentials, _, host = rest.rpartition("@")
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """``median`` (below the median of earlier trials at the same step), ``hyperband`` or ``none``."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise BadConfigError(f"--pruner {name}: choose one of {', '.join(PRUNERS)}")


def make_sampler(seed: int, trials: int) -> optuna.samplers.TPESampler:
    """Seeded TPE; a third of the trials (at least 2, at most 10) sample at random first."""
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, trials // 3)), constant_liar=True)


def study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    """Names of the studies the storage holds."""
    return [summary.study_name for summary in optuna.get_all_study_summaries(storage, include_best_trial=False)]


def open_study(storage: optuna.storages.BaseStorage, name: str, *, sampler: Any, pruner: Any, resume: bool,
               refuse_existing: str | None, record: dict[str, Any]) -> optuna.Study:
    """Create the study, or load it (``resume``, or joining one on a shared storage).

    Args:
        refuse_existing: without ``resume``, an existing study of that name is refused with this
            text (the default storage in ``--out``); None joins it (a shared ``--storage``).
        record: the recipe, overrides and space: stored with a new study, compared with a loaded one.

    Raises:
        BadFileError: ``--resume`` with no such study; an existing study without ``--resume``.
        BadConfigError: the loaded study was made with another search space.
    """
    exists = name in study_names(storage)
    if resume and not exists:
        raise BadFileError(f"--resume: no study {name!r} in {storage_label(storage)} to continue")
    if exists and not resume and refuse_existing is not None:
        raise BadFileError(refuse_existing)
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner,
                                direction="minimize", load_if_exists=True)
    stored = study.user_attrs.get("space")
    if stored is None:
        for key, value in record.items():
            study.set_user_attr(key, value)
    elif stored != record["space"]:
        raise BadConfigError(f"--space: the study {name!r} was made with another search space "
                             f"({sorted(stored)}); use the same space file, or another --study name")
    return study


def storage_label(storage: optuna.storages.BaseStorage) -> str:
    """Where a storage is, for messages."""
    url = getattr(getattr(storage, "engine", None), "url", None)
    return redact(url.render_as_string(hide_password=False)) if url is not None else type(storage).__name__


def mark_interrupted(study: optuna.Study, storage: optuna.storages.BaseStorage) -> list[int]:
    """Mark every RUNNING trial FAILED with the reason ``interrupted``; their numbers."""
    marked = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_user_attr(trial._trial_id, "reason", INTERRUPTED)  # noqa: SLF001 - Optuna's own id
        study.tell(trial.number, state=TrialState.FAIL)
        marked.append(trial.number)
    return marked


def counted_trials(study: optuna.Study) -> int:
    """Trials that count against the target: complete, pruned, and failed for another reason than
    an interruption (an interrupted trial is run again as a new one)."""
    count = 0
    for trial in study.get_trials(deepcopy=False):
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            count += 1
        elif trial.state == TrialState.FAIL and trial.user_attrs.get("reason") != INTERRUPTED:
            count += 1
    return count


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The complete trial with the lowest value, or None."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return min(complete, key=lambda t: t.value) if complete else None
