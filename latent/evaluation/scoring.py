"""`latent evaluate`: score a prediction folder against the data set, SynthRAD-style.

A prediction folder holds ``<pid>.mha`` (or ``.nii.gz``) per case on the case's native grid,
and optionally ``<pid>_std.mha``, a per-voxel uncertainty map (samples, flips, ensembles) whose
ranking against the absolute error is reported as ``std_error_spearman`` and whose mean over the
mask as ``std_mean`` (ranked against the cases' MAE in :mod:`latent.evaluation.case_uncertainty`).
Every case with a CT and a mask is scored; a missing prediction, two of one case (``<pid>.mha``
and ``<pid>.nii.gz``), one on another grid, or a broken input is a one-line per-case error, the
others are still scored. A folder written by ``latent predict`` holds ``predict_manifest.json``:
then only the cases it lists are scored, and other prediction files (an earlier method's) are
named and skipped. Over the scored cases, the structural bias of bone and body per region
(:mod:`latent.evaluation.structb`) is computed on one common grid.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk

from latent.core.atomic import write_atomic
from latent.core.cases import Case, CaseError, discover_cases
from latent.core.intensity import check_ct_range, check_mask_values
from latent.core.errors import BadFileError
from latent.core.io import VolumeError, VolumeProperties, read_volume
from latent.core.grid import CanonicalGrid
from latent.evaluation.case_uncertainty import case_uncertainty
from latent.evaluation.metrics import metric_digits, metric_names, score_case
from latent.evaluation.structb import STRUCTB_GRID, CaseStructures, case_structures, structb_by_region, structb_grid
from latent.core.runner import CaseRun, default_workers, run_over_cases, select_cases

#: The image-metric columns of the summary, in table order (latent.evaluation.metrics.METRICS).
METRIC_COLUMNS = tuple(metric_names("image"))
PREDICTION_SUFFIXES = (".mha", ".nii.gz", ".nii", ".nrrd")
#: Voxels used for the std-error Spearman correlation (more are subsampled evenly).
SPEARMAN_MAX_VOXELS = 200_000


def find_prediction(pred_dir: Path, pid: str) -> Path:
    """The prediction file of ``pid`` in ``pred_dir``.

    Raises:
        CaseError: no prediction for that case, or two (``<pid>.mha`` and ``<pid>.nii.gz``, ...):
            which one a method wrote cannot be told, so neither is scored.
    """
    found = [pred_dir / f"{pid}{suffix}" for suffix in PREDICTION_SUFFIXES if (pred_dir / f"{pid}{suffix}").is_file()]
    if len(found) > 1:
        raise CaseError(f"{pid}: {len(found)} predictions, {' and '.join(str(path) for path in found)}; "
                        "remove all but one")
    if found:
        return found[0]
    raise CaseError(f"{pid}: no prediction {pred_dir / (pid + '.mha')} (or .nii.gz)")


#: Written by ``latent predict`` beside its predictions: the cases it predicted and failed on.
PREDICT_MANIFEST = "predict_manifest.json"


@dataclass(frozen=True)
class PredictManifest:
    """What ``latent predict`` recorded of a prediction folder."""

    path: Path
    processed: frozenset[str]
    #: pid -> why predict failed on it
    failures: dict[str, str] = field(default_factory=dict)

    def pids(self) -> list[str]:
        """Every case the manifest names: predicted or failed."""
        return sorted(self.processed | set(self.failures))

    def check(self, pid: str) -> None:
        """Raise :class:`CaseError` when ``pid`` has no prediction by the manifest's account."""
        if pid not in self.processed:
            failed = f" (predict failed: {self.failures[pid]})" if pid in self.failures else ""
            raise CaseError(f"{pid}: no prediction listed in {self.path}{failed}")


def read_predict_manifest(pred_dir: Path) -> PredictManifest | None:
    """The folder's ``predict_manifest.json``, or None when it has none.

    Raises:
        BadFileError: the manifest is unreadable or not one ``latent predict`` writes.
    """
    path = pred_dir / PREDICT_MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadFileError(f"{path}: unreadable prediction manifest ({type(error).__name__})") from None
    processed, failures = (data.get("processed"), data.get("failures", {})) if isinstance(data, dict) else (None, None)
    if not isinstance(processed, list) or not isinstance(failures, dict):
        raise BadFileError(f"{path}: not a prediction manifest (expected 'processed': [...] and 'failures': {{...}})")
    return PredictManifest(path, frozenset(str(pid) for pid in processed),
                           {str(pid): str(reason) for pid, reason in failures.items()})


