"""Structures for planning: body from the mask, target and OARs from a file or generated.

A case may carry a structure file next to its volumes: ``structures.mha`` (or ``.nii.gz``), a
label map on the case grid, with ``structures.json`` mapping labels to names and types::

    {"labels": {"1": {"name": "PTV", "type": "target"}, "2": {"name": "Cord", "type": "oar"}}}

Without one (SynthRAD ships none), a target and organs at risk are generated reproducibly
inside the body (see :class:`latent.evaluation.dose.protocol.StructureGeneration`) and written out in the
same format, so the plan can be inspected and the file fed back as input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from latent.core.errors import InputError
from latent.core.io import VolumeProperties, read_volume, write_volume
from latent.evaluation.dose.dose_grid import index_to_world, world_to_index
from latent.evaluation.dose.protocol import StructureGeneration

STRUCTURE_STEMS = ("structures.mha", "structures.nii.gz", "structures.nii", "structures.nrrd")
STRUCTURE_KINDS = ("target", "oar")
#: Structures are generated on the native mask subsampled to about this spacing (mm), which
#: keeps the distance transform cheap on SynthRAD-size volumes and independent of the dose grid.
GENERATION_SPACING_MM = 3.0
#: Candidate OAR directions (LPS unit vectors) and the names they give, in the order tried.
OAR_DIRECTIONS = (
    ("OAR_left", (1.0, 0.0, 0.0)),
    ("OAR_right", (-1.0, 0.0, 0.0)),
    ("OAR_anterior", (0.0, -1.0, 0.0)),
    ("OAR_posterior", (0.0, 1.0, 0.0)),
)


class StructureError(InputError, ValueError):
    """A structure file is invalid, or structures cannot be generated for this body."""


@dataclass(frozen=True)
class Structure:
    """One named structure: ``kind`` is ``'target'`` or ``'oar'``; ``mask`` is (z, y, x) bool."""

    name: str
    kind: str
    mask: np.ndarray


def find_structure_file(case_folder: Path) -> Path | None:
    """The case's structure label map, when it has one."""
    for stem in STRUCTURE_STEMS:
        if (case_folder / stem).is_file():
            return case_folder / stem
    return None


def read_structure_file(path: Path, grid: VolumeProperties) -> list[Structure]:
    """Structures of a label map + ``structures.json`` sidecar, checked against the case grid."""
    sidecar = path.parent / "structures.json"
    if not sidecar.is_file():
        raise StructureError(f"{path}: needs {sidecar.name} beside it (label -> name, type)")
    try:
        labels = json.loads(sidecar.read_text())["labels"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise StructureError(f"{sidecar}: expected {{\"labels\": {{\"1\": {{\"name\", \"type\"}}}}}} ({error})") from None
    label_map, properties = read_volume(path)
    differences = grid.grid_differences(properties)
    if differences:
        raise StructureError(f"{path}: not on the case grid: {'; '.join(differences)}")
    structures = []
    for label, entry in sorted(labels.items(), key=lambda item: int(item[0])):
        kind = str(entry.get("type", "")).lower()
        if kind not in STRUCTURE_KINDS:
            raise StructureError(f"{sidecar}: label {label} type {entry.get('type')!r}; use target or oar")
        mask = label_map == int(label)
        if not mask.any():
            raise StructureError(f"{path}: label {label} ({entry.get('name')}) is empty")
        structures.append(Structure(str(entry.get("name", f"label{label}")), kind, mask))
    return structures


def write_structure_file(folder: Path, structures: list[Structure], grid: VolumeProperties, note: dict | None = None) -> Path:
    """Write ``structures.mha`` (uint8 labels 1..n in list order) and ``structures.json``."""
    label_map = np.zeros(structures[0].mask.shape, dtype=np.uint8)
    labels = {}
    for label, structure in enumerate(structures, start=1):
        label_map[structure.mask & (label_map == 0)] = label
        labels[str(label)] = {"name": structure.name, "type": structure.kind}
    path = write_volume(folder / "structures.mha", label_map, grid, dtype="uint8")
    (folder / "structures.json").write_text(json.dumps({"labels": labels, **(note or {})}, indent=2) + "\n")
    return path


def _sphere(shape: tuple[int, ...], grid: VolumeProperties, centre: np.ndarray, radius: float) -> np.ndarray:
    """Voxels of a (z, y, x) grid whose centres lie within ``radius`` mm of world ``centre``."""
    mask = np.zeros(shape, dtype=bool)
    reach = radius / min(grid.spacing) + 1
    centre_index = world_to_index(centre[None, :], grid)[0][::-1]  # (z, y, x)
    low = np.maximum(np.floor(centre_index - reach).astype(int), 0)
    high = np.minimum(np.ceil(centre_index + reach).astype(int) + 1, shape)
    if np.any(high <= low):
        return mask
    block = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(low, high)], indexing="ij"), axis=-1)
    world = index_to_world(block.reshape(-1, 3)[:, ::-1], grid)
    inside = np.linalg.norm(world - centre, axis=1) <= radius
    mask[tuple(slice(a, b) for a, b in zip(low, high))] = inside.reshape(block.shape[:3])
    return mask


