"""One predictor per kind of method, one loop over cases, one writer.

Every method ``latent predict``, the demo and ``latent bench`` run is an object with
``predict(case) -> NativePrediction`` (:class:`Predictor`): the baselines (water, bulk:
:mod:`latent.decode.baseline_predict`), the grid floors (:mod:`latent.decode.grid_floor`), and a
trained run, an ensemble of runs or the VAE floor (:mod:`latent.decode.run_predictor`).
:func:`predict_cases` walks the cases, calls the predictor and writes each result with
:func:`latent.decode.writers.write_prediction` (every ``--format``), plus ``timings.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

import numpy as np

from latent.core.atomic import write_text_atomic
from latent.core.cases import Case
from latent.decode.writers import write_prediction
from latent.core.io import VolumeProperties
from latent.core.runner import CaseRun, Selection, run_over_cases


@dataclass
class NativePrediction:
    """One case's sCT on its native grid (HU), its std map (samples, flips, members) and seconds."""

    hu: np.ndarray
    properties: VolumeProperties
    std: np.ndarray | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    #: Share of the body the canonical grid cut off (kept only with ``allow_truncation``).
    outside_fraction: float = 0.0


class Predictor(Protocol):
    """A method: ``predict(case)`` for one case; ``label`` names it in progress bars."""

    label: str

    def predict(self, case: Case) -> NativePrediction:
        ...


#: Writes one case's prediction and returns the written path.
Writer = Callable[[Case, NativePrediction], Path]


def folder_writer(out_dir: str | os.PathLike, fmt: str = "mha") -> Writer:
    """``out_dir/<pid>.<fmt>`` (a DICOM series folder ``out_dir/<pid>/``) and ``<pid>_std`` beside it."""
    return lambda case, prediction: write_prediction(out_dir, case.pid, prediction.hu, prediction.properties,
                                                     std=prediction.std, fmt=fmt)


def predict_cases(predictor: Predictor, cases: Iterable[Case] | None, writer: Writer,
                  selection: Selection | None = None, timings: Path | None = None,
                  quiet: bool = False) -> CaseRun[Path]:
    """Predict and write every case; a case's input error is its one-line failure, the others go on.

    Args:
        cases: the cases (or None with ``selection``, whose skipped and missing cases are carried).
        timings: where to write ``timings.json`` (seconds per stage and case, mean seconds, failures,
            body share outside the grid) when the predictor times its stages; None writes none (a
            Grand Challenge output folder).
    """
    seconds: dict[str, dict[str, float]] = {}
    outside: dict[str, float] = {}

    def work(case: Case) -> Path:
        prediction = predictor.predict(case)
        seconds[case.pid] = prediction.seconds
        if prediction.outside_fraction > 0:
            outside[case.pid] = prediction.outside_fraction
        return writer(case, prediction)

    run = run_over_cases(cases, work, predictor.label, quiet, selection=selection)
    if timings is not None and any(seconds.values()):  # methods that time their stages (trained runs, VAE floor)
        stages = sorted({stage for values in seconds.values() for stage in values})
        mean = {stage: float(np.mean([values.get(stage, 0.0) for values in seconds.values()])) for stage in stages}
        write_text_atomic(timings, json.dumps({"cases": seconds, "mean_seconds": mean, "failures": run.failures,
                                               "body_outside_fraction": dict(sorted(outside.items()))},
                                              indent=2) + "\n")
    return run