def unlisted_files(pred_dir: Path, listed: Iterable[str]) -> list[str]:
    """Names of the prediction files (and std maps) in ``pred_dir`` of cases not in ``listed``."""
    listed = set(listed)
    names = []
    for entry in sorted(pred_dir.iterdir()):
        suffix = next((suffix for suffix in PREDICTION_SUFFIXES if entry.name.endswith(suffix)), None)
        if suffix is None or entry.name.startswith(".") or not entry.is_file():
            continue
        if entry.name[: -len(suffix)].removesuffix("_std") not in listed:
            names.append(entry.name)
    return names


def cases_with_ct(data_root: str | os.PathLike, pids: Iterable[str] | None = None) -> list[Case]:
    """The cases of ``data_root`` that have a CT to score against (only ``pids`` when given)."""
    cases = [case for case in discover_cases(data_root) if case.ct is not None]
    if pids is None:
        return cases
    wanted = set(pids)
    return [case for case in cases if case.pid in wanted]


def find_std_map(prediction: Path) -> Path | None:
    """The uncertainty map ``<pid>_std.<suffix>`` beside a prediction file, if there is one."""
    for suffix in PREDICTION_SUFFIXES:
        if prediction.name.endswith(suffix):
            candidate = prediction.with_name(prediction.name[: -len(suffix)] + "_std" + suffix)
            return candidate if candidate.is_file() else None
    return None


def std_error_spearman(std: np.ndarray, error: np.ndarray, max_voxels: int = SPEARMAN_MAX_VOXELS) -> float:
    """Spearman correlation between per-voxel std and absolute error (1-D arrays of the masked voxels).

    More than ``max_voxels`` voxels are subsampled at evenly spaced indices (deterministic). NaN
    when either side is constant (no ranking to compare).
    """
    from scipy.stats import spearmanr

    if std.size > max_voxels:
        keep = np.linspace(0, std.size - 1, max_voxels).round().astype(np.int64)
        std, error = std[keep], error[keep]
    if std.size < 2 or np.all(std == std[0]) or np.all(error == error[0]):
        return math.nan
    return float(spearmanr(std, error).statistic)


@dataclass
class ScoredInputs:
    """One case's volumes as scored: (z, y, x) arrays on the CT's grid, and that grid."""

    ct: np.ndarray
    sct: np.ndarray
    mask: np.ndarray
    std: np.ndarray | None
    properties: VolumeProperties


def read_scored_inputs(case: Case, prediction: Path) -> ScoredInputs:
    """Read and check a case's CT and mask, the prediction and its ``<pid>_std`` map (if any).

    Raises:
        CaseError: no CT or mask, a volume on another grid than the CT, or an empty mask.
    """
    if case.ct is None or case.mask is None:
        raise CaseError(f"{case.pid}: needs ct and mask to be scored")
    ct, ct_properties = read_volume(case.ct, dtype=np.float32)
    check_ct_range(case.ct, ct)
    mask, mask_properties = read_volume(case.mask)
    check_mask_values(case.mask, mask)
    sct, sct_properties = read_volume(prediction, dtype=np.float32)
    std_path = find_std_map(prediction)
    std, std_properties = read_volume(std_path, dtype=np.float32) if std_path is not None else (None, None)
    for name, path, properties in (("mask", case.mask, mask_properties), ("prediction", prediction, sct_properties),
                                   ("std map", std_path, std_properties)):
        differences = ct_properties.grid_differences(properties) if properties is not None else []
        if differences:
            raise CaseError(f"{case.pid}: {name} {path} is on another grid than the CT: {'; '.join(differences)}")
    if not np.any(mask):
        raise CaseError(f"{case.pid}: empty mask {case.mask}")
    return ScoredInputs(ct, sct, mask, std, ct_properties)