def _depth_map(body: np.ndarray, grid: VolumeProperties) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Distance (mm) to the body surface on a subsampled grid, and the subsampling strides (z, y, x)."""
    spacing_zyx = np.asarray(grid.spacing[::-1])
    strides = tuple(int(max(1, round(GENERATION_SPACING_MM / s))) for s in spacing_zyx)
    coarse = body[:: strides[0], :: strides[1], :: strides[2]]
    padded = np.pad(coarse, 1)  # the volume border counts as outside the body
    depth = ndimage.distance_transform_edt(padded, sampling=spacing_zyx * strides)[1:-1, 1:-1, 1:-1]
    return depth, strides


def generate_structures(body: np.ndarray, grid: VolumeProperties, settings: StructureGeneration) -> list[Structure]:
    """A sphere PTV and up to ``n_oars`` adjacent spherical OARs inside ``body`` (z, y, x).

    Deterministic: the same body, grid and settings always give the same structures.

    Raises:
        StructureError: the body is too thin for the PTV, or the given centre is outside it.
    """
    depth, strides = _depth_map(body, grid)
    radius = settings.ptv_radius_mm

    def depth_at(point: np.ndarray) -> float:
        index = np.round(world_to_index(point[None, :], grid)[0][::-1] / strides).astype(int)
        if np.any(index < 0) or np.any(index >= depth.shape):
            return 0.0
        return float(depth[tuple(index)])

    if settings.ptv_center_mm is not None:
        centre = np.asarray(settings.ptv_center_mm, dtype=np.float64)
        if depth_at(centre) < radius:
            raise StructureError(
                f"structures.ptv_center_mm {tuple(centre)} is {depth_at(centre):.1f} mm inside the body; "
                f"a {radius:g} mm PTV needs at least {radius:g} mm"
            )
    else:
        slices = np.flatnonzero(depth.max(axis=(1, 2)) > 0)
        first, last = slices[0], slices[-1]
        third = (last - first + 1) / 3.0
        central = slice(int(first + np.floor(third)), int(first + np.ceil(2 * third)))
        band = depth[central]
        deepest = float(band.max())
        if deepest < radius:
            raise StructureError(
                f"body too thin for a {radius:g} mm PTV (deepest point {deepest:.1f} mm inside): "
                "lower structures.ptv_radius_mm or give a structure file"
            )
        # The depth map is flat along the medial axis of the body: among the points within one
        # generation voxel of the deepest, take the one nearest the body's centroid in the band.
        candidates = np.argwhere(band >= deepest - GENERATION_SPACING_MM)
        centroid = np.argwhere(band > 0).mean(axis=0)
        physical = np.asarray(grid.spacing[::-1]) * strides
        best = candidates[np.argmin((((candidates - centroid) * physical) ** 2).sum(axis=1))]
        coarse_index = np.array([best[0] + central.start, best[1], best[2]]) * strides
        centre = index_to_world(coarse_index[::-1][None, :].astype(np.float64), grid)[0]
    structures = [Structure("PTV", "target", _sphere(body.shape, grid, centre, radius) & body)]
    offset = radius + settings.oar_gap_mm + settings.oar_radius_mm
    for name, direction in OAR_DIRECTIONS:
        if len(structures) - 1 >= settings.n_oars:
            break
        oar_centre = centre + offset * np.asarray(direction)
        if depth_at(oar_centre) >= settings.oar_radius_mm:
            mask = _sphere(body.shape, grid, oar_centre, settings.oar_radius_mm) & body & ~structures[0].mask
            structures.append(Structure(name, "oar", mask))
    return structures


def case_structures(
    case_folder: Path, body: np.ndarray, grid: VolumeProperties, settings: StructureGeneration
) -> tuple[list[Structure], str]:
    """Structures of a case and where they came from (``file``, ``file+generated target``, ``generated``)."""
    path = find_structure_file(case_folder)
    if path is None:
        return generate_structures(body, grid, settings), "generated"
    from_file = read_structure_file(path, grid)
    if any(structure.kind == "target" for structure in from_file):
        return from_file, "file"
    target = generate_structures(body, grid, settings.model_copy(update={"n_oars": 0}))[0]
    occupied = np.zeros_like(body)
    for structure in from_file:
        occupied |= structure.mask
    return [Structure(target.name, "target", target.mask & ~occupied), *from_file], "file+generated target"
