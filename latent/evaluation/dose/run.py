"""`latent dose`: dose-based evaluation of sCT predictions without a commercial planning system.

Per case (with CT and mask): structures (body from the mask; target and OARs from a structure
file or generated), the plan-free range proxy, and for each plan modality a plan optimised on
the CT (or taken from the plan cache) recalculated on the sCT, scored with the challenge's dose
metrics. Outputs under ``out_dir``::

    protocol.json                 the protocol every number below was produced with
    dose_metrics.csv              one row per case (the columns of the summary and more)
    dose_summary.md / .json       mean +- std per region and overall; failures
    <pid>/dose.json               everything about the case (DVH points, terms, range per beam, timings)
    <pid>/structures.mha/.json    the structures the plans used (native grid)
    <pid>/dose_<mode>_{ct,sct}.mha  doses on the dose grid
    <pid>/dvh.png, <pid>/dose_difference.png
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from latent.core.atomic import write_text_atomic
from latent.core.cases import Case, CaseError
from latent.core.intensity import check_ct_range, check_mask_values
from latent.core.io import VolumeProperties, read_volume, write_volume
from latent.core.runner import run_over_cases
from latent.evaluation.dose.dose_grid import PlanningGrid, crop_to_body, hu_to_planning_grid, mask_to_planning_grid
from latent.evaluation.dose.dose_metrics import compare_doses
from latent.evaluation.dose.extra import require_dose_extra
from latent.evaluation.dose.plan_cache import PlanCache, plan_key
from latent.evaluation.dose.protocol import ALL_MODES, PLAN_MODES, RANGE_MODE, DoseProtocol, ProtocolError, load_protocol
from latent.evaluation.dose.range_proxy import range_shifts
from latent.evaluation.dose.report import DOSE_COLUMNS, format_summary, plot_dose_difference, plot_dvh
from latent.evaluation.scoring import cases_with_ct, find_prediction, summarise, write_rows_csv
from latent.evaluation.dose.structures import Structure, case_structures, write_structure_file

logger = logging.getLogger(__name__)

#: Modes run by default: both plans and the range proxy.
DEFAULT_MODES = ALL_MODES


@dataclass
class DoseRun:
    """Outcome of :func:`run_dose`: per-case rows and details, failures, summary."""

    out_dir: Path
    protocol: DoseProtocol
    modes: tuple[str, ...]
    rows: list[dict] = field(default_factory=list)
    details: dict[str, dict] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    summary: list[dict] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 when every case was scored, 1 when any failed (or none was found)."""
        return 0 if self.rows and not self.failures else 1

    @property
    def columns(self) -> list[str]:
        """Summary columns of the modes that ran."""
        return [c for c in DOSE_COLUMNS if c.split("_")[0] in self.modes]

    def table(self) -> str:
        """Markdown summary table."""
        return format_summary(self.summary, self.columns)


def parse_modes(modes: str | Iterable[str]) -> tuple[str, ...]:
    """``'photon,proton'`` or an iterable -> validated tuple of modes.

    Raises:
        ProtocolError: unknown mode.
    """
    items = [m.strip() for m in (modes.split(",") if isinstance(modes, str) else modes) if m.strip()]
    unknown = sorted(set(items) - set(ALL_MODES))
    if unknown or not items:
        raise ProtocolError(f"unknown dose mode(s) {unknown or items}; choose from {', '.join(ALL_MODES)}")
    return tuple(m for m in ALL_MODES if m in items)


def _case_volumes(case: Case, prediction: Path):
    if case.ct is None or case.mask is None:
        raise CaseError(f"{case.pid}: needs ct and mask for dose evaluation")
    ct, grid = read_volume(case.ct, dtype=np.float32)
    mask, mask_grid = read_volume(case.mask)
    sct, sct_grid = read_volume(prediction, dtype=np.float32)
    for name, path, other in (("mask", case.mask, mask_grid), ("prediction", prediction, sct_grid)):
        differences = grid.grid_differences(other)
        if differences:
            raise CaseError(f"{case.pid}: {name} {path} is not on the CT grid: {'; '.join(differences)}")
    check_ct_range(case.ct, ct)
    check_mask_values(case.mask, mask)
    body = mask > 0
    if not body.any():
        raise CaseError(f"{case.pid}: empty mask {case.mask}")
    return ct, sct, body, grid


