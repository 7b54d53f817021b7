"""How ``latent register`` registers and what it accepts (docs/registration.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: Every ``--method``: elastix's two, and the semantic metric on frozen network features.
METHODS = ("rigid", "bspline", "feature")


class FeatureSettings(BaseModel):
    """``--method feature``: frozen-feature similarity over a smooth displacement (docs/registration.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vae: str = Field("standin", description="frozen VAE whose first encoder level gives the features (--feature-vae)")
    network: str | None = Field(None, description="instead of the VAE: a weights folder of a frozen MONAI segmentation "
                                "network (latent.core.segmentation_network; --feature-network)")
    network_layers: tuple[str, ...] = Field((), description="its layers whose outputs are the features (empty: the "
                                            "folder's config.json 'layers')")
    initial: Literal["rigid", "identity"] = Field(
        "rigid", description="start from elastix's rigid result (rigid.txt) or from no motion")
    grid_spacing_mm: float = Field(32.0, gt=0, description="control-point spacing of the displacement grid")
    in_plane_only: bool = Field(True, description="fit only the in-plane (y, x) components of the smooth part: "
                                "the slices stay where the start put them (off: it slid deformed phantoms along z)")
    feature_spacing_mm: float = Field(4.0, gt=0, description="finest working voxel: the features are averaged "
                                      "down to about this size along each axis (never below the image's)")
    levels: int = Field(2, ge=1, le=4, description="resolutions (each half the next), coarse to fine")
    steps: int = Field(60, ge=1, description="Adam steps per resolution")
    lr_mm: float = Field(0.03, gt=0, description="Adam step size (mm of control-point displacement)")
    smoothness: float = Field(100.0, ge=0, description="weight of the squared displacement gradient on the grid")
    anchor: float = Field(0.0, ge=0, description="weight of the mean squared displacement (in grid spacings): "
                          "holds still what the features do not see")
    window: int = Field(5, ge=3, description="window (voxels) of the local correlation")


@dataclass(frozen=True)
class RegisterSettings:
    """How ``latent register`` registers and what it accepts (docs/registration.md)."""

    method: str = "rigid"
    #: another folder of parameter maps named like the shipped ones (None: latent/configs/elastix).
    parameter_dir: Path | None = None
    #: bins of the NMI in the mask (the same measure as ``latent qa``).
    nmi_bins: int = 32
    #: a registration whose NMI falls by more than this is a failure (diverged; 0: any fall).
    nmi_tolerance: float = 0.0
    #: a transform folding more than this share of the mask is a failure.
    max_negative_jacobian: float = 0.001
    #: elastix (and torch) threads per case.
    threads: int = 1
    #: ``--method feature`` only.
    feature: FeatureSettings = field(default_factory=FeatureSettings)
