"""Run one function over many cases: a broken case is reported in one line, the rest go on."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Generic, Iterable, TypeVar

from tqdm import tqdm

from latent.cases import Case, CaseError
from latent.io import VolumeError

logger = logging.getLogger(__name__)
Result = TypeVar("Result")

#: Exceptions that mean "this input is bad", reported without a traceback.
INPUT_ERRORS = (VolumeError, CaseError, ValueError, FileNotFoundError)


@dataclass
class CaseRun(Generic[Result]):
    """Results per patient id and one-line failures per patient id."""

    results: dict[str, Result] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no case failed."""
        return not self.failures


def run_over_cases(
    cases: Iterable[Case],
    work: Callable[[Case], Result],
    description: str,
    quiet: bool = False,
) -> CaseRun[Result]:
    """Call ``work(case)`` for every case, collecting results and one-line input errors.

    Errors that are not input errors (bugs) propagate with their traceback.
    """
    run: CaseRun[Result] = CaseRun()
    cases = list(cases)
    for case in tqdm(cases, desc=description, unit="case", disable=quiet, leave=False):
        try:
            run.results[case.pid] = work(case)
        except INPUT_ERRORS as error:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            if case.pid not in message:
                message = f"{case.pid}: {message}"
            run.failures[case.pid] = message
            logger.error(message)
    return run
