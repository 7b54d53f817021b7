"""Dose metrics between the CT dose (reference) and the sCT dose, as the SynthRAD challenge defines them.

- Dose MAE: mean |D_CT - D_sCT| over voxels where D_CT >= 90 % of the prescription, divided by
  the prescription.
- DVH metric: |dD98|/D98 + |dCI|/CI for the target (CI: van't Riet conformity index at the
  prescription isodose), plus the mean over OARs of |dD2|/D2 and of |dDmean|/Dmean, for at most
  three OARs ranked by (D5 + Dmean)/2 on the CT dose; all relative to the CT-dose value.
- Gamma pass rate: global 2 %/2 mm gamma (``pymedphys.gamma``) of the sCT dose against the CT
  dose, over reference voxels above 10 % of the maximum CT dose.

Dose arrays are (z, y, x) on the planning grid; masks share it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np

from latent.evaluation.dose.protocol import DoseProtocol, GammaCriteria

#: The challenge's guard against division by zero in relative differences.
EPSILON = 1e-12


@dataclass(frozen=True)
class DvhParameters:
    """DVH points of one structure (Gy); ``ci`` only for targets."""

    d98: float
    d95: float
    d50: float
    d5: float
    d2: float
    dmean: float
    ci: float | None = None

    def to_dict(self) -> dict:
        """JSON form."""
        return asdict(self)


def dose_at_volume(dose: np.ndarray, mask: np.ndarray, volume_percent: float) -> float:
    """D_x: the dose received by at least ``volume_percent`` % of the structure."""
    values = dose[mask]
    return float(np.percentile(values, 100.0 - volume_percent)) if values.size else math.nan


def conformity_index(dose: np.ndarray, target: np.ndarray, body: np.ndarray, isodose_gy: float) -> float:
    """van't Riet conformity number TV_RI^2 / (TV * V_RI) at ``isodose_gy``."""
    covered = dose >= isodose_gy
    target_covered = int(np.count_nonzero(covered & target))
    isodose_volume = int(np.count_nonzero(covered & (body | target)))
    target_volume = int(np.count_nonzero(target))
    if isodose_volume == 0 or target_volume == 0:
        return 0.0
    return target_covered**2 / (target_volume * isodose_volume)


def dvh_parameters(dose: np.ndarray, mask: np.ndarray, body: np.ndarray | None = None, isodose_gy: float | None = None) -> DvhParameters:
    """DVH points of ``mask``; with ``body`` and ``isodose_gy`` also its conformity index."""
    values = dose[mask]
    if values.size == 0:
        raise ValueError("empty structure on the dose grid")
    d98, d95, d50, d5, d2 = (float(v) for v in np.percentile(values, [2, 5, 50, 95, 98]))
    ci = conformity_index(dose, mask, body, isodose_gy) if body is not None and isodose_gy is not None else None
    return DvhParameters(d98, d95, d50, d5, d2, float(values.mean()), ci)


def dose_mae(reference: np.ndarray, evaluated: np.ndarray, prescription_gy: float, threshold_fraction: float = 0.9) -> float:
    """Mean |reference - evaluated| / prescription over voxels with reference >= threshold * prescription."""
    high = reference >= threshold_fraction * prescription_gy
    if not high.any():
        return math.nan
    return float(np.abs(reference[high] - evaluated[high]).mean() / prescription_gy)


def _relative(reference: float, evaluated: float) -> float:
    return abs(reference - evaluated + EPSILON) / (reference + EPSILON)


def dvh_metric(
    reference: dict[str, DvhParameters], evaluated: dict[str, DvhParameters], target_name: str, max_oars: int = 3
) -> dict[str, float]:
    """The challenge's combined DVH metric and its terms (relative differences, 0 = identical).

    Args:
        reference, evaluated: DVH parameters per structure name on the CT and sCT doses.
        target_name: the target's name (its parameters carry ``ci``).
        max_oars: OARs used, ranked by (D5 + Dmean)/2 on the reference.
    """
    target_ref, target_eval = reference[target_name], evaluated[target_name]
    terms = {
        "ptv_d98_rel": _relative(target_ref.d98, target_eval.d98),
        "ptv_ci_rel": _relative(target_ref.ci or 0.0, target_eval.ci or 0.0),
    }
    oars = sorted(
        (name for name in reference if name != target_name),
        key=lambda name: (reference[name].d5 + reference[name].dmean) / 2,
        reverse=True,
    )[:max_oars]
    d2 = [_relative(reference[name].d2, evaluated[name].d2) for name in oars]
    dmean = [_relative(reference[name].dmean, evaluated[name].dmean) for name in oars]
    terms["oar_d2_rel"] = float(np.mean(d2)) if d2 else 0.0
    terms["oar_dmean_rel"] = float(np.mean(dmean)) if dmean else 0.0
    terms["dvh"] = sum(terms.values())
    terms["n_oars"] = len(oars)
    return terms


