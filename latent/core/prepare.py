"""One case from native files to normalised canonical-grid volumes (the encoder's input).

Used by ``latent encode``, ``latent vae fit`` and end-to-end prediction, so every route sees
the same resampling and normalisation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from latent.core.errors import BadFileError, InputError
from latent.core.cases import Case, CaseError, check_case_grid
from latent.core.grid import (FIT_MULTIPLE, CanonicalGrid, GridMapping, auto_grid, body_extent_mm, missing_mm, parse_grid_spec, plan_mapping,
                         to_canonical)
from latent.core.intensity import (CT_PAD_HU, MRScaling, check_ct_range, check_mask_values, ct_to_full, ct_to_vae,
                              fit_mr_scaling, mr_to_unit)
from latent.core.io import VolumeError, VolumeProperties, read_volume

#: Input problems a batch job records per case (anything else is a bug and propagates).
CASE_ERRORS = (InputError, FileNotFoundError, PermissionError)
logger = logging.getLogger(__name__)
#: Smallest canonical size per axis of a case on a fitted grid: two latent voxels (VAE factor 4).
MIN_FITTED_SIZE = 2 * FIT_MULTIPLE


class TruncationError(CaseError):
    """Part of the body falls outside the canonical grid (docs/grids.md: no body voxel is lost silently)."""


@dataclass
class PreparedCase:
    """Canonical-grid volumes of one case, each (z, y, x) of the grid's shape.

    ``mr_unit``: MR / p99.5 inside the mask; ``ct_vae``: CT in [0, 1] (VAE window, None without
    CT); ``ct_full``: CT in [-1, 1] over [-1024, 3071] HU; ``mask``: body mask {0, 1}.
    """

    case: Case
    mapping: GridMapping
    scaling: MRScaling
    mr_unit: np.ndarray
    mask: np.ndarray
    native_mask: np.ndarray
    ct_vae: np.ndarray | None = None
    ct_full: np.ndarray | None = None


def read_native(case: Case, with_ct: bool = True, derive_mask: bool = False
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, VolumeProperties]:
    """Read MR, mask and (with ``with_ct``, if present) CT of a case after checking they share one
    grid: the project's one reader of a case's volumes.

    ``derive_mask``: a case without a mask file gets a body mask thresholded from its MR (``latent
    predict --mr FILE`` without ``--mask``); otherwise a missing mask is an error.
    """
    if case.mask is None and not derive_mask:
        raise CaseError(f"{case.pid}: no mask file in {case.folder}")
    if case.mask is None:
        mr, properties = read_volume(case.mr, dtype=np.float32)
        mask = body_mask_from_mr(mr, min(properties.spacing[:2]))
    else:
        properties = check_case_grid(case)
        mr, _ = read_volume(case.mr, dtype=np.float32)
        mask = read_volume(case.mask)[0]
        check_mask_values(case.mask, mask)
    mask = (mask > 0).astype(np.uint8)
    check_body(case, mr, mask)
    ct = read_volume(case.ct, dtype=np.float32)[0] if with_ct and case.ct is not None else None
    if ct is not None:
        check_ct_range(case.ct, ct)
    return mr, mask, ct, properties


def check_body(case: Case, mr: np.ndarray, mask: np.ndarray) -> None:
    """Refuse a mask that is empty or covers every voxel, and an MR without contrast in it.

    Raises:
        CaseError: naming the case, the file and the problem.
    """
    if not mask.any():
        raise CaseError(f"{case.pid}: empty mask {case.mask}")
    if mask.all():
        raise CaseError(f"{case.pid}: mask {case.mask} covers every voxel; a body outline is needed")
    inside = mr[mask > 0]
    if float(inside.min()) == float(inside.max()):
        raise CaseError(f"{case.pid}: MR {case.mr} is constant ({float(inside.min()):g}) inside the mask")


def truncation_message(pid: str, mask: np.ndarray, mapping: GridMapping) -> str:
    """``'<pid>: 3.1 % of the body falls outside the canonical grid <spec> (45 mm missing in z)'``."""
    lacking = [f"{value:.0f} mm missing in {axis}" for axis, value in zip("xyz", missing_mm(mask, mapping)) if value > 0]
    where = ", ".join(lacking) or "less than one voxel at the box's edge"
    return (f"{pid}: {mapping.mask_fraction_outside:.1%} of the body falls outside the canonical grid "
            f"{mapping.canonical.spec()} ({where})")


def check_truncation(pid: str, mask: np.ndarray, mapping: GridMapping, allow: bool) -> None:
    """Refuse a mapping that loses body voxels, or with ``allow`` log it as a warning.

    Raises:
        TruncationError: naming the case, the share of the body and the mm missing per axis.
    """
    if mapping.mask_fraction_outside == 0.0:
        return
    message = truncation_message(pid, mask, mapping)
    if not allow:
        raise TruncationError(f"{message}; use a fitted grid (e.g. --grid synthrad-fit-1mm), a larger --grid, "
                              "or --allow-truncation to accept the loss")
    logger.warning("%s; kept because truncation is allowed", message)


def check_fitted_size(case: Case, mapping: GridMapping, grid: CanonicalGrid) -> None:
    """Refuse a case whose body is so small that its fitted box holds under two latent voxels per axis.

    Raises:
        CaseError: naming the MR file, its size in voxels and the box it gets.
    """
    shape = mapping.canonical.shape
    if grid.is_fit and min(shape) < MIN_FITTED_SIZE:
        native = "x".join(str(v) for v in mapping.native.size[::-1])
        raise CaseError(f"{case.mr}: a {native}-voxel volume gets a {'x'.join(map(str, shape))} box on grid "
                        f"{grid.spec()}; at least {MIN_FITTED_SIZE} voxels per axis (two latent voxels) are needed")


def prepare_case(case: Case, grid: CanonicalGrid, with_ct: bool = True, allow_truncation: bool = False,
                 derive_mask: bool = False) -> PreparedCase:
    """Resample a case onto ``grid`` (a fixed grid or a fitted rule) centred on its body and normalise it.

    ``derive_mask``: see :func:`read_native`.

    Raises:
        CaseError / VolumeError: unreadable or inconsistent inputs.
        TruncationError: body voxels outside the canonical grid, unless ``allow_truncation``.
    """
    mr, mask, ct, properties = read_native(case, with_ct=with_ct, derive_mask=derive_mask)
    mapping = plan_mapping(mask, properties, grid)
    check_fitted_size(case, mapping, grid)
    check_truncation(case.pid, mask, mapping, allow_truncation)
    scaling = fit_mr_scaling(mr, mask)
    prepared = PreparedCase(
        case=case, mapping=mapping, scaling=scaling,
        mr_unit=mr_to_unit(to_canonical(mr, mapping, pad_value=0.0), scaling),
        mask=to_canonical(mask, mapping, is_mask=True), native_mask=mask,
    )
    if ct is not None:
        ct_canonical = to_canonical(ct, mapping, pad_value=CT_PAD_HU)
        prepared.ct_vae = ct_to_vae(ct_canonical)
        prepared.ct_full = ct_to_full(ct_canonical)
    return prepared


def latent_mask(mask: np.ndarray, factor: int = 4) -> np.ndarray:
    """Latent-resolution mask: a latent voxel is in the body when any of its image voxels is."""
    z, y, x = (s // factor for s in mask.shape)
    blocks = mask[: z * factor, : y * factor, : x * factor].reshape(z, factor, y, factor, x, factor)
    return blocks.max(axis=(1, 3, 5)).astype(np.uint8)


def resolve_grid(spec: str, cases: Sequence[Case], max_shape: tuple[int, int, int] | None = None) -> tuple[CanonicalGrid, float]:
    """A grid from a spec; ``auto`` measures every readable case's body (median spacing)."""
    if spec != "auto":
        return parse_grid_spec(spec), float("nan")
    extents, spacings = [], []
    for case in cases:
        try:
            _, mask, _, properties = read_native(case)
        except CASE_ERRORS:
            continue  # reported when the case itself is encoded
        extents.append(body_extent_mm(mask, properties))
        spacings.append(properties.spacing)
    if not extents:
        raise CaseError("no readable case to choose an automatic grid from")
    return auto_grid(extents, spacings, max_shape)


