"""Structural bias (StructB): systematic shape differences between real and synthetic CTs of a cohort.

Per structure (bone, body), each case's binary mask of the real CT and of the sCT is put on one
common grid, the masks are averaged voxel-wise over the cases, and the two mean masks are
compared (docs/metrics.md):

    StructB = 2 ||mean(m_y) - mean(m_yhat)||_2 / (sqrt(N) (avg mean(m_y) + avg mean(m_yhat)))

with N the voxels of the common grid and avg the spatial mean. 0 when the mean masks agree.
The common grid is a fixed-shape canonical grid (:mod:`latent.core.grid`) placed on each case's
mask as ``latent encode`` places it; CT and sCT are resampled linearly and then thresholded.
Arrays are (z, y, x).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from latent.core.grid import CanonicalGrid, GridError, parse_grid_spec, plan_mapping, to_canonical
from latent.core.io import VolumeProperties
from latent.evaluation.metrics import BONE_HU

#: The common grid by default: a fixed SynthRAD preset (3 mm, 96 x 160 x 160, 48 x 48 x 29 cm)
#: that holds a whole head, thorax or abdomen, so no case is cropped and N is the same for all.
STRUCTB_GRID = "synthrad-3mm"
#: Lowest HU of the body structure: the air / soft-tissue boundary of the tissue classes.
BODY_HU = -500.0
#: Structure -> lowest HU of the real or synthetic CT that belongs to it (inside the case's mask).
STRUCTURES: dict[str, float] = {"bone": BONE_HU, "body": BODY_HU}
#: Value of CT and sCT where the common grid lies outside the native field of view (air).
OUTSIDE_HU = -1024.0


def structural_bias(mean_real: np.ndarray, mean_synthetic: np.ndarray) -> float:
    """StructB of two mean masks on one grid (values in [0, 1], any shape).

    Returns:
        ``2 ||mean_real - mean_synthetic||_2 / (sqrt(N) (avg mean_real + avg mean_synthetic))``;
        NaN when neither mask has a voxel (the structure is absent from both cohorts).

    Raises:
        ValueError: the two mean masks differ in shape or are empty.
    """
    real, synthetic = np.asarray(mean_real, dtype=np.float64), np.asarray(mean_synthetic, dtype=np.float64)
    if real.shape != synthetic.shape or real.size == 0:
        raise ValueError(f"structural_bias: mean masks must share one non-empty shape, got {real.shape} "
                         f"and {synthetic.shape}")
    scale = real.mean() + synthetic.mean()
    if scale == 0.0:
        return math.nan
    return float(2.0 * np.linalg.norm(real - synthetic) / (math.sqrt(real.size) * scale))


def cohort_structural_bias(real_masks: Sequence[np.ndarray], synthetic_masks: Sequence[np.ndarray]) -> float:
    """StructB of a cohort: one real and one synthetic binary mask per case, all on one grid."""
    if len(real_masks) != len(synthetic_masks) or not real_masks:
        raise ValueError(f"cohort_structural_bias: need as many real as synthetic masks (at least one), got "
                         f"{len(real_masks)} and {len(synthetic_masks)}")
    return structural_bias(np.mean([np.asarray(m) > 0 for m in real_masks], axis=0),
                           np.mean([np.asarray(m) > 0 for m in synthetic_masks], axis=0))


def structb_grid(spec: str) -> CanonicalGrid:
    """The common grid of a spec (:func:`latent.core.grid.parse_grid_spec`); it must have one shape.

    Raises:
        GridError: naming ``--structb-grid``, for a bad spec or a fitted one (a shape per case).
    """
    try:
        grid = parse_grid_spec(spec)
    except GridError as error:
        raise GridError(f"--structb-grid: {error}") from None
    if grid.is_fit:
        raise GridError(f"--structb-grid {spec}: StructB needs one shape for every case; give a fixed shape, "
                        f"e.g. {STRUCTB_GRID}")
    return grid


@dataclass(frozen=True)
class CaseStructures:
    """One case's structure masks on the common grid, bit-packed (what a worker process sends back)."""

    shape: tuple[int, int, int]
    #: structure -> (packed real mask, packed synthetic mask)
    packed: dict[str, tuple[np.ndarray, np.ndarray]]

    def masks(self, structure: str) -> tuple[np.ndarray, np.ndarray]:
        """``(real, synthetic)`` boolean masks of ``structure``, of shape :attr:`shape`."""
        count = math.prod(self.shape)
        return tuple(np.unpackbits(bits, count=count).reshape(self.shape).astype(bool)
                     for bits in self.packed[structure])  # type: ignore[return-value]


