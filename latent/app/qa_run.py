"""``latent qa``: review every case of a data set and write qa.csv, slices.csv, qa.json and qa.html."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from latent.app.qa_report import write_qa_html
from latent.core.atomic import remove_stale_temporaries
from latent.core.qa.case import CaseQA, describe_case
from latent.core.qa.cohort import Cohort, label_cohort
from latent.core.qa.config import QAConfig
from latent.core.qa.tables import write_tables
from latent.core.runner import CaseRun, run_over_cases, select_cases


@dataclass
class QAOutcome:
    """The walk over the cases, the labelled cohort, the files written and the seconds taken."""

    run: CaseRun[CaseQA]
    cohort: Cohort
    written: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0

    def counts(self) -> str:
        """``'GREEN 8, YELLOW 1, RED 1'``."""
        return ", ".join(f"{label} {sum(qa.values.get('label') == label for qa in self.cohort.cases)}"
                         for label in ("GREEN", "YELLOW", "RED"))


def run_qa(data: Path, out: Path, config: QAConfig, pids: list[str] | None = None, workers: int = 1,
           quiet: bool = False) -> QAOutcome:
    """Describe every case (a bad case is a one-line failure), label the cohort and write the outputs.

    Args:
        data: data set root (either SynthRAD layout).
        out: output folder (created).
        config: thresholds (:class:`latent.core.qa.config.QAConfig`).
        pids: only these cases (a split file's); absent ones count as failed.
        workers: processes describing cases side by side.
    """
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    selection = select_cases(data, pids)
    run = run_over_cases(None, partial(describe_case, config=config), "qa", quiet=quiet, selection=selection,
                         workers=workers)
    order = [case.pid for case in selection.cases]
    cohort = label_cohort([run.results[pid] for pid in order if pid in run.results], config)
    written = write_tables(out, cohort, config, run.failures, run.skipped)
    written["qa.html"] = write_qa_html(out / "qa.html", cohort, {case.pid: case for case in selection.cases},
                                       config, run.failures)
    return QAOutcome(run, cohort, written, time.perf_counter() - started)