#: In-plane dilation of a derived body mask in mm (SynthRAD masks: 10 voxels of ~1 mm).
DERIVED_MASK_DILATION_MM = 10.0


def body_mask_from_mr(mr: np.ndarray, pixel_mm: float = 1.0) -> np.ndarray:
    """A body mask for an MR given without one: threshold, largest component, holes filled, dilated.

    The threshold is 10 % of the volume's 99th percentile; holes are filled slice by slice and
    the mask is dilated in-plane by :data:`DERIVED_MASK_DILATION_MM` like SynthRAD's masks.

    Args:
        mr: (z, y, x) MR.
        pixel_mm: in-plane voxel size, which turns the dilation distance into voxels.
    """
    from scipy import ndimage

    threshold = 0.1 * float(np.percentile(mr, 99))
    foreground = mr > threshold
    labels, count = ndimage.label(foreground)
    if count == 0:
        raise BadFileError("MR has no signal above 10% of its 99th percentile: cannot derive a body mask")
    sizes = ndimage.sum(foreground, labels, index=range(1, count + 1))
    body = labels == (int(np.argmax(sizes)) + 1)
    body = np.stack([ndimage.binary_fill_holes(slice_) for slice_ in body])
    structure = np.zeros((1, 3, 3), bool)
    structure[0] = ndimage.generate_binary_structure(2, 1)
    iterations = max(1, int(round(DERIVED_MASK_DILATION_MM / pixel_mm)))
    return ndimage.binary_dilation(body, structure, iterations=iterations).astype(np.uint8)
