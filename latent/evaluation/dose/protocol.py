"""The dose-evaluation protocol: every setting that moves the dose numbers, typed and recorded.

Results depend on the dose grid, the beam templates, the prescription, the HU -> stopping
power curve and the gamma criteria (seen here: proton dose MAE 0.038 at a 3 mm grid vs 0.051 at
5 mm for the same CT/sCT pair). So they live in one pydantic model that is written next to
every output (``protocol.json``) and hashed into the plan cache key: numbers produced under
different protocols are never mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from latent.core.errors import BadConfigError
from latent.evaluation.dose.stopping_power import DEFAULT_HLUT_HU, DEFAULT_HLUT_RSP, StoppingPowerCurve

#: Bump when the meaning of a protocol field or the plan recipe changes (invalidates plan caches).
PROTOCOL_VERSION = 1
#: Radiation modalities that need a treatment plan (and the optional dose extra).
PLAN_MODES = ("photon", "proton")
#: The plan-free water-equivalent path length proxy (pure numpy).
RANGE_MODE = "range"
ALL_MODES = (*PLAN_MODES, RANGE_MODE)


class ProtocolError(BadConfigError, ValueError):
    """A dose protocol file or value is invalid (the message names the field)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BeamTemplate(_Frozen):
    """Fixed, coplanar beam arrangement (couch 0) of one modality.

    Gantry angles follow pyRadPlan/matRad in the patient's LPS frame: 0 deg = beam entering from
    anterior (travelling towards +y, posterior), 90 deg = entering from the patient's left
    (travelling towards -x).
    """

    gantry_angles_deg: tuple[float, ...] = Field(min_length=1, max_length=9)
    bixel_width_mm: float = Field(5.0, gt=0, le=20, description="beamlet / lateral spot spacing")
    machine: str = "Generic"

    @field_validator("gantry_angles_deg")
    @classmethod
    def _angles_in_range(cls, angles: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0.0 <= angle < 360.0 for angle in angles):
            raise ValueError(f"gantry angles must lie in [0, 360), got {list(angles)}")
        if len(set(angles)) != len(angles):
            raise ValueError(f"gantry angles must be distinct, got {list(angles)}")
        return angles


class GammaCriteria(_Frozen):
    """Global gamma analysis (pymedphys.gamma) of the sCT dose against the CT dose."""

    dose_percent: float = Field(2.0, gt=0)
    distance_mm: float = Field(2.0, gt=0)
    #: Reference voxels below this percentage of the normalisation dose are not evaluated.
    lower_percent_dose_cutoff: float = Field(10.0, ge=0, lt=100)
    #: Evaluation grid refinement: distance_mm / interp_fraction (pymedphys recommends 10).
    interp_fraction: int = Field(5, ge=1, le=20)
    #: Search stops beyond this gamma; the pass rate (gamma <= 1) is unaffected when > 1.
    max_gamma: float = Field(1.1, gt=1.0)
    #: Global normalisation: ``"max"`` = maximum of the CT dose (pymedphys' default).
    normalisation: str = Field("max", pattern="^(max|prescription)$")


class StructureGeneration(_Frozen):
    """Reproducible target and organs at risk for cases without a structure file.

    The PTV is a sphere; by default centred on the deepest point of the body (largest distance
    to the body surface or scan end) within the central third of the slices, ties broken
    towards the body's centroid, so it never touches the skin. Each OAR is a sphere beside the PTV, ``oar_gap_mm`` from its surface, tried along
    +x, -x, -y, +y (LPS) in that order and kept where it fits inside the body.
    """

    ptv_radius_mm: float = Field(20.0, gt=0)
    #: PTV centre in world LPS mm; ``None`` = the automatic deepest-point rule above.
    ptv_center_mm: tuple[float, float, float] | None = None
    oar_radius_mm: float = Field(10.0, gt=0)
    oar_gap_mm: float = Field(3.0, ge=0)
    n_oars: int = Field(2, ge=0, le=4)


class Optimisation(_Frozen):
    """Fluence optimisation objectives (squared-deviation family) and solver limits."""

    ptv_priority: float = Field(1000.0, gt=0)
    oar_priority: float = Field(100.0, ge=0)
    #: OAR objective: squared overdosing above this fraction of the prescription.
    oar_max_fraction: float = Field(0.5, gt=0)
    body_priority: float = Field(10.0, ge=0)
    #: Body (outside target/OARs): squared overdosing above this fraction of the prescription.
    body_max_fraction: float = Field(0.6, gt=0)
    #: 100 L-BFGS-B iterations: on a SynthRAD-size AB phantom the photon plan's PTV D98/D2 were
    #: within 0.3 % and its OAR mean doses within 2 % of the 200-iteration plan, at half the cost.
    max_iter: int = Field(100, ge=5, le=5000)