def score_inputs(case: Case, inputs: ScoredInputs) -> dict[str, float | str]:
    """The evaluation row of one case: every metric inside the mask; with a std map, also
    ``std_error_spearman`` (std vs. |sCT - CT| in the mask) and ``std_mean`` (its mean there)."""
    ct, sct, inside = inputs.ct, inputs.sct, inputs.mask > 0
    scores = score_case(ct, sct, inside, inputs.properties.spacing)
    row = {"pid": case.pid, "region": case.region, "centre": case.centre, **{k: float(v) for k, v in scores.items()}}
    if inputs.std is not None:
        row["std_error_spearman"] = std_error_spearman(inputs.std[inside], np.abs(sct[inside] - ct[inside]))
        row["std_mean"] = float(inputs.std[inside].astype(np.float64).mean())
    return row


def score_prediction(case: Case, prediction: Path) -> dict[str, float | str]:
    """Score one prediction file against its case's CT inside the case's mask (:func:`score_inputs`)."""
    return score_inputs(case, read_scored_inputs(case, prediction))


@dataclass(frozen=True)
class ScoredCase:
    """A case's evaluation row and, when StructB is asked for, its structure masks on the common grid."""

    row: dict
    structures: CaseStructures | None = None


#: Cases smaller than this score faster than a worker process starts (phantoms, demos).
POOL_MIN_VOXELS = 2_000_000


def default_evaluate_workers(cases: Sequence[Case]) -> int:
    """Workers for scoring ``cases``: :func:`latent.core.runner.default_workers` for SynthRAD-size
    volumes, 1 when the first CT has fewer than :data:`POOL_MIN_VOXELS` voxels (header only)."""
    if len(cases) < 2 or default_workers() == 1 or cases[0].ct is None:
        return 1
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(cases[0].ct))
        reader.ReadImageInformation()
        voxels = math.prod(reader.GetSize())
    except RuntimeError:  # a DICOM folder or an unreadable header: scoring reports the latter
        return default_workers()
    return default_workers() if voxels >= POOL_MIN_VOXELS else 1


def _score_from_folder(case: Case, pred_dir: Path, manifest: PredictManifest | None = None,
                       grid: CanonicalGrid | None = None) -> ScoredCase:
    if manifest is not None:
        manifest.check(case.pid)
    inputs = read_scored_inputs(case, find_prediction(pred_dir, case.pid))
    structures = None if grid is None else case_structures(inputs.ct, inputs.sct, inputs.mask, inputs.properties,
                                                           grid)
    return ScoredCase(score_inputs(case, inputs), structures)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    if any(math.isinf(v) for v in finite):
        return (math.inf if all(v > 0 for v in finite if math.isinf(v)) else math.nan), math.nan
    return float(np.mean(finite)), float(np.std(finite))


def summarise(rows: Iterable[dict], group_key: str = "region", columns: Iterable[str] = METRIC_COLUMNS) -> list[dict]:
    """Mean and std of each metric per group and over all rows (group ``'all'``)."""
    rows = list(rows)
    columns = list(columns)
    groups = sorted({str(row[group_key]) for row in rows}) + ["all"]
    summary = []
    for group in groups:
        members = [row for row in rows if group == "all" or str(row[group_key]) == group]
        entry: dict = {group_key: group, "n": len(members)}
        for column in columns:
            entry[column], entry[f"{column}_std"] = _mean_std(
                [float(row[column]) for row in members if row.get(column) is not None])
        summary.append(entry)
    return summary


