"""Cohort statistics over every case's descriptors: MAD z-scores, an isolation forest, labels with reasons."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from latent.core.qa.case import LABELS, CaseQA, Finding
from latent.core.qa.config import QAConfig

#: Words for the features of :data:`latent.core.qa.config.DEFAULT_Z_FEATURES` and a few others.
FEATURE_WORDS = {"ct_soft_median": ("CT soft-tissue median", "HU"), "ct_mean": ("CT mean", "HU"),
                 "ct_std": ("CT std", "HU"), "ct_p99": ("CT p99", "HU"), "mr_cv": ("MR coefficient of variation", ""),
                 "bias_field_ratio": ("MR bias field p95/p5", ""), "air_fraction": ("CT air fraction", ""),
                 "nmi_before": ("CT-MR NMI", "")}


@dataclass
class Cohort:
    """Every case's QA after the cohort step, and notes on what the cohort step could not do."""

    cases: list[CaseQA]
    features: list[str]
    notes: list[str] = field(default_factory=list)


def numeric_features(cases: list[CaseQA]) -> list[str]:
    """Descriptor names whose values are numbers in every case, in first-seen order."""
    names = list(dict.fromkeys(name for qa in cases for name in qa.values))
    return [name for name in names if all(isinstance(qa.values.get(name), float) for qa in cases)]


def mad_z(values: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """0.6745 (p - median) / MAD, the MAD at least ``floor``; 0 where the MAD is 0 and no floor is set.

    NaN values stay NaN and do not enter the median.
    """
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.full(values.shape, np.nan)
    median = float(np.median(finite))
    mad = max(float(np.median(np.abs(finite - median))), floor)
    if mad == 0:
        return np.where(np.isfinite(values), 0.0, np.nan)
    return 0.6745 * (values - median) / mad


def cohort_z(cases: list[CaseQA], features: list[str], config: QAConfig) -> dict[str, list[CaseQA]]:
    """Write ``<feature>_zscore`` into every case's values: within its region when the region has at least
    ``min_group`` cases (regions differ: a head has a skull, a pelvis fat), else within the other cases pooled."""
    regions = sorted({qa.region for qa in cases})
    groups = [[qa for qa in cases if qa.region == region] for region in regions]
    pooled = [qa for group in groups if len(group) < config.min_group for qa in group]
    groups = [group for group in groups if len(group) >= config.min_group] + ([pooled] if pooled else [])
    peers = {qa.pid: group for group in groups for qa in group}
    for group in groups:
        for name in features:
            values = np.array([float(qa.values[name]) for qa in group])
            scores = mad_z(values, config.mad_floors.get(name, 0.0))
            for qa, score in zip(group, scores):
                qa.values[f"{name}_zscore"] = float(score)
    return peers


def isolation_forest(cases: list[CaseQA], features: list[str], config: QAConfig) -> str | None:
    """Fit scikit-learn's IsolationForest on the standardised features; ``iforest_score`` (lower = more
    unusual) and ``iforest_outlier`` per case. Returns a note when it is skipped."""
    if len(cases) < config.forest_min_cases:
        for qa in cases:
            qa.values.update(iforest_score=math.nan, iforest_outlier=0.0)
        return (f"isolation forest skipped: {len(cases)} case(s), it needs at least {config.forest_min_cases} "
                "(forest_min_cases)")
    from sklearn.ensemble import IsolationForest

    matrix = np.array([[float(qa.values[name]) for name in features] for qa in cases])
    matrix = np.where(np.isfinite(matrix), matrix, np.nan)
    matrix = matrix[:, ~np.all(np.isnan(matrix), axis=0)]  # e.g. metal positions in a cohort without metal
    matrix = np.where(np.isnan(matrix), np.nanmedian(matrix, axis=0), matrix)
    spread = matrix.std(axis=0)
    matrix = (matrix - matrix.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    forest = IsolationForest(contamination=config.forest_contamination, random_state=config.forest_seed,
                             n_estimators=200).fit(matrix)
    scores, outlier = forest.decision_function(matrix), forest.predict(matrix) < 0
    for qa, score, flag in zip(cases, scores, outlier):
        qa.values.update(iforest_score=float(score), iforest_outlier=float(flag))
    return None


#: Descriptors that enter the isolation forest: everything numeric except bookkeeping and positions.
NOT_FOREST = ("spacing_", "metal_slice_", "metal_centroid_", "body_slices", "flagged_slices", "rigid_")


def label_cohort(cases: list[CaseQA], config: QAConfig) -> Cohort:
    """Cohort z-scores, rule and z-score findings, the isolation forest, and a label per case.

    The label is the worst level of the case's findings (RED > YELLOW > GREEN); an isolation-forest
    outlier is a NOTE unless ``forest_makes_yellow``.
    """
    features = numeric_features(cases)
    cohort = Cohort(cases, features)
    if not cases:
        return cohort
    peers = cohort_z(cases, features, config)
    for qa in cases:
        for name in config.z_features:
            score = qa.values.get(f"{name}_zscore")
            if isinstance(score, float) and abs(score) > config.z_threshold:
                words, unit = FEATURE_WORDS.get(name, (name, ""))
                median = float(np.nanmedian([float(other.values[name]) for other in peers[qa.pid]]))
                qa.findings.append(Finding("YELLOW", f"z_{name}", (
                    f"{words} unusual for the cohort ({float(qa.values[name]):.4g}{' ' + unit if unit else ''}, "
                    f"median {median:.4g} of {len(peers[qa.pid])} comparable cases, MAD z {score:.1f})")))
    forest_features = [name for name in features if not name.startswith(NOT_FOREST)]
    note = isolation_forest(cases, forest_features, config)
    if note:
        cohort.notes.append(note)
    for qa in cases:
        if qa.values.get("iforest_outlier") == 1.0:
            level = "YELLOW" if config.forest_makes_yellow else "NOTE"
            qa.findings.append(Finding(level, "iforest", (
                f"unusual combination of descriptors (isolation forest score {float(qa.values['iforest_score']):.3f})")))
    for qa in cases:
        qa.values["label"] = case_label(qa)
    return cohort


def case_label(qa: CaseQA) -> str:
    """GREEN, YELLOW or RED: the worst level among the case's findings (NOTEs do not count)."""
    levels = [LABELS.index(f.level) for f in qa.findings if f.level in LABELS]
    return LABELS[max(levels, default=0)]
