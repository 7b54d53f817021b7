"""Slice panels of one test case for every method: MR | CT | sCT | error (| std)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from latent.app.bench.figures import slice_panel
from latent.app.methods import MethodResult
from latent.core.cases import discover_cases
from latent.evaluation.scoring import find_prediction
from latent.core.io import read_volume
from latent.core.prepare import read_native


def method_panels(results: Iterable[MethodResult], data: Path, pid: str, folder: Path) -> dict[str, Path]:
    """``slices_<method>`` -> PNG of case ``pid`` for each result with predictions (std map beside
    the error where ``<pid>_std.mha`` exists: diffusion samples, ensembles)."""
    case = next((c for c in discover_cases(data) if c.pid == pid), None)
    if case is None or case.ct is None or case.mask is None:
        raise ValueError(f"{data}: case {pid} with MR, CT and mask not found for the slice panels")
    mr, mask, ct, properties = read_native(case)
    spacing_zyx = tuple(reversed(properties.spacing))
    panels = {}
    for result in results:
        if result.pred_dir is None:
            continue
        sct = read_volume(find_prediction(result.pred_dir, pid), dtype=np.float32)[0]
        std_path = result.pred_dir / f"{pid}_std.mha"
        std = read_volume(std_path, dtype=np.float32)[0] if std_path.is_file() else None
        panels[f"slices_{result.name}"] = slice_panel(mr, ct, sct, mask, folder / f"{result.name}.png", std=std,
                                                      title=f"{result.name}: {pid}", spacing_zyx=spacing_zyx)
    return panels
