"""Paired MR/CT phantom cases in the SynthRAD2025 Task 1 layout (docs/phantom.md).

``generate_phantom_dataset`` writes ``<out>/Task1/<REGION>/<pid>/{mr,ct,mask}.mha``: compressed
MetaImage, MR, CT and mask int16 (mask 0/1, as the organisers' release script writes it), all three on one
grid with identity direction. Anatomy comes from :mod:`latent.core.phantom.anatomy`; this module
adds the imaging (partial volume, texture, MR bias field, per-centre gain and contrast, Rician MR
noise, correlated CT noise, field of view, optional metal, CT/MR motion and QA defects
(:mod:`latent.core.phantom.defects`)) and derives the mask from the MR. A case depends only on
``(seed, pid)`` and the options, so adding or removing other cases never changes it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from scipy import ndimage

from latent.core.errors import BadConfigError
from latent.core.io import VolumeProperties, write_volume
from latent.core.phantom.anatomy import (
    LABELS,
    REGION_LENGTH_MM,
    REGIONS,
    SUBSLICES,
    TISSUES,
    Canvas,
    sample_tissue_values,
)
from latent.core.phantom.artefacts import _add_metal, _bias_field, _metal_streaks, _unit_noise, move_ct
from latent.core.phantom.defects import DefectsPerCase, check_defects, defect_plan, inject_defects, record_artefacts
from latent.core.phantom.mask import MASK_DILATION_MM, _mask_from_mr, mask_dilation_voxels  # noqa: F401 (re-exported)
from latent.core.phantom.regions import build_region, sample_body
from latent.core.phantom.truth import write_truth as write_truth_files

logger = logging.getLogger(__name__)

PHANTOM_VERSION = "2"
CENTRES = "ABCDE"
CT_RANGE = (-1024.0, 3071.0)
#: Value outside the scanned field of view (SynthRAD convention).
CT_OUTSIDE_FOV, MR_OUTSIDE_FOV = -1000, 0
#: Empty voxels kept between the body and the in-plane grid border (room for the dilation + air).
GRID_MARGIN_VOXELS = 13
#: CT point-spread function (Gaussian sigma in voxels, z y x).
CT_PSF_VOXELS = (0.35, 0.45, 0.45)
#: Short (small-size) windows compress the region's anatomy craniocaudally to at most this
#: fraction of its length, so a window shows most organs without flattening them absurdly.
MIN_Z_SQUEEZE = 0.6
#: Written mask dtype: the organisers' release script writes every image that is not int16 as
#: int16, masks included (0/1); the official evaluation binarises ``mask > 0``.
MASK_DTYPE = "int16"
#: MR noise is set from the SNR of muscle (relative T1w signal 0.35).
MR_NOISE_REFERENCE = 0.35
#: Body outline threshold on the MR, relative to the centre gain (muscle x weakest bias ~ 0.25).
MR_BODY_THRESHOLD = 0.1


@dataclass(frozen=True)
class CentreProfile:
    """MR acquisition differences between centres.

    ``gain`` sets the scale (in-body 99th percentile ~ 1.07 x gain: ~400 at A to ~1600 at E),
    ``gamma`` the contrast curve applied to the relative T1w signal, ``mr_scale`` per-tissue
    sequence differences.
    """

    gain: float
    gamma: float
    mr_scale: dict[str, float] = field(default_factory=dict)


CENTRE_PROFILES = {
    "A": CentreProfile(380.0, 1.00),
    "B": CentreProfile(650.0, 0.85, {"fluid": 1.4, "muscle": 1.1}),
    "C": CentreProfile(950.0, 1.15, {"fluid": 0.8, "cancellous": 0.9}),
    "D": CentreProfile(1250.0, 0.95, {"muscle": 0.9, "liver": 1.1}),
    "E": CentreProfile(1500.0, 1.08, {"blood": 1.5, "fluid": 1.2}),
}


@dataclass(frozen=True)
class SizeSpec:
    """Grid ranges of a phantom size; in-plane voxel counts are (min, max) per axis (y, x)."""

    pixel_mm: tuple[float, float]
    slice_mm: tuple[float, float]
    slices: tuple[int, int]
    rows: tuple[int, int]
    columns: tuple[int, int]
    scale: tuple[float, float]
    fit_to_max: bool  # True: coarsen the pixel so the body fits; False: grow the grid


#: ``small``: demo/tests, a smaller body (x0.72-0.85) so it fits <= 128 voxels at 1.9-2.9 mm;
#: ``synthrad``: 1 x 1 x 3 mm and SynthRAD-like extents.
SIZES = {
    "small": SizeSpec((1.9, 2.5), (3.0, 4.0), (24, 40), (96, 128), (96, 128), (0.72, 0.85), True),
    "synthrad": SizeSpec((1.0, 1.0), (3.0, 3.0), (60, 120), (250, 450), (300, 500), (0.9, 1.1), False),
}


@dataclass
class PhantomCase:
    """One generated case; arrays are (z, y, x) on the grid ``properties``.

    ``labels`` (uint8, ids in :data:`latent.core.phantom.anatomy.LABELS`, 0 outside the body or the
    field of view) is the tissue map on the MR grid (the CT may be misregistered against it);
    ``fov`` the scanned field of view; ``info`` the sampled acquisition values.
    """

    pid: str
    region: str
    mr: np.ndarray
    ct: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    fov: np.ndarray
    properties: VolumeProperties
    info: dict
    #: the CT before ``misregistration`` / ``deformation`` (same noise and field of view), else None.
    ct_true: np.ndarray | None = None
    #: the true motion, (3, z, y, x) mm: ``ct`` at p is ``ct_true`` at p + motion (truth.py), else None.
    motion_mm: np.ndarray | None = None


def case_ids(cases: int, regions: Sequence[str] = REGIONS) -> list[tuple[str, str]]:
    """``(region, pid)`` of ``cases`` cases: regions round robin, then centres A-E round robin.

    Case i goes to ``regions[i % R]``; within a region the j-th case gets centre ``A..E[j % 5]``
    and number ``j // 5 + 1``, e.g. ``1ABA001, 1HNA001, 1THA001, 1ABB001, ...``.
    """
    regions = _check_regions(regions)
    if cases < 0:
        raise BadConfigError(f"cases must be >= 0, got {cases}")
    if cases > len(regions) * len(CENTRES) * 999:
        raise BadConfigError(f"at most {len(regions) * len(CENTRES) * 999} cases fit three-digit ids")
    out = []
    for i in range(cases):
        j = i // len(regions)
        region = regions[i % len(regions)]
        out.append((region, f"1{region}{CENTRES[j % len(CENTRES)]}{j // len(CENTRES) + 1:03d}"))
    return out


def case_rng(seed: int, pid: str) -> np.random.Generator:
    """Random stream of one case, from ``(seed, pid)`` only."""
    if seed < 0:
        raise BadConfigError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng(np.random.SeedSequence([seed, int.from_bytes(pid.encode(), "little")]))


def generate_phantom_dataset(
    out_dir: Path,
    cases: int,
    regions: Sequence[str] = REGIONS,
    seed: int = 0,
    size: Literal["small", "synthrad"] = "small",
    misregistration: bool = False,
    metal: bool = False,
    defects: Sequence[str] = (),
    defect_fraction: float = 1.0,
    defects_per_case: DefectsPerCase = "all",
    write_truth: bool = False,
) -> list[Path]:
    """Write paired phantom cases as ``<out_dir>/Task1/<REGION>/<pid>/{mr,ct,mask}.mha``.

    Args:
        out_dir: dataset root (created); existing cases with the same ids are overwritten.
        cases: number of cases, spread over ``regions`` and centres (see :func:`case_ids`).
        regions: any of ``"AB", "HN", "TH"``.
        seed: dataset seed; a case depends only on ``(seed, pid)`` and the options.
        size: ``"small"`` (~2 x 2 x 3.5 mm, <= 128 x 128 x 40) or ``"synthrad"`` (1 x 1 x 3 mm).
        misregistration: rigidly move each CT slightly against its MR.
        metal: put one metal object in every case.
        defects: names of :data:`latent.core.phantom.defects.DEFECTS` to inject (none by default).
        defect_fraction: share of the cases that get ``defects`` (chosen from ``seed`` only).
        defects_per_case: ``"all"`` (each chosen case gets every defect) or ``"one"`` (round robin).
        write_truth: also write ``ct_true.mha`` and ``motion_true.mha`` in moved cases (truth.py).

    Returns:
        The case folders, in case order. A ``phantom.json`` with the parameters and, under
        ``defect_cases``, each defective case's ``info["defects"]`` is written to ``out_dir``.
    """
    out_dir = Path(out_dir)
    plan = case_ids(cases, regions)
    chosen = defect_plan([pid for _, pid in plan], defects, defect_fraction, seed, defects_per_case)
    folders, defect_cases = [], {}
    for region, pid in plan:
        started = time.perf_counter()
        case = render_case(pid, region, case_rng(seed, pid), size, misregistration, metal, chosen[pid])
        if case.info["defects"]:
            defect_cases[pid] = case.info["defects"]
        folder = out_dir / "Task1" / region / pid
        write_volume(folder / "mr.mha", case.mr, case.properties, dtype="int16")
        write_volume(folder / "ct.mha", case.ct, case.properties, dtype="int16")
        write_volume(folder / "mask.mha", case.mask, case.properties, dtype=MASK_DTYPE)
        if write_truth and case.ct_true is not None:
            write_truth_files(folder, case.ct_true, case.motion_mm, case.properties)
        folders.append(folder)
        logger.info("phantom %s %s in %.2f s", pid, case.properties.size, time.perf_counter() - started)
    record = {"generator": "latent.core.phantom.generate", "version": PHANTOM_VERSION, "seed": seed, "size": size,
              "regions": list(_check_regions(regions)), "misregistration": misregistration,
              "metal": metal, "mask_dtype": MASK_DTYPE, "cases": [pid for _, pid in plan],
              "defects": list(check_defects(defects)), "defect_fraction": float(defect_fraction),
              "defects_per_case": defects_per_case, "defect_cases": defect_cases,
              **({"write_truth": True} if write_truth else {})}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "phantom.json").write_text(json.dumps(record, indent=2) + "\n")
    return folders


def generate_case(
    pid: str,
    region: str,
    rng: np.random.Generator,
    size: Literal["small", "synthrad"] = "small",
    misregistration: bool = False,
    metal: bool = False,
    defects: Sequence[str] = (),
) -> tuple[np.ndarray, np.ndarray, np.ndarray, VolumeProperties]:
    """One case in memory (``defects``: as in :func:`render_case`).

    Returns:
        ``(mr int16, ct int16, mask uint8, properties)``, arrays (z, y, x) on one grid.
    """
    case = render_case(pid, region, rng, size, misregistration, metal, defects)
    return case.mr, case.ct, case.mask, case.properties


def render_case(
    pid: str,
    region: str,
    rng: np.random.Generator,
    size: Literal["small", "synthrad"] = "small",
    misregistration: bool = False,
    metal: bool = False,
    defects: Sequence[str] = (),
) -> PhantomCase:
    """Like :func:`generate_case` but also returns the tissue labels and sampled parameters.

    ``defects`` names defects of :data:`latent.core.phantom.defects.DEFECTS` (``"metal"`` and
    ``"misregistration"`` are the same as the flags); each one's record is in
    ``info["defects"][name]`` (empty without defects). Without injected defects the case is the
    same, byte for byte, as without the argument.
    """
    _check_pid(pid, region)
    names = check_defects(defects)
    metal, misregistration = metal or "metal" in names, misregistration or "misregistration" in names
    if size not in SIZES:
        raise BadConfigError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
    profile = CENTRE_PROFILES[pid[3]]
    # Fixed draws up front, so the options never shift the anatomy's random stream.
    anatomy_rng, mr_rng, ct_rng, metal_rng, motion_rng, grid_rng = (
        np.random.default_rng(s) for s in rng.integers(0, 2**63, size=6)
    )
    spec = SIZES[size]
    scale = grid_rng.uniform(*spec.scale)
    body = sample_body(region, anatomy_rng, scale)
    grid = _sample_grid(spec, body, region, scale, grid_rng)
    values = sample_tissue_values(anatomy_rng, grid["spacing_zyx"][2], scale, profile.mr_scale)
    canvas = Canvas(grid["x"], grid["y"], grid["t_sub"], grid["z_sub"], grid["length_mm"], scale, values)
    site = build_region(canvas, region, body, anatomy_rng)
    info = {"centre": pid[3], "scale": scale, "t_range": (float(canvas.t[0]), float(canvas.t[-1])), "defects": {}}
    void = None
    if metal:
        void = _add_metal(canvas, site, metal_rng, info)
    _texture_and_blur(canvas, anatomy_rng)
    mr = _mr_signal(canvas, profile, void, mr_rng, info)
    ct = canvas.ct
    if metal:
        streaks = _metal_streaks(canvas, site, metal_rng)
        ct += streaks
        info["metal_streak_slices"] = [int(z) for z in np.flatnonzero(np.abs(streaks).max(axis=(1, 2)) > 0)]
    deformation = "deformation" in names
    aligned = ct.copy() if misregistration or deformation else None
    ct, motion_mm = move_ct(ct, grid["spacing_zyx"], motion_rng, misregistration, deformation, info)
    noise_sd = ct_rng.uniform(10.0, 20.0)
    noise = noise_sd * _unit_noise(ct_rng, ct.shape, (0.0, 0.6, 0.6))
    ct += noise
    info["ct_noise_hu"] = noise_sd
    fov = _field_of_view(ct.shape, grid_rng)
    if set(names) - {"metal", "misregistration", "deformation"}:  # drawn after the fixed draws: the clean case is unchanged
        fov = inject_defects(names, rng, mr, ct, fov, canvas.label, grid["spacing_zyx"], info)
    mask = _mask_from_mr(mr, MR_BODY_THRESHOLD * info["mr_gain"], mask_dilation_voxels(grid["spacing_zyx"][2])) & fov
    mr[~fov], ct[~fov], canvas.label[~fov] = MR_OUTSIDE_FOV, CT_OUTSIDE_FOV, 0
    ct = np.rint(np.clip(ct, *CT_RANGE)).astype(np.int16)
    mr = np.rint(np.clip(mr, 0, np.iinfo(np.int16).max)).astype(np.int16)
    record_artefacts(info, canvas.label, fov, metal, void, misregistration, deformation)
    truth = None if aligned is None else np.rint(np.clip(np.where(fov, aligned + noise, CT_OUTSIDE_FOV), *CT_RANGE))
    return PhantomCase(pid, region, mr, ct, mask.astype(np.uint8), canvas.label, fov, grid["properties"], info,
                       None if truth is None else truth.astype(np.int16), motion_mm)


# -- grid --------------------------------------------------------------------------------------
def _sample_grid(spec: SizeSpec, body: dict, region: str, scale: float, rng) -> dict:
    pixel = rng.uniform(*spec.pixel_mm)
    half = np.array([body["half_y"], body["half_x"]])
    limits = np.array([spec.rows, spec.columns])
    if spec.fit_to_max:  # coarsen the pixel until the body plus margin fits the largest grid
        pixel = max(pixel, float((2 * half / (limits[:, 1] - 2 * GRID_MARGIN_VOXELS - 1)).max()))
    need = np.ceil(2 * half / pixel).astype(int) + 2 * GRID_MARGIN_VOXELS
    wanted = need + rng.integers(0, 9, size=2) if spec.fit_to_max else np.maximum(
        need, [rng.integers(lo, (lo + hi) // 2) for lo, hi in limits])
    shape_yx = np.clip(wanted, limits[:, 0], np.maximum(limits[:, 1], need))
    slack = (shape_yx - need) / 2
    centre = (shape_yx - 1) / 2 + rng.uniform(-0.8, 0.8, size=2) * slack
    rows, cols = ((np.arange(n) - c) * pixel for n, c in zip(shape_yx, centre))
    nz, dz = int(rng.integers(spec.slices[0], spec.slices[1] + 1)), rng.uniform(*spec.slice_mm)
    window = nz * dz
    anatomy = REGION_LENGTH_MM[region] * scale
    # short windows see the anatomy compressed craniocaudally, but never below MIN_Z_SQUEEZE
    length = max(min(window, anatomy) * rng.uniform(1.05, 1.3), MIN_Z_SQUEEZE * anatomy)
    t0 = rng.uniform(0, 1 - window / length) if window <= length else -(window / length - 1) * rng.uniform(0.3, 0.7)
    offsets = (np.arange(SUBSLICES) + 0.5) / SUBSLICES - 0.5
    z_sub = (np.arange(nz)[:, None] + 0.5 + offsets[None, :]) * dz
    spacing = (pixel, pixel, dz)
    origin = (float(-centre[1] * pixel + rng.uniform(-20, 20)), float(-centre[0] * pixel + rng.uniform(-40, 40)),
              float(rng.uniform(-600.0, 0.0)))
    properties = VolumeProperties(spacing=tuple(float(v) for v in spacing), origin=origin,
                                  direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
                                  size=(int(shape_yx[1]), int(shape_yx[0]), nz), dtype="int16")
    return {"x": cols, "y": rows, "z_sub": z_sub, "t_sub": t0 + z_sub / length, "length_mm": length,
            "spacing_zyx": (dz, pixel, pixel), "properties": properties}


def _field_of_view(shape, rng) -> np.ndarray:
    """Scanned field of view: a reconstruction circle that may clip the grid corners and, in
    some cases, one or two end slices the MR did not cover."""
    nz, ny, nx = shape
    yy, xx = np.ogrid[:ny, :nx]
    radius = rng.uniform(0.9, 1.15) * 0.5 * np.hypot(ny, nx)
    disk = (yy - (ny - 1) / 2) ** 2 + (xx - (nx - 1) / 2) ** 2 <= radius**2
    slices = np.ones(nz, bool)
    if rng.random() < 0.3:
        cut = int(rng.integers(1, 3))
        if rng.random() < 0.5:
            slices[:cut] = False
        else:
            slices[-cut:] = False
    return disk[None] & slices[:, None, None]


# -- tissue appearance ---------------------------------------------------------------------------
def _lookup(attribute: str) -> np.ndarray:
    table = np.zeros(max(LABELS) + 1, np.float32)
    for tissue in TISSUES.values():
        table[tissue.label] = getattr(tissue, attribute)
    return table


def _texture_and_blur(cv: Canvas, rng) -> None:
    """Within-tissue heterogeneity (one field for CT and MR, so they correlate) and the CT's
    reconstruction blur. The MR keeps only the shapes' own partial volume: a further blur
    would wash the MR-dark cortex into its bright marrow and fat neighbours."""
    texture = _unit_noise(rng, cv.ct.shape, (0.5, 1.0, 1.0))
    cv.ct += _lookup("texture_hu")[cv.label] * texture
    cv.mr *= 1 + _lookup("texture_mr")[cv.label] * texture
    cv.ct[...] = ndimage.gaussian_filter(cv.ct, CT_PSF_VOXELS, truncate=3.0)


def _mr_signal(cv: Canvas, profile: CentreProfile, void, rng, info: dict) -> np.ndarray:
    """Relative T1w map -> scanner MR: contrast curve, metal void, bias field, gain, Rician noise."""
    relative = np.maximum(cv.mr, 0) ** profile.gamma
    if void is not None:
        occupancy, box = void
        relative[box] *= 1 - occupancy
    gain = profile.gain * rng.uniform(0.92, 1.08)
    amplitude = rng.uniform(0.2, 0.3)
    signal = gain * _bias_field(relative.shape, amplitude, rng) * relative
    snr = rng.uniform(20.0, 40.0)
    sigma = gain * MR_NOISE_REFERENCE / snr
    real = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    info.update(mr_gain=gain, mr_gamma=profile.gamma, mr_bias_amplitude=amplitude, mr_snr_muscle=snr,
                mr_noise_sigma=sigma)
    return np.sqrt(real**2 + imaginary**2)


# -- validation ------------------------------------------------------------------------------------
def _check_regions(regions: Sequence[str]) -> tuple[str, ...]:
    regions = tuple(regions)
    bad = [r for r in regions if r not in REGIONS]
    if bad or not regions or len(set(regions)) != len(regions):
        raise BadConfigError(f"regions must be distinct values of {REGIONS}, got {regions}")
    return regions


def _check_pid(pid: str, region: str) -> None:
    if region not in REGIONS:
        raise BadConfigError(f"unknown region {region!r}; expected one of {REGIONS}")
    if (len(pid) != 7 or pid[0] != "1" or pid[1:3] != region or pid[3] not in CENTRES
            or not pid[4:].isdigit()):
        raise BadConfigError(f"patient id {pid!r} must be '1' + {region} + centre A-E + 3 digits, e.g. 1{region}A005")
