"""`latent predict --method water|bulk`: one sCT per case on the MR's exact native grid, written like
every other method's (:func:`latent.decode.writers.write_prediction`, every ``--format``)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable, Literal

import numpy as np

from latent.baselines import BulkModel, fit_bulk_model, water_sct
from latent.cases import Case, CaseError
from latent.errors import InputError, one_line
from latent.decode.writers import write_prediction
from latent.intensity import check_ct_range, check_mask_values
from latent.io import VolumeProperties, read_volume
from latent.prepare import check_body
from latent.runner import CaseRun, run_over_cases, select_cases

BaselineMethod = Literal["water", "bulk"]
logger = logging.getLogger(__name__)


def read_mr_and_mask(case: Case) -> tuple[np.ndarray, np.ndarray, VolumeProperties]:
    """Read a case's MR and mask, checking they share one grid and the mask is not empty."""
    if case.mask is None:
        raise CaseError(f"{case.pid}: no mask file in {case.folder}")
    mr, mr_properties = read_volume(case.mr, dtype=np.float32)
    mask, mask_properties = read_volume(case.mask)
    differences = mr_properties.grid_differences(mask_properties)
    if differences:
        raise CaseError(f"{case.pid}: mask {case.mask} is on another grid than the MR: {'; '.join(differences)}")
    check_mask_values(case.mask, mask)
    mask = (mask > 0).astype(np.uint8)
    check_body(case, mr, mask)
    return mr, mask, mr_properties


def fit_bulk_on_cases(cases: Iterable[Case]) -> BulkModel:
    """Fit the bulk model's class HU on cases that have a CT (others are skipped with a warning)."""
    pairs = []
    for case in cases:
        if case.ct is None:
            logger.warning("bulk fit: skipped %s (no ct)", case.pid)
            continue
        try:
            mr, mask, _ = read_mr_and_mask(case)
            ct, _ = read_volume(case.ct, dtype=np.float32)
            check_ct_range(case.ct, ct)
        except (InputError, FileNotFoundError) as error:
            logger.warning("bulk fit: skipped %s (%s)", case.pid, one_line(error))
            continue
        if ct.shape != mr.shape:
            logger.warning("bulk fit: skipped %s (ct shape %s differs from mr %s)", case.pid, ct.shape, mr.shape)
            continue
        pairs.append((case.pid, mr, ct, mask))
    return fit_bulk_model(pairs)


def predict_baseline(
    method: BaselineMethod,
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    pids: Iterable[str] | None = None,
    fit_pids: Iterable[str] | None = None,
    quiet: bool = False,
    fmt: str = "mha",
) -> CaseRun[Path]:
    """Write ``out_dir/<pid>.<fmt>`` for every case (or only ``pids``) with a baseline.

    Args:
        method: ``water`` or ``bulk``.
        data_root: data set root (SynthRAD layout).
        out_dir: prediction folder.
        pids: cases to predict (default: all).
        fit_pids: cases whose CT fits the bulk class values (default: every case with a CT
            that is not being predicted; all cases with a CT if that leaves none).
        fmt: one of :data:`latent.decode.writers.PREDICTION_FORMATS`.
    """
    if method not in ("water", "bulk"):
        raise ValueError(f"unknown baseline method {method!r}; choose water or bulk")
    out_dir = Path(out_dir)
    selection = select_cases(data_root, pids)
    cases = selection.found
    targets = selection.cases
    model = None
    if method == "bulk":
        target_ids = {case.pid for case in targets}
        if fit_pids is not None:
            fit_cases = [case for case in cases if case.pid in set(fit_pids)]
        else:
            fit_cases = [case for case in cases if case.pid not in target_ids] or cases
        model = fit_bulk_on_cases(fit_cases)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bulk_model.json").write_text(json.dumps({
            "thresholds": model.thresholds, "class_hu": model.class_hu,
            "classes": ["dark (air or cortical bone)", "intermediate (soft tissue)", "bright (fat, marrow)"],
            "fitted_on": model.fitted_on,
        }, indent=2) + "\n")

    def work(case: Case) -> Path:
        mr, mask, properties = read_mr_and_mask(case)
        sct = water_sct(mask) if model is None else model.predict(mr, mask)
        return write_prediction(out_dir, case.pid, sct, properties, fmt=fmt)

    return run_over_cases(None, work, f"predict {method}", quiet, selection=selection)