def case_structures(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray, properties: VolumeProperties,
                    grid: CanonicalGrid) -> CaseStructures:
    """Each structure of :data:`STRUCTURES` in the real and the synthetic CT, on ``grid`` placed on the mask.

    Args:
        ct, sct, mask: one case's native (z, y, x) arrays; ``mask > 0`` marks the evaluated voxels.
        properties: their native geometry.
        grid: the fixed-shape common grid.
    """
    mapping = plan_mapping(mask > 0, properties, grid)
    inside = to_canonical(mask > 0, mapping, is_mask=True).astype(bool)
    real = to_canonical(ct, mapping, pad_value=OUTSIDE_HU)
    synthetic = to_canonical(sct, mapping, pad_value=OUTSIDE_HU)
    packed = {name: (np.packbits((real >= low) & inside), np.packbits((synthetic >= low) & inside))
              for name, low in STRUCTURES.items()}
    return CaseStructures(tuple(int(s) for s in grid.shape), packed)


@dataclass
class _Sums:
    """Per structure, the voxel-wise counts of cases whose real / synthetic mask holds the voxel."""

    count: int = 0
    real: dict[str, np.ndarray] = field(default_factory=dict)
    synthetic: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, case: CaseStructures) -> None:
        for name in STRUCTURES:
            real, synthetic = case.masks(name)
            self.real[name] = self.real.get(name, 0) + real.astype(np.int32)
            self.synthetic[name] = self.synthetic.get(name, 0) + synthetic.astype(np.int32)
        self.count += 1

    def merged(self, other: "_Sums") -> "_Sums":
        return _Sums(self.count + other.count, {n: self.real.get(n, 0) + other.real[n] for n in other.real},
                     {n: self.synthetic.get(n, 0) + other.synthetic[n] for n in other.synthetic})

    def structb(self) -> dict[str, float]:
        return {name: structural_bias(self.real[name] / self.count, self.synthetic[name] / self.count)
                for name in STRUCTURES}


def structb_by_region(cases: Iterable[tuple[str, CaseStructures]], grid: CanonicalGrid) -> dict:
    """StructB per region and over every case (region ``"all"``) of ``(region, structures)`` pairs.

    Returns:
        ``{"grid", "structures" (name -> definition), "regions": [{"region", "n", <structure>: StructB}]}``;
        no region entry when there is no case.
    """
    sums: dict[str, _Sums] = {}
    for region, structures in cases:
        sums.setdefault(str(region), _Sums()).add(structures)
    groups = {region: sums[region] for region in sorted(sums)}
    if sums:
        everything = _Sums()
        for region_sums in sums.values():
            everything = everything.merged(region_sums)
        groups["all"] = everything
    return {"grid": grid.spec(),
            "structures": {name: f"HU >= {low:g} inside the mask" for name, low in STRUCTURES.items()},
            "regions": [{"region": group, "n": entry.count, **entry.structb()} for group, entry in groups.items()]}


def format_structb(result: Mapping) -> str:
    """Markdown table of :func:`structb_by_region` output (3 decimals)."""
    names = list(STRUCTURES)
    lines = [f"StructB on the common grid {result['grid']} (0: the mean masks agree)",
             "| region | n | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for entry in result["regions"]:
        lines.append(f"| {entry['region']} | {entry['n']} | "
                     + " | ".join("n/a" if math.isnan(entry[n]) else f"{entry[n]:.3f}" for n in names) + " |")
    return "\n".join(lines)