def evaluate_case(
    case: Case,
    prediction: Path,
    out_dir: Path,
    protocol: DoseProtocol,
    modes: Sequence[str],
    cache: PlanCache,
    figures: bool = True,
    quiet: bool = True,
    pool=None,
) -> tuple[dict, dict]:
    """Dose-evaluate one prediction; returns the summary row and the full detail record.

    ``pool`` (a :class:`latent.evaluation.dose.parallel.RecalculationPool`) spreads plan optimisation and
    dose calculations over worker processes; without it everything runs in this process.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    ct, sct, body, grid = _case_volumes(case, prediction)
    case_dir = out_dir / case.pid
    structures, source = case_structures(case.folder, body, grid, protocol.structures)
    write_structure_file(case_dir, structures, grid, {"source": source})
    target_native = np.logical_or.reduce([s.mask for s in structures if s.kind == "target"])
    crop, cropped = crop_to_body(body, grid, margin_mm=2 * protocol.dose_grid_mm)
    ct, sct, body = ct[crop], sct[crop], body[crop]
    structures = [Structure(s.name, s.kind, s.mask[crop]) for s in structures]
    row: dict = {"pid": case.pid, "region": case.region, "centre": case.centre, "structures": source}
    detail: dict = {**row, "prediction": str(prediction), "modes": list(modes),
                    "workers": pool.workers if pool is not None else 1, "timings": {}}

    if RANGE_MODE in modes:
        start = time.perf_counter()
        beams = range_shifts(ct, sct, body, target_native[crop], cropped, protocol.proton.gantry_angles_deg,
                             protocol.stopping_power, protocol.range_ray_spacing_mm, protocol.range_step_mm)
        detail["range"] = [beam.to_dict() for beam in beams]
        detail["timings"]["range_s"] = time.perf_counter() - start
        row["range_shift_mm"] = float(np.mean([beam.shift_abs_mean_mm for beam in beams]))
        row["range_shift_max_mm"] = float(max(beam.shift_abs_max_mm for beam in beams))

    plan_modes = [m for m in modes if m in PLAN_MODES]
    if plan_modes:
        volumes = _CaseVolumes(ct, sct, body, structures, cropped)
        _score_plans(case, case_dir, volumes, plan_modes, protocol, cache, pool, figures, quiet, row, detail)
    row["seconds"] = time.perf_counter() - started
    detail["timings"]["total_s"] = row["seconds"]
    detail["timings"]["total_cpu_s"] = time.process_time() - cpu_started
    _write_json(case_dir / "dose.json", detail)
    return row, detail


@dataclass
class _CaseVolumes:
    """A case's volumes cropped to the body, (z, y, x), and the cropped native grid."""

    ct: np.ndarray
    sct: np.ndarray
    body: np.ndarray
    structures: list[Structure]
    grid: VolumeProperties