def gamma_pass_rate(
    reference: np.ndarray, evaluated: np.ndarray, spacing_mm: float, criteria: GammaCriteria, prescription_gy: float
) -> float:
    """Percentage of evaluated reference voxels with gamma <= 1 (``pymedphys.gamma``, global).

    Args:
        reference: CT dose (z, y, x) on an isotropic grid of ``spacing_mm``.
        evaluated: sCT dose on the same grid.
        spacing_mm: grid spacing.
        criteria: dose/distance criteria, cutoff, search settings.
        prescription_gy: used when ``criteria.normalisation == 'prescription'``.

    Returns:
        Pass rate in percent (nan when no voxel is above the cutoff).
    """
    import pymedphys  # noqa: PLC0415 - part of the optional dose extra

    logging.getLogger("pymedphys").setLevel(logging.WARNING)
    axes = tuple(np.arange(n, dtype=np.float64) * spacing_mm for n in reference.shape)
    normalisation = float(reference.max()) if criteria.normalisation == "max" else prescription_gy
    gamma = pymedphys.gamma(
        axes, reference.astype(np.float64), axes, evaluated.astype(np.float64),
        dose_percent_threshold=criteria.dose_percent,
        distance_mm_threshold=criteria.distance_mm,
        lower_percent_dose_cutoff=criteria.lower_percent_dose_cutoff,
        interp_fraction=criteria.interp_fraction,
        max_gamma=criteria.max_gamma,
        local_gamma=False,
        global_normalisation=normalisation,
    )
    valid = np.isfinite(gamma)
    if not valid.any():
        return math.nan
    return float(100.0 * np.count_nonzero(gamma[valid] <= 1.0) / np.count_nonzero(valid))


def compare_doses(
    reference: np.ndarray,
    evaluated: np.ndarray,
    structures: dict[str, tuple[str, np.ndarray]],
    body: np.ndarray,
    spacing_mm: float,
    protocol: DoseProtocol,
) -> dict:
    """All dose metrics of one modality.

    Args:
        reference, evaluated: CT and sCT doses (z, y, x, Gy).
        structures: name -> (kind, mask) on the dose grid; the first target is the PTV.
        body: body mask.
        spacing_mm: isotropic dose grid spacing.
        protocol: prescription, thresholds and gamma criteria.

    Returns:
        ``{"mae", "dvh", "gamma", "dvh_terms", "dvh_ct", "dvh_sct"}``.
    """
    rx = protocol.prescription_gy
    isodose = protocol.conformity_isodose_fraction * rx
    target_name = next(name for name, (kind, _) in structures.items() if kind == "target")

    def parameters(dose: np.ndarray) -> dict[str, DvhParameters]:
        return {
            name: dvh_parameters(dose, mask, body if kind == "target" else None, isodose if kind == "target" else None)
            for name, (kind, mask) in structures.items()
            if mask.any()
        }

    dvh_ct, dvh_sct = parameters(reference), parameters(evaluated)
    terms = dvh_metric(dvh_ct, dvh_sct, target_name, protocol.dvh_max_oars)
    return {
        "mae": dose_mae(reference, evaluated, rx, protocol.mae_threshold_fraction),
        "dvh": terms["dvh"],
        "gamma": gamma_pass_rate(reference, evaluated, spacing_mm, protocol.gamma, rx),
        "dvh_terms": terms,
        "dvh_ct": {name: p.to_dict() for name, p in dvh_ct.items()},
        "dvh_sct": {name: p.to_dict() for name, p in dvh_sct.items()},
    }
