"""The baselines as predictors (:mod:`latent.decode.predictors`): ``water`` (0 HU in the body,
-1000 HU outside) and ``bulk`` (one HU per MR intensity class, fitted on cases with a CT)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

import numpy as np

from latent.core.atomic import write_text_atomic
from latent.core.baselines import BulkModel, fit_bulk_model, water_sct
from latent.core.cases import Case
from latent.decode.predictors import NativePrediction
from latent.core.errors import InputError, one_line
from latent.core.prepare import read_native
from latent.core.runner import Selection

BaselineMethod = Literal["water", "bulk"]
BASELINES = ("water", "bulk")
logger = logging.getLogger(__name__)


@dataclass
class BaselinePredictor:
    """``water``, or ``bulk`` with its fitted class values."""

    bulk: BulkModel | None = None

    @property
    def label(self) -> str:
        return "predict water" if self.bulk is None else "predict bulk"

    def predict(self, case: Case) -> NativePrediction:
        mr, mask, _, properties = read_native(case, with_ct=False)
        hu = water_sct(mask) if self.bulk is None else self.bulk.predict(mr, mask)
        return NativePrediction(np.asarray(hu, dtype=np.float32), properties)


def fit_bulk_on_cases(cases: Iterable[Case]) -> BulkModel:
    """Fit the bulk model's class HU on cases that have a CT (others are skipped with a warning)."""
    pairs = []
    for case in cases:
        if case.ct is None:
            logger.warning("bulk fit: skipped %s (no ct)", case.pid)
            continue
        try:
            mr, mask, ct, _ = read_native(case)
        except (InputError, FileNotFoundError) as error:
            logger.warning("bulk fit: skipped %s (%s)", case.pid, one_line(error))
            continue
        pairs.append((case.pid, mr, ct, mask))
    return fit_bulk_model(pairs)


def baseline_predictor(method: BaselineMethod, selection: Selection, fit_pids: Iterable[str] | None = None,
                       record_dir: str | os.PathLike | None = None) -> BaselinePredictor:
    """The predictor of ``method`` for the cases of ``selection``.

    Args:
        fit_pids: cases whose CT fits the bulk class values (default: every case with a CT that
            is not being predicted; all cases with a CT if that leaves none).
        record_dir: where ``bulk_model.json`` (the fitted thresholds and class HU) is written.
    """
    if method not in BASELINES:
        raise ValueError(f"unknown baseline method {method!r}; choose water or bulk")
    if method == "water":
        return BaselinePredictor()
    if fit_pids is not None:
        wanted = set(fit_pids)
        fit_cases = [case for case in selection.found if case.pid in wanted]
    else:
        targets = {case.pid for case in selection.cases}
        fit_cases = [case for case in selection.found if case.pid not in targets] or selection.found
    model = fit_bulk_on_cases(fit_cases)
    if record_dir is not None:
        write_text_atomic(Path(record_dir) / "bulk_model.json", json.dumps({
            "thresholds": model.thresholds, "class_hu": model.class_hu,
            "classes": ["dark (air or cortical bone)", "intermediate (soft tissue)", "bright (fat, marrow)"],
            "fitted_on": model.fitted_on,
        }, indent=2) + "\n")
    return BaselinePredictor(model)