def _score_plans(case: Case, case_dir: Path, volumes: _CaseVolumes, plan_modes: list[str], protocol: DoseProtocol,
                 cache: PlanCache, pool, figures: bool, quiet: bool, row: dict, detail: dict) -> None:
    """Plans (cached or optimised), dose calculations on CT and sCT, metrics, volumes, figures."""
    from latent.evaluation.dose.parallel import optimise_plans, recalculate_plans  # noqa: PLC0415 - pyRadPlan is lazy
    from latent.evaluation.dose.planning import PlanningInputs  # noqa: PLC0415

    timings = detail["timings"]
    start = time.perf_counter()
    body, native = volumes.body, volumes.grid
    planning_grid = PlanningGrid.around_body(body, native, protocol.dose_grid_mm)
    curve = protocol.stopping_power
    inputs = PlanningInputs(
        planning_grid,
        hu_to_planning_grid(volumes.ct, body, native, planning_grid, curve),
        mask_to_planning_grid(body, native, planning_grid),
        [Structure(s.name, s.kind, mask_to_planning_grid(s.mask, native, planning_grid)) for s in volumes.structures],
    )
    if not inputs.target.any():
        raise CaseError(f"{case.pid}: the target is smaller than one {protocol.dose_grid_mm:g} mm dose voxel")
    inputs.dose_region = dose_slab(inputs.body, inputs.target, planning_grid.spacing_mm, protocol.dose_slab_margin_mm)
    hu_sct = hu_to_planning_grid(volumes.sct, body, native, planning_grid, curve)
    named = {s.name: (s.kind, s.mask) for s in inputs.structures}
    detail["dose_grid"] = planning_grid.to_dict()
    timings["resample_s"] = time.perf_counter() - start

    start = time.perf_counter()
    keys = {mode: plan_key(mode, inputs, protocol) for mode in plan_modes}
    plans = {mode: cache.load(case.pid, mode, keys[mode]) for mode in plan_modes}
    new = [mode for mode in plan_modes if plans[mode] is None]
    plans.update(optimise_plans(new, inputs, protocol, pool, quiet))
    timings["plans_s"] = time.perf_counter() - start
    # New plans' reference doses (on the CT) and every sCT dose share the workers.
    start = time.perf_counter()
    jobs = [(plans[m], inputs.hu) for m in new] + [(plans[m], hu_sct) for m in plan_modes]
    calculated = recalculate_plans(jobs, inputs, protocol, pool, quiet)
    for mode, reference in zip(new, calculated):
        plans[mode].reference_dose = reference
        cache.save(case.pid, mode, keys[mode], plans[mode])
    timings["dose_calculations_s"] = time.perf_counter() - start

    doses = {}
    for mode, dose_sct in zip(plan_modes, calculated[len(new):]):
        plan = plans[mode]
        start = time.perf_counter()
        scores = compare_doses(plan.reference_dose, dose_sct, named, inputs.body, planning_grid.spacing_mm, protocol)
        timings[f"{mode}_metrics_s"] = time.perf_counter() - start
        cached = mode not in new
        row.update({f"{mode}_mae": scores["mae"], f"{mode}_dvh": scores["dvh"], f"{mode}_gamma": scores["gamma"],
                    f"{mode}_plan_cached": cached})
        detail[mode] = {**scores, "plan_cached": cached, "plan_key": keys[mode], "plan": plan.info}
        write_volume(case_dir / f"dose_{mode}_ct.mha", plan.reference_dose, planning_grid.properties, dtype="float32")
        write_volume(case_dir / f"dose_{mode}_sct.mha", dose_sct, planning_grid.properties, dtype="float32")
        doses[mode] = (plan.reference_dose, dose_sct)
    if figures:
        title = f"{case.pid} ({row['structures']} structures, {protocol.dose_grid_mm:g} mm dose grid)"
        plot_dvh(case_dir / "dvh.png", doses, named, protocol.prescription_gy, title)
        plot_dose_difference(case_dir / "dose_difference.png", inputs.hu, doses, inputs.target, protocol.prescription_gy, title)


def dose_slab(body: np.ndarray, target: np.ndarray, spacing_mm: float, margin_mm: float) -> np.ndarray:
    """Body voxels (z, y, x) within ``margin_mm`` along z of the target's slices."""
    slices = np.flatnonzero(target.any(axis=(1, 2)))
    if slices.size == 0:
        return body.copy()
    reach = int(np.floor(margin_mm / spacing_mm))
    region = np.zeros_like(body)
    region[max(slices[0] - reach, 0): slices[-1] + reach + 1] = True
    return region & body