class DoseProtocol(_Frozen):
    """Everything that determines the dose numbers; written to every output folder."""

    version: int = PROTOCOL_VERSION
    #: Isotropic dose (and planning) grid spacing in mm; the challenge-like default is 3 mm.
    dose_grid_mm: float = Field(3.0, ge=1.0, le=10.0)
    #: Fraction dose in Gy; metrics are relative to it.
    prescription_gy: float = Field(2.0, gt=0)
    photon: BeamTemplate = BeamTemplate(gantry_angles_deg=(0.0, 72.0, 144.0, 216.0, 288.0))
    proton: BeamTemplate = BeamTemplate(gantry_angles_deg=(90.0, 270.0, 180.0))
    #: Plans are scaled so that this DVH point of the PTV equals the prescription: D95 (95 % of
    #: the PTV receives it, the common clinical convention) keeps the conformity index at the
    #: prescription isodose stable; D50 (ICRU 83 median) would leave half the PTV below it.
    plan_normalisation: str = Field("D95", pattern="^D(95|98|50)$")
    #: Dose is calculated within this distance (along the couch axis, z) of the target and is 0
    #: beyond. The beams are coplanar and pyRadPlan's pencil beams stop at a 50 mm lateral
    #: cutoff from each beamlet, so with >= 50 mm + one bixel nothing is lost; it halves the
    #: work on long scans.
    dose_slab_margin_mm: float = Field(60.0, gt=0)
    #: Proton longitudinal spot spacing (mm water).
    proton_longitudinal_spacing_mm: float = Field(3.0, gt=0)
    #: HU -> relative stopping power / electron density table used by both modalities and the
    #: range proxy (piecewise linear, clamped at the ends).
    hlut_hu: tuple[float, ...] = DEFAULT_HLUT_HU
    hlut_rsp: tuple[float, ...] = DEFAULT_HLUT_RSP
    #: Dose MAE over voxels receiving at least this fraction of the prescription (CT dose).
    mae_threshold_fraction: float = Field(0.9, gt=0, le=1.5)
    #: Conformity index (van't Riet) at this fraction of the prescription isodose. The
    #: challenge's code takes the prescription isodose (its variable is named V95); on a
    #: D95-normalised plan that isodose lies on the PTV's 5th dose percentile, where a 1 % dose
    #: change of a homogeneous plan flips most of the coverage and the CI term saturates. The
    #: 95 % isodose measures conformity instead; 1.0 gives the literal definition.
    conformity_isodose_fraction: float = Field(0.95, gt=0, le=1.5)
    #: DVH metric: at most this many OARs, ranked by (D5 + Dmean) / 2 on the CT dose.
    dvh_max_oars: int = Field(3, ge=0)
    gamma: GammaCriteria = GammaCriteria()
    structures: StructureGeneration = StructureGeneration()
    optimisation: Optimisation = Optimisation()
    #: Range proxy: spacing of the parallel rays across the target's beam's-eye view, and the
    #: sampling step along each ray (mm).
    range_ray_spacing_mm: float = Field(2.0, gt=0)
    range_step_mm: float = Field(0.5, gt=0)

    @model_validator(mode="after")
    def _hlut_consistent(self) -> "DoseProtocol":
        if len(self.hlut_hu) != len(self.hlut_rsp) or len(self.hlut_hu) < 2:
            raise ValueError("hlut_hu and hlut_rsp must have the same length (>= 2)")
        if any(b <= a for a, b in zip(self.hlut_hu, self.hlut_hu[1:])):
            raise ValueError("hlut_hu must be strictly increasing")
        if any(b < a for a, b in zip(self.hlut_rsp, self.hlut_rsp[1:])) or self.hlut_rsp[0] <= 0:
            raise ValueError("hlut_rsp must be positive and non-decreasing")
        return self

    @property
    def stopping_power(self) -> StoppingPowerCurve:
        """The protocol's HU -> RSP curve."""
        return StoppingPowerCurve(self.hlut_hu, self.hlut_rsp)

    def template(self, mode: str) -> BeamTemplate:
        """Beam template of ``'photon'`` or ``'proton'``."""
        if mode not in PLAN_MODES:
            raise ProtocolError(f"no beam template for mode {mode!r}; use one of {PLAN_MODES}")
        return getattr(self, mode)

    def plan_fingerprint(self, mode: str) -> str:
        """SHA-256 of every field that changes the optimised plan of ``mode``."""
        fields = self.model_dump(mode="json")
        relevant = {
            key: fields[key]
            for key in ("version", "dose_grid_mm", "prescription_gy", mode, "hlut_hu", "hlut_rsp", "optimisation",
                        "dose_slab_margin_mm", "plan_normalisation")
        }
        if mode == "proton":
            relevant["proton_longitudinal_spacing_mm"] = fields["proton_longitudinal_spacing_mm"]
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()

    def to_json(self) -> str:
        """Indented JSON form (what is written as ``protocol.json``)."""
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


def load_protocol(path: str | os.PathLike | None = None, **overrides: Any) -> DoseProtocol:
    """Read a protocol from YAML/JSON (or the defaults when ``path`` is None) and apply overrides.

    Raises:
        ProtocolError: unreadable file or invalid value; the message names the field.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as error:
            raise ProtocolError(f"{path}: cannot read dose protocol ({error})") from None
        if not isinstance(loaded, dict):
            raise ProtocolError(f"{path}: a dose protocol must be a mapping of fields")
        data.update(loaded)
    data.update({key: value for key, value in overrides.items() if value is not None})
    try:
        return DoseProtocol.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in issue['loc']) or 'protocol'}: {issue['msg']}"
            for issue in error.errors()
        )
        source = f"{path}: " if path is not None else ""
        raise ProtocolError(f"{source}invalid dose protocol: {problems}") from None
