"""Run one function over many cases: a broken case is reported in one line, the rest go on."""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Callable, Generic, Iterable, TypeVar

from tqdm import tqdm

from latent.core.cases import Case, scan_cases
from latent.core.errors import InputError, user_message

logger = logging.getLogger(__name__)
Result = TypeVar("Result")

#: Exceptions that may mean "this case's input is bad" or "the machine refused" (a full disk, a
#: name too long, out of memory): reported in one line (:func:`latent.core.errors.user_message`), the
#: other cases go on. Anything else, and an OSError of another errno, is a bug and keeps its traceback.
INPUT_ERRORS = (InputError, OSError, MemoryError)


@dataclass
class CaseRun(Generic[Result]):
    """Results per patient id and one-line failures per patient id."""

    results: dict[str, Result] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    #: cases (or case folders) not attempted, with the reason: no MR, no CT to score, not found.
    skipped: dict[str, str] = field(default_factory=dict)
    #: set when Ctrl-C stopped the walk: (cases done, cases planned).
    interrupted: tuple[int, int] | None = None

    @property
    def ok(self) -> bool:
        """True when no case failed."""
        return not self.failures

    def summary(self) -> str:
        """One line: how many cases were found, processed, skipped and failed."""
        found = len(self.results) + len(self.failures) + len(self.skipped)
        return (f"{found} case(s): {len(self.results)} processed, {len(self.skipped)} skipped, "
                f"{len(self.failures)} failed")

    def manifest(self) -> dict:
        """The run's outcome per case, for a JSON manifest."""
        outcome = {"processed": sorted(self.results), "skipped": dict(sorted(self.skipped.items())),
                   "failures": dict(sorted(self.failures.items()))}
        if self.interrupted is not None:
            outcome["interrupted"] = {"done": self.interrupted[0], "planned": self.interrupted[1]}
        return outcome


@dataclass
class Selection:
    """The cases a command works on, the ones it skips and the requested ones that are absent."""

    cases: list[Case]
    #: every usable case of the data folder, selected or not (e.g. to fit a baseline on the others).
    found: list[Case] = field(default_factory=list)
    #: case folders without an MR; with ``need_ct`` / ``need_mask``, cases without that file.
    skipped: dict[str, str] = field(default_factory=dict)
    #: ids asked for (a split file) that the data folder does not hold: counted as failed.
    missing: dict[str, str] = field(default_factory=dict)


def select_cases(root, pids: Iterable[str] | None = None, need_ct: bool = False,
                 need_mask: bool = False) -> Selection:
    """The cases of ``root`` to work on (only ``pids`` when given), with every skip named.

    Every skipped or missing case is logged as a warning; pass the selection to
    :func:`run_over_cases` so that they reach the run's summary and manifest.
    """
    scan = scan_cases(root)
    selection = Selection(scan.cases, list(scan.cases), dict(scan.skipped))
    if pids is not None:
        wanted = list(dict.fromkeys(pids))
        present = {case.pid for case in scan.cases}
        selection.missing = {pid: f"{pid}: asked for, but not in {root}" for pid in wanted if pid not in present}
        selection.cases = [case for case in scan.cases if case.pid in set(wanted)]
    for role, needed in (("ct", need_ct), ("mask", need_mask)):
        if needed:
            selection.skipped.update({case.pid: f"{case.pid}: no {role} file in {case.folder}"
                                      for case in selection.cases if getattr(case, role) is None})
            selection.cases = [case for case in selection.cases if getattr(case, role) is not None]
    for message in (*selection.skipped.values(), *selection.missing.values()):
        logger.warning("skipped %s", message)
    return selection


def default_workers() -> int:
    """Worker processes used by default: the CPU cores, at most 2 (the reference machine)."""
    return max(1, min(2, os.cpu_count() or 1))


def _record(run: CaseRun, case: Case, attempt: Callable[[], Result]) -> None:
    try:
        run.results[case.pid] = attempt()
    except INPUT_ERRORS as error:
        message = user_message(error)
        if message is None:
            raise
        if case.pid not in message:
            message = f"{case.pid}: {message}"
        run.failures[case.pid] = message
        logger.error(message)


def _pool(workers: int) -> ProcessPoolExecutor:
    # Fresh interpreters from a fork server (spawn where there is none): never a fork of a
    # process whose OpenMP / torch thread pools already run.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))


def run_over_cases(
    cases: Iterable[Case] | None,
    work: Callable[[Case], Result],
    description: str,
    quiet: bool = False,
    selection: Selection | None = None,
    workers: int = 1,
) -> CaseRun[Result]:
    """Call ``work(case)`` for every case, collecting results and one-line input errors.

    With ``selection`` (from :func:`select_cases`; then ``cases`` may be None) its skipped
    cases are carried into the run and its missing ones count as failed. Errors that are not
    input errors (bugs) propagate with their traceback. ``workers`` > 1 runs the cases in that
    many processes (``work`` must then be picklable: a module-level function or a partial of
    one); results and failures are the same as with one worker, recorded in case order.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if selection is not None:
        cases = selection.cases if cases is None else cases
        run: CaseRun[Result] = CaseRun(failures=dict(selection.missing), skipped=dict(selection.skipped))
    else:
        run = CaseRun()
    cases = list(cases)
    if workers == 1 or len(cases) < 2:
        for done, case in enumerate(tqdm(cases, desc=description, unit="case", disable=quiet, leave=False)):
            try:
                _record(run, case, lambda case=case: work(case))
            except KeyboardInterrupt:
                # Ctrl-C: stop here; the caller writes the summary of the cases done.
                run.interrupted = (done, len(cases))
                break
        return run
    try:
        with _pool(min(workers, len(cases))) as pool:
            futures: list[Future] = [pool.submit(work, case) for case in cases]
            for _ in tqdm(as_completed(futures), total=len(futures), desc=description, unit="case",
                          disable=quiet, leave=False):
                pass
            for case, future in zip(cases, futures):
                _record(run, case, future.result)
    except BrokenProcessPool as error:
        # A worker problem costs time, never a result: the cases not yet recorded run here.
        logger.warning("%s: worker pool broke (%s); running the remaining cases in this process", description, error)
        for case in cases:
            if case.pid not in run.results and case.pid not in run.failures:
                _record(run, case, lambda case=case: work(case))
    return run