def _json_ready(value):
    """Plain JSON types; NaN/inf (e.g. a gamma with no voxel above the cutoff) become null."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _write_json(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(_json_ready(data), indent=2, allow_nan=False) + "\n")


def run_dose(
    pred_dir: str | os.PathLike,
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    modes: str | Iterable[str] = DEFAULT_MODES,
    dose_grid_mm: float | None = None,
    protocol: DoseProtocol | str | os.PathLike | None = None,
    plan_cache: str | os.PathLike | None = None,
    pids: Iterable[str] | None = None,
    figures: bool = True,
    quiet: bool = False,
    workers: int | None = None,
) -> DoseRun:
    """Dose-evaluate every case of ``data_root`` that has a CT against ``pred_dir/<pid>.mha``.

    Args:
        pred_dir: folder of predictions on the cases' native grids.
        data_root: SynthRAD-layout data set (``Task1/<region>/<pid>/{mr,ct,mask}.mha``).
        out_dir: where the per-case records, figures and tables go.
        modes: any of ``photon``, ``proton`` (plans, need the dose extra) and ``range`` (the
            plan-free range proxy); a comma-separated string or an iterable.
        dose_grid_mm: dose grid spacing; overrides the protocol's (default 3 mm).
        protocol: a :class:`DoseProtocol`, a YAML/JSON protocol file, or None for the defaults.
        plan_cache: plan cache folder (default :func:`latent.evaluation.dose.plan_cache.default_cache_dir`).
        pids: only these cases.
        figures: draw the per-case PNGs.
        quiet: no progress bars.
        workers: processes sharing the sCT recalculation (default: CPU cores, at most 2;
            1 runs everything in this process).

    Returns:
        A :class:`DoseRun`; its ``exit_code`` is non-zero when any case failed.

    Raises:
        DoseExtraMissing: a plan modality was asked for without the dose extra installed.
        ProtocolError: invalid modes or protocol.
        CaseError: no prediction folder or no cases.
    """
    modes = parse_modes(modes)
    if not isinstance(protocol, DoseProtocol):
        protocol = load_protocol(protocol)
    if dose_grid_mm is not None and dose_grid_mm != protocol.dose_grid_mm:
        protocol = load_protocol(None, **{**protocol.model_dump(), "dose_grid_mm": dose_grid_mm})
    if any(mode in PLAN_MODES for mode in modes):
        require_dose_extra()
    pred_dir, out_dir = Path(pred_dir), Path(out_dir)
    if not pred_dir.is_dir():
        raise CaseError(f"{pred_dir}: prediction folder not found")
    cases = cases_with_ct(data_root, pids)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "protocol.json").write_text(protocol.to_json())
    cache = PlanCache(plan_cache)
    result = DoseRun(out_dir, protocol, modes)

    with contextlib.ExitStack() as stack:
        pool = None
        if any(mode in PLAN_MODES for mode in modes) and cases:
            from latent.evaluation.dose.parallel import RecalculationPool  # noqa: PLC0415 - needs the extra

            pool = stack.enter_context(RecalculationPool(workers, quiet))

        def work(case: Case) -> tuple[dict, dict]:
            prediction = find_prediction(pred_dir, case.pid)
            return evaluate_case(case, prediction, out_dir, protocol, modes, cache, figures, quiet, pool)

        run = run_over_cases(cases, work, "dose", quiet)
    for pid in sorted(run.results):
        row, detail = run.results[pid]
        result.rows.append(row)
        result.details[pid] = detail
    result.failures = dict(run.failures)
    result.summary = summarise(result.rows, columns=result.columns) if result.rows else []
    if result.rows:
        write_rows_csv(result.rows, out_dir / "dose_metrics.csv")
    (out_dir / "dose_summary.md").write_text(
        f"Dose evaluation of {pred_dir} ({', '.join(modes)}; dose grid {protocol.dose_grid_mm:g} mm)\n\n"
        + (result.table() if result.rows else "no case scored") + "\n"
    )
    report = {"protocol": protocol.model_dump(mode="json"), "modes": list(modes), "summary": result.summary,
              "failures": result.failures, "cases": result.rows}
    _write_json(out_dir / "dose_summary.json", report)
    return result
