"""Dose-based evaluation of synthetic CTs without a commercial planning system (`latent dose`).

Photon and proton plans are optimised on the CT with pyRadPlan (optional extra, imported
lazily), cached, and recalculated on each sCT; the challenge's dose metrics compare the two
doses. A plan-free range proxy (water-equivalent path length to the target) needs only numpy.

Public API::

    run_dose(pred_dir, data_root, out_dir, modes=("photon", "proton", "range"), dose_grid_mm=None, ...)
    DoseProtocol / load_protocol      every setting that moves the numbers (recorded in outputs)
    range_shifts(...)                 per-beam range shift, CT vs sCT
    DoseExtraMissing / INSTALL_HINT   what is raised / printed without the extra
"""

from latent.evaluation.dose.extra import INSTALL_HINT, DoseExtraMissing, require_dose_extra
from latent.evaluation.dose.protocol import (
    ALL_MODES, PLAN_MODES, BeamTemplate, DoseProtocol, GammaCriteria, Optimisation, ProtocolError,
    StructureGeneration, load_protocol,
)
from latent.evaluation.dose.range_proxy import BeamRange, beam_direction, range_shifts, trace_wepl
from latent.evaluation.dose.report import DOSE_COLUMNS
from latent.evaluation.dose.run import DEFAULT_MODES, DoseRun, evaluate_case, parse_modes, run_dose
from latent.evaluation.dose.stopping_power import StoppingPowerCurve

__all__ = [
    "ALL_MODES", "BeamRange", "BeamTemplate", "DEFAULT_MODES", "DOSE_COLUMNS", "DoseExtraMissing", "DoseProtocol",
    "DoseRun", "GammaCriteria", "INSTALL_HINT", "Optimisation", "PLAN_MODES", "ProtocolError", "StoppingPowerCurve",
    "StructureGeneration", "beam_direction", "evaluate_case", "load_protocol", "parse_modes", "range_shifts",
    "require_dose_extra", "run_dose", "trace_wepl",
]
