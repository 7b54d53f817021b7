"""The grid floor: the true CT taken to the canonical grid and straight back, with no model.

Every canonical-grid method passes its output through canonical -> native resampling, and its
input through native -> canonical; this oracle does only that, with the true CT, so its error is
the part of every method's error that is the grid's (docs/grids.md). ``window="vae"`` also clips
the CT to the VAE window [-1000, 1000] HU on the way, the floor of latent-to-latent routes
before the VAE adds its own error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Literal

import numpy as np

from latent.decode.native import canonical_to_native_sct
from latent.decode.writers import write_prediction
from latent.cases import Case, CaseError
from latent.grid import CanonicalGrid
from latent.intensity import full_to_ct, vae_to_ct
from latent.prepare import prepare_case
from latent.runner import CaseRun, run_over_cases, select_cases

Window = Literal["full", "vae"]


def grid_floor_sct(case: Case, grid: CanonicalGrid, window: Window = "full",
                   allow_truncation: bool = False) -> tuple[np.ndarray, object]:
    """Native-grid HU of the case's CT after native -> canonical -> native.

    Args:
        case: a case with a CT.
        grid: the canonical grid (fixed, or a rule fitted to each body).
        window: ``"full"`` ([-1024, 3071] HU, what pixel-space models and l2sct predict) or
            ``"vae"`` (clipped to the VAE window [-1000, 1000] HU on the canonical grid).
        allow_truncation: score a case whose body the grid cuts (else a one-line error).

    Returns:
        ``(hu, native properties)``: float32 (z, y, x) on the MR's native grid, air outside the mask.
    """
    if case.ct is None:
        raise CaseError(f"{case.pid}: the grid floor needs the CT, and {case.folder} has none")
    if window not in ("full", "vae"):
        raise ValueError(f"grid floor window must be 'full' or 'vae', got {window!r}")
    prepared = prepare_case(case, grid, allow_truncation=allow_truncation)
    canonical = full_to_ct(prepared.ct_full) if window == "full" else vae_to_ct(prepared.ct_vae)
    native = canonical_to_native_sct(canonical, prepared.mapping, prepared.native_mask)
    return native, prepared.mapping.native


def predict_grid_floor(
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    grid: CanonicalGrid,
    window: Window = "full",
    pids: Iterable[str] | None = None,
    quiet: bool = False,
    allow_truncation: bool = False,
    fmt: str = "mha",
) -> CaseRun[Path]:
    """Write ``out_dir/<pid>.<fmt>``, the grid floor of every case with a CT (or only ``pids``)."""
    out_dir = Path(out_dir)
    selection = select_cases(data_root, pids, need_ct=True)

    def work(case: Case) -> Path:
        hu, properties = grid_floor_sct(case, grid, window, allow_truncation)
        return write_prediction(out_dir, case.pid, hu, properties, fmt=fmt)

    return run_over_cases(None, work, f"grid floor ({window})", quiet, selection=selection)
