"""`latent vae check`: decode(encode(CT)) on the native grid, scored like any method.

This is the floor no latent-to-latent method can beat with this VAE. Because the MAISI CT
window is [-1000, 1000] HU, the error above 1000 HU (cortical bone, teeth, metal) is reported
separately: it is where the latent route saturates.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from latent.cache import LatentCache
from latent.evaluation.scoring import Evaluation, cases_with_ct, evaluate_predictions
from latent.core.io import read_volume

#: HU above which the MAISI VAE window saturates.
SATURATION_HU = 1000.0


def saturated_error(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """MAE over mask voxels with CT > 1000 HU, and the fraction of mask voxels there."""
    region = (mask > 0) & (ct > SATURATION_HU)
    inside = max(int((mask > 0).sum()), 1)
    if not region.any():
        return float("nan"), 0.0
    return float(np.abs(ct[region] - sct[region]).mean()), float(region.sum() / inside)


def vae_check(
    cache: LatentCache,
    vae,
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    pids: Iterable[str] | None = None,
    tile: Sequence[int] | None = None,
    quiet: bool = False,
) -> Evaluation:
    """Reconstruct every cached CT (or ``pids``), write them as predictions and score them.

    Rows carry (as every evaluation) ``mae_<class>`` and ``bias_<class>`` per tissue class of the
    true CT (air, soft, bone 250-1000 HU, above_1000), and gain ``fraction_above_1000``.
    """
    from latent.app.predict_run import predict_vae_floor

    out_dir = Path(out_dir)
    cases = cases_with_ct(data_root, pids)
    written = predict_vae_floor(cache.path, vae, out_dir, [case.pid for case in cases], tile, quiet=quiet,
                                producer=cache.key)
    evaluation = evaluate_predictions(out_dir, data_root, pids=list(written.results), quiet=quiet)
    evaluation.run.failures.update(written.failures)
    for case in cases:
        row = evaluation.run.results.get(case.pid)
        if row is None:
            continue
        ct = read_volume(case.ct, dtype=np.float32)[0]
        sct = read_volume(written.results[case.pid], dtype=np.float32)[0]
        row["mae_above_1000"], row["fraction_above_1000"] = saturated_error(ct, sct, read_volume(case.mask)[0])
    return evaluation
