"""Typed settings of ``latent qa`` (:class:`QAConfig`): every threshold, with the defaults of the
SynthRAD2025 Task 1 review the project follows (docs/qa.md)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from latent.core.errors import BadConfigError
from latent.core.recipes import format_validation_errors

#: Features whose cohort MAD z-score raises a flag by default (region-insensitive on purpose:
#: a thorax has more air than a pelvis, so air fraction and NMI are judged by rules instead).
DEFAULT_Z_FEATURES = ("ct_soft_median", "ct_p99", "mr_cv", "bias_field_ratio")
#: Smallest MAD used per feature, in the feature's unit: a cohort of near-identical cases must not
#: turn a few HU of noise into a z-score outlier.
DEFAULT_MAD_FLOORS = {"ct_soft_median": 25.0, "ct_mean": 15.0, "ct_std": 15.0, "ct_p99": 50.0,
                      "mr_cv": 0.03, "bias_field_ratio": 0.1, "nmi_before": 0.01}


class QAConfig(BaseModel):
    """Every threshold of the per-case descriptors, the rules, the cohort statistics and the labels."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    # -- CT
    metal_hu: float = Field(2900.0, description="CT voxels >= this are metal candidates (HU)")
    metal_fraction_hu: tuple[float, float] = Field((2900.0, 3000.0), description="HU of the two high-HU fractions")
    air_hu: float = Field(-800.0, description="CT voxels <= this are air (HU)")
    soft_range_hu: tuple[float, float] = Field((-500.0, 1000.0), description="HU range of ct_soft_median")
    # -- metal
    metal_min_mm3: float = Field(5.0, ge=0, description="smallest metal component kept (mm^3)")
    metal_margin_mm: float = Field(20.0, ge=0, description="metal is searched in the mask grown by this (mm)")
    metal_large_mm3: float = Field(2000.0, gt=0, description="metal volume that makes a case RED (mm^3)")
    streak_hu: float = Field(-900.0, description="streak voxels near metal are <= this (HU)")
    streak_radius_mm: float = Field(15.0, gt=0, description="neighbourhood of the metal searched for streaks (mm)")
    streak_ratio_max: float = Field(0.2, ge=0, le=1, description="streak ratio above this is named")
    void_ratio: float = Field(0.5, gt=0, description="MR mean in the metal / MR median in the mask below this: a void")
    # -- MR
    mr_dark_fraction: float = Field(0.05, gt=0, lt=1, description="MR below this share of its p99 is dark")
    mr_flat_std: float = Field(1e-3, ge=0, description="local MR std / p99 below this is flat")
    banding_z: float = Field(5.0, gt=0, description="robust z of a slice-to-slice log-ratio that is a jump")
    banding_min_log: float = Field(0.1, gt=0, description="smallest |log-ratio| of a jump (0.1: about 10 %)")
    banding_same_hu: float = Field(50.0, gt=0, description="voxels whose CT changes less than this between slices "
                                                         "are the same tissue and judge the MR's slice gain (HU)")
    banding_max_slices: int = Field(20, ge=1, description="widest band between an up and a down jump (slices)")
    banding_lone_jumps: bool = Field(False, description="a gain jump that does not come back flags a slice too "
                                                        "(off: on phantoms they were anatomy, not banding)")
    bias_sigma_mm: float = Field(25.0, gt=0, description="smoothing of the MR for the bias field (mm)")
    bias_field_max: float = Field(3.0, gt=1, description="bias-field p95/p5 above this is named")
    # -- geometry and field of view
    border_contact_max: dict[str, float] = Field(
        default_factory=lambda: {"x": 0.02, "y": 0.02, "z": 1.0},
        description="share of a border face's voxels in the mask above which the body touches it, per axis "
                    "(z: 1.0 = never, scans are cut in z)")
    min_slice_voxels: int = Field(50, ge=1, description="slices with fewer mask voxels are not judged")
    slice_air_share: float = Field(0.5, gt=0, le=1, description="share of a slice's mask on CT air that flags it")
    slice_dark_share: float = Field(0.5, gt=0, le=1, description="share of a slice's mask on dark MR that flags it")
    slice_excess: float = Field(0.2, ge=0, le=1, description="... and by how much it exceeds the case's median slice")
    slices_red_fraction: float = Field(0.25, gt=0, le=1, description="flagged share of body slices that makes RED")
    # -- local MR / CT / mask disagreement (latent.core.qa.mismatch)
    void_soft_hu: tuple[float, float] = Field((-300.0, 150.0), description="CT HU of soft tissue under an MR void "
                                              "(denser tissue, tendon or bone, is dark in a T1w MR anyway)")
    void_min_mm3: float = Field(700.0, ge=0, description="smallest MR signal void named (mm^3)")
    void_min_slices: int = Field(2, ge=1, description="... spanning at least this many slices")
    one_modality_mr_fraction: float = Field(0.15, gt=0, description="MR above this share of its p99 in the mask is "
                                            "tissue (lungs and gas stay below it)")
    one_modality_ct_hu: float = Field(-500.0, description="CT above this is tissue (HU)")
    one_modality_min_mm3: float = Field(300.0, ge=0, description="smallest tissue in one modality only named (mm^3)")
    fov_edge_share: float = Field(0.1, gt=0, le=1, description="share of a slice's mask edge on CT tissue: FOV cut")
    fov_min_edge_voxels: int = Field(20, ge=1, description="slices with a shorter mask edge are not judged")
    # -- alignment
    nmi_bins: int = Field(32, ge=8)
    nmi_low: float = Field(1.03, description="NMI below this: low CT-MR similarity (RED)")
    nmi_gain: float = Field(0.01, ge=0, description="NMI gain of the rigid registration above this: misregistered")
    rigid_motion_mm: float = Field(0.4, gt=0, description="mean in-plane motion (mm) of the rigid registration in "
                                   "the mask above this: misregistered (aligned phantoms: <= 0.15)")
    registration: bool = Field(True, description="run the rigid registration (off: NMI after = before, no motion)")
    # -- cohort
    z_threshold: float = Field(3.5, gt=0, description="|MAD z| above this is a cohort outlier")
    z_features: tuple[str, ...] = Field(DEFAULT_Z_FEATURES, description="features whose z-score raises a flag")
    mad_floors: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_MAD_FLOORS))
    min_group: int = Field(3, ge=2, description="z-scores within a region that has this many cases (others pooled)")
    forest_min_cases: int = Field(8, ge=2, description="fewer cases: no isolation forest (noted)")
    forest_contamination: float = Field(0.05, gt=0, le=0.5)
    forest_seed: int = 0
    forest_makes_yellow: bool = Field(False, description="an isolation-forest outlier alone makes YELLOW")
    # -- report
    worst_slices: int = Field(3, ge=1, le=10, description="overlay slices per flagged case in qa.html")


def load_qa_config(path: str | os.PathLike | None) -> QAConfig:
    """A :class:`QAConfig` from a YAML/JSON mapping of its fields (defaults without a path).

    Raises:
        BadConfigError: an unreadable file, or a field that is unknown or out of range (named).
    """
    if path is None:
        return QAConfig()
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise BadConfigError(f"--config {path}: no such file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise BadConfigError(f"--config {path}: not valid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(raw, dict):
        raise BadConfigError(f"--config {path}: a QA config is a mapping of fields, got {type(raw).__name__}")
    try:
        config = QAConfig.model_validate(raw)
    except ValidationError as error:
        raise BadConfigError(format_validation_errors(error, f"QA config {path}")) from None
    unknown = sorted(set(config.border_contact_max) - set("xyz"))
    if unknown:
        raise BadConfigError(f"QA config {path}: border_contact_max: unknown axis {unknown[0]!r}; axes are x, y, z")
    return config
