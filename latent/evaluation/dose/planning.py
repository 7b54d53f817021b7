"""Treatment plans with pyRadPlan: optimise on the CT, recalculate the same plan on an sCT.

One plan per case and modality, from the protocol's fixed beam template:

1. pencil-beam dose influence matrix on the planning CT (photons: SVD pencil beam, protons:
   Hong pencil beam), both converting HU with the protocol's stopping power table;
2. fluence optimisation (L-BFGS-B) towards the prescription in the PTV, with overdosing
   penalties on the OARs and the rest of the body;
3. normalisation so that the protocol's PTV DVH point (default D95) equals the prescription;
4. the reference dose: a direct (forward) calculation of the final weights on the CT.

Recalculating on an sCT is the same direct calculation with the sCT's HU: the beam geometry,
spot energies and weights all stay those optimised on the CT, as in the challenge, and CT and
sCT doses come from one code path (an sCT equal to the CT gives exactly the reference dose). pyRadPlan
is imported lazily (see :mod:`latent.evaluation.dose.extra`).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from latent.evaluation.dose.dose_grid import PlanningGrid
from latent.evaluation.dose.extra import load_pyradplan
from latent.evaluation.dose.protocol import DoseProtocol
from latent.evaluation.dose.structures import Structure

logger = logging.getLogger(__name__)

#: pyRadPlan radiation mode and dose engine per protocol modality.
RADIATION_MODES = {"photon": "photons", "proton": "protons"}
DOSE_ENGINES = {"photon": "SVDPB", "proton": "HongPB"}
STF_GENERATORS = {"photon": "photonIMRT", "proton": "IMPT"}


@dataclass
class PlanningInputs:
    """Everything a plan sees, on the planning grid (arrays (z, y, x))."""

    grid: PlanningGrid
    hu: np.ndarray
    body: np.ndarray
    structures: list[Structure]
    #: Voxels where dose is calculated (default: the whole body); outside it the dose is 0.
    dose_region: np.ndarray | None = None

    @property
    def target(self) -> np.ndarray:
        """Union of the target structures."""
        masks = [s.mask for s in self.structures if s.kind == "target"]
        return np.logical_or.reduce(masks) if masks else np.zeros_like(self.body)


@dataclass
class TreatmentPlan:
    """A plan optimised on the CT: beam geometry (pyRadPlan stf), weights and reference dose."""

    mode: str
    stf: Any
    weights: np.ndarray
    #: Direct calculation of ``weights`` on the CT, (z, y, x) Gy; None until computed.
    reference_dose: np.ndarray | None
    info: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def _engine_noise_suppressed():
    """Silence pyRadPlan's numpy warnings (divisions by zero for rays parallel to a grid axis are
    expected and handled) and its deprecation notices; our own warnings still show."""
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        for category in (RuntimeWarning, DeprecationWarning, UserWarning):
            warnings.filterwarnings("ignore", category=category, module=r"(pyRadPlan|numpy|numpydantic|scipy)\b.*")
        yield


def _ct(hu: np.ndarray, grid: PlanningGrid):
    from pyRadPlan.ct import create_ct  # noqa: PLC0415 - the dose extra is optional

    image = sitk.GetImageFromArray(np.ascontiguousarray(hu, dtype=np.float32))
    grid.properties.apply_to(image)
    return create_ct(cube_hu=image)


def _structure_set(ct, inputs: PlanningInputs, protocol: DoseProtocol, with_objectives: bool):
    from pyRadPlan.cst import create_cst, create_voi  # noqa: PLC0415
    from pyRadPlan.optimization.objectives import SquaredDeviation, SquaredOverdosing  # noqa: PLC0415

    settings, rx = protocol.optimisation, protocol.prescription_gy

    def objectives(kind: str) -> list:
        if not with_objectives:
            return []
        if kind == "TARGET":
            return [SquaredDeviation(priority=settings.ptv_priority, d_ref=rx)]
        if kind == "OAR" and settings.oar_priority > 0:
            return [SquaredOverdosing(priority=settings.oar_priority, d_max=settings.oar_max_fraction * rx)]
        if kind == "EXTERNAL" and settings.body_priority > 0:
            return [SquaredOverdosing(priority=settings.body_priority, d_max=settings.body_max_fraction * rx)]
        return []

    region = inputs.body if inputs.dose_region is None else inputs.dose_region
    entries = [(s.name, "TARGET" if s.kind == "target" else "OAR", s.mask) for s in inputs.structures]
    entries.append(("BODY", "EXTERNAL", inputs.body))
    # pyRadPlan computes dose only in voxels of the structure set, so the VOIs are limited to
    # the dose region (structures are scored over their full extent, with zero dose outside).
    vois = [
        create_voi(name=name, voi_type=kind, mask=(mask & region).astype(np.uint8), ct_image=ct, objectives=objectives(kind))
        for name, kind, mask in entries
        if (mask & region).any()
    ]
    return create_cst(vois, ct=ct)


def _plan(mode: str, protocol: DoseProtocol):
    from pyRadPlan import IonPlan, PhotonPlan  # noqa: PLC0415

    template = protocol.template(mode)
    angles = [float(angle) for angle in template.gantry_angles_deg]
    common = {"machine": template.machine, "prescribed_dose": protocol.prescription_gy, "num_of_fractions": 1}
    plan = PhotonPlan(**common) if mode == "photon" else IonPlan(radiation_mode="protons", **common)
    prop_stf = {"generator": STF_GENERATORS[mode], "gantry_angles": angles, "couch_angles": [0.0] * len(angles), "bixel_width": template.bixel_width_mm}
    if mode == "proton":
        prop_stf["longitudinal_spot_spacing"] = protocol.proton_longitudinal_spacing_mm
    plan.prop_stf = prop_stf
    plan.prop_opt = {"problem": "nonlin_fluence", "solver": "scipy", "max_iter": protocol.optimisation.max_iter, "display": False}
    plan.prop_dose_calc = {"engine": DOSE_ENGINES[mode]}
    return plan


def _engine(plan, ct, protocol: DoseProtocol):
    from pyRadPlan.dose.engines import get_engine  # noqa: PLC0415

    engine = get_engine(plan)
    engine.dose_grid = ct.grid  # the CT is already on the dose grid: no second resampling
    engine.hlut = protocol.stopping_power.as_table()
    return engine


def _dose_array(result: dict) -> np.ndarray:
    return sitk.GetArrayFromImage(result["physical_dose"]).astype(np.float32)


def optimise_plan(mode: str, inputs: PlanningInputs, protocol: DoseProtocol, quiet: bool = True) -> TreatmentPlan:
    """Optimise and normalise the ``mode`` plan on the planning CT.

    Returns:
        The plan, still without ``reference_dose``: that is a direct calculation on the CT
        (:func:`recalculate`), done together with the sCT's so both share the workers.
    """
    load_pyradplan(quiet)
    if not inputs.target.any():
        raise ValueError("no target voxels on the dose grid (target smaller than a dose voxel?)")
    with _engine_noise_suppressed():
        return _optimise_plan(mode, inputs, protocol)


def _optimise_plan(mode: str, inputs: PlanningInputs, protocol: DoseProtocol) -> TreatmentPlan:
    from pyRadPlan import fluence_optimization, generate_stf  # noqa: PLC0415

    timings: dict[str, float] = {}
    start = time.perf_counter()
    ct = _ct(inputs.hu, inputs.grid)
    cst = _structure_set(ct, inputs, protocol, with_objectives=True)
    plan = _plan(mode, protocol)
    stf = generate_stf(ct, cst, plan)
    timings["geometry_s"] = time.perf_counter() - start

    start = time.perf_counter()
    engine = _engine(plan, ct, protocol)
    if hasattr(engine, "enable_dij_sampling"):
        # No random thinning of low-dose tails: the normalisation below reads the matrix dose.
        engine.enable_dij_sampling = False
    dij = engine.calc_dose_influence(ct, cst, stf)
    timings["influence_s"] = time.perf_counter() - start

    start = time.perf_counter()
    solver_info: dict = {}
    weights = np.asarray(fluence_optimization(ct, cst, stf, dij, plan, opt_info=solver_info), dtype=np.float64)
    timings["optimisation_s"] = time.perf_counter() - start
    optimised = _dose_array(dij.compute_result_dose_grid(weights))
    volume_percent = float(protocol.plan_normalisation[1:])
    normalisation_dose = float(np.percentile(optimised[inputs.target], 100.0 - volume_percent))
    if not normalisation_dose > 0:
        raise ValueError(f"{mode} plan delivers no dose to the target (beams miss it?)")
    factor = protocol.prescription_gy / normalisation_dose
    weights *= factor
    info = {
        "n_beams": len(stf.beams),
        "n_beamlets": int(weights.size),
        "iterations": solver_info.get("num_iter"),
        "normalisation_factor": factor,
        "timings": timings,
    }
    logger.info("%s plan: %d beamlets, %s", mode, weights.size, {k: round(v, 1) for k, v in timings.items()})
    return TreatmentPlan(mode, stf, weights, None, info)


def split_beams(plan: TreatmentPlan, parts: int) -> list[TreatmentPlan]:
    """The plan as up to ``parts`` plans of disjoint beam groups (balanced by beamlet count).

    Dose is additive over beams, so the groups' doses sum to the plan's dose.
    """
    beams = list(plan.stf.beams)
    if parts <= 1 or len(beams) <= 1:
        return [plan]
    counts = [beam.total_number_of_bixels for beam in beams]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    groups: list[list[int]] = [[] for _ in range(min(parts, len(beams)))]
    loads = [0] * len(groups)
    for index in sorted(range(len(beams)), key=lambda i: -counts[i]):
        lightest = loads.index(min(loads))
        groups[lightest].append(index)
        loads[lightest] += counts[index]
    stf_type = type(plan.stf)
    split = []
    for group in groups:
        group = sorted(group)
        weights = np.concatenate([plan.weights[offsets[i]:offsets[i + 1]] for i in group])
        stf = stf_type.model_validate({"beams": [beams[i] for i in group]})
        split.append(TreatmentPlan(plan.mode, stf, weights, plan.reference_dose, {"beams": group}))
    return split


def recalculate(plan: TreatmentPlan, hu: np.ndarray, inputs: PlanningInputs, protocol: DoseProtocol, quiet: bool = True) -> np.ndarray:
    """Dose (z, y, x, Gy) of ``plan``'s fixed weights on another CT (``hu`` on the planning grid)."""
    load_pyradplan(quiet)
    with _engine_noise_suppressed():
        ct = _ct(hu, inputs.grid)
        cst = _structure_set(ct, inputs, protocol, with_objectives=False)
        engine = _engine(_plan(plan.mode, protocol), ct, protocol)
        return _dose_array(engine.calc_dose_forward(ct, cst, plan.stf, plan.weights))