def format_summary(summary: list[dict], group_key: str = "region", columns: Iterable[str] = METRIC_COLUMNS) -> str:
    """Markdown table of :func:`summarise` output (mean +- std)."""
    columns = list(columns)
    header = f"| {group_key} | n | " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    for entry in summary:
        cells = []
        for column in columns:
            digits = metric_digits(column)
            mean, std = entry[column], entry[f"{column}_std"]
            cells.append(f"{mean:.{digits}f} +- {std:.{digits}f}" if not math.isnan(std) else f"{mean:.{digits}f}")
        lines.append(f"| {entry[group_key]} | {entry['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class Evaluation:
    """Per-case scores, failures and the summary."""

    run: CaseRun[dict]
    summary: list[dict]
    #: prediction files left out because the folder's manifest does not list their case
    unlisted: list[str] = field(default_factory=list)
    #: :func:`latent.evaluation.structb.structb_by_region` of the scored cases (None: not asked for)
    structural_bias: dict | None = None
    #: :func:`latent.evaluation.case_uncertainty.case_uncertainty` (empty: no std map)
    case_uncertainty: list[dict] = field(default_factory=list)

    def unlisted_line(self, shown: int = 5) -> str | None:
        """One line naming the files skipped for not being in the manifest (None: there are none)."""
        if not self.unlisted:
            return None
        more = ", ..." if len(self.unlisted) > shown else ""
        return (f"skipped {len(self.unlisted)} file(s) not in the manifest: "
                f"{', '.join(self.unlisted[:shown])}{more}")

    @property
    def rows(self) -> list[dict]:
        """Per-case score rows, sorted by patient id."""
        return [self.run.results[pid] for pid in sorted(self.run.results)]


def write_rows_csv(rows: list[dict], path: Path) -> Path:
    """Write rows as CSV atomically (columns from the first row)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(key for row in rows for key in row))

    def write(temporary: Path) -> None:
        with temporary.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    return write_atomic(path, write)


def evaluate_predictions(
    pred_dir: str | os.PathLike,
    data_root: str | os.PathLike,
    out: str | os.PathLike | None = None,
    pids: Iterable[str] | None = None,
    quiet: bool = False,
    workers: int | None = None,
    structb: str | None = STRUCTB_GRID,
) -> Evaluation:
    """Score every case with a CT in ``data_root`` (or only ``pids``) against ``pred_dir``.

    Cases are scored in ``workers`` processes (default :func:`default_evaluate_workers`); the
    scores do not depend on it. With a ``predict_manifest.json`` in ``pred_dir``, the cases it
    names (``pids`` still narrows them) are scored, and only the predictions it lists count.
    ``structb`` is the common grid of the structural bias (a fixed-shape grid spec; None: none).

    Writes ``out`` (.csv, plus a .json beside it with per-case rows, summary, the structural bias,
    the per-case uncertainty, failures and skipped cases).
    """
    grid = None if structb is None else structb_grid(structb)
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise CaseError(f"{pred_dir}: prediction folder not found")
    manifest = read_predict_manifest(pred_dir)
    unlisted = [] if manifest is None else unlisted_files(pred_dir, manifest.processed)
    if manifest is not None and pids is None:
        pids = manifest.pids()
    selection = select_cases(data_root, pids, need_ct=True)
    if not selection.cases:
        raise CaseError(f"{data_root}: no case with a CT to score"
                        + (f" ({len(selection.skipped)} skipped, e.g. {next(iter(selection.skipped.values()))})"
                           if selection.skipped else ""))
    work = functools.partial(_score_from_folder, pred_dir=pred_dir, manifest=manifest, grid=grid)
    run = run_over_cases(None, work, "evaluate", quiet, selection=selection,
                         workers=default_evaluate_workers(selection.cases) if workers is None else workers)
    scored, run.results = run.results, {pid: case.row for pid, case in run.results.items()}
    columns = list(METRIC_COLUMNS) + [column for column in metric_names("uncertainty")
                                      if any(column in row for row in run.results.values())]
    evaluation = Evaluation(run, summarise(run.results.values(), columns=columns) if run.results else [], unlisted,
                            case_uncertainty=case_uncertainty(run.results.values()))
    if grid is not None:
        evaluation.structural_bias = structb_by_region(
            ((case.row["region"], case.structures) for _, case in sorted(scored.items())), grid)
    if out is not None:
        out = Path(out)
        write_rows_csv(evaluation.rows, out)
        report = {"scored_against": f"the CT of each case in {Path(data_root).resolve()}", "cases": evaluation.rows,
                  "summary": evaluation.summary, "structural_bias": evaluation.structural_bias,
                  "case_uncertainty": evaluation.case_uncertainty, "failures": run.failures, "skipped": run.skipped,
                  "unlisted_files": evaluation.unlisted}
        out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    return evaluation
