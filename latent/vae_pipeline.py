"""`latent vae fit` on a data set: canonical, normalised MR and CT volumes -> :func:`fit_vae`."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from latent.errors import BadConfigError
from latent.cases import discover_cases, load_splits
from latent.prepare import prepare_case, resolve_grid
from latent.runner import run_over_cases
from latent.vae_fit import VAEFitConfig, fit_vae

logger = logging.getLogger(__name__)


def load_fit_config(path: str | os.PathLike | None, **overrides) -> VAEFitConfig:
    """A :class:`VAEFitConfig` from a YAML/JSON file (or defaults) plus non-None overrides."""
    values = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: VAE config not found")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise BadConfigError(f"{path}: expected a mapping of VAEFitConfig fields")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return VAEFitConfig.model_validate(values)


@dataclass
class FitVolumes:
    """Canonical-grid volumes for :func:`latent.vae_fit.fit_vae`: training MR/CT with body masks,
    validation CTs (VAE window) with theirs, and the grid."""

    volumes: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    val_ct: list[np.ndarray] = field(default_factory=list)
    val_masks: list[np.ndarray] = field(default_factory=list)
    grid: dict = field(default_factory=dict)


def training_volumes(data_root: str | os.PathLike, grid_spec: str, split_file: str | os.PathLike | None,
                     quiet: bool = False, modalities: Sequence[str] = ("mr", "ct")) -> FitVolumes:
    """Normalised canonical volumes of the training cases (and validation CTs when a split is given).

    Args:
        data_root: SynthRAD-layout data set.
        grid_spec: canonical grid (``auto``, a preset or ``'SXxSYxSZ:DxHxW'``).
        split_file: split JSON: train on ``train``, validate on ``val``; None = every case trains.
        modalities: which volumes of each training case to train on (``mr``, ``ct``).
    """
    cases = discover_cases(data_root)
    val: list = []
    if split_file is not None:
        splits = load_splits(split_file)
        train, val_ids = set(splits["train"]), set(splits.get("val", []))
        val = [case for case in cases if case.pid in val_ids and case.ct is not None]
        cases = [case for case in cases if case.pid in train]
    grid, _ = resolve_grid(grid_spec, cases)
    out = FitVolumes(grid=grid.to_dict())
    # A VAE learns from whatever body the grid holds: a cut body is not an error here.
    run = run_over_cases(cases, lambda case: prepare_case(case, grid, allow_truncation=True), "prepare", quiet)
    if run.failures:
        logger.warning("vae fit: %d of %d training cases left out: %s", len(run.failures), len(cases),
                       "; ".join(run.failures.values()))
    for prepared in run.results.values():
        if "mr" in modalities:
            out.volumes.append(prepared.mr_unit)
            out.masks.append(prepared.mask)
        if "ct" in modalities and prepared.ct_vae is not None:
            out.volumes.append(prepared.ct_vae)
            out.masks.append(prepared.mask)
    if not out.volumes:
        raise BadConfigError(f"{data_root}: no usable training volume")
    val_run = run_over_cases(val, lambda case: prepare_case(case, grid, allow_truncation=True), "prepare val", quiet)
    if val_run.failures:
        logger.warning("vae fit: %d of %d validation cases left out: %s", len(val_run.failures), len(val),
                       "; ".join(val_run.failures.values()))
    for prepared in val_run.results.values():
        out.val_ct.append(prepared.ct_vae)
        out.val_masks.append(prepared.mask)
    return out


def fit_vae_on_dataset(
    data_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    grid_spec: str = "auto",
    *,
    split_file: str | os.PathLike | None = None,
    config_path: str | os.PathLike | None = None,
    seconds: float | None = None,
    max_steps: int | None = None,
    resume: bool = False,
    quiet: bool = False,
) -> Path:
    """Fit the small VAE on the training cases' MR and CT at the canonical grid; return its folder.

    With a split file, the ``val`` cases' CTs select the kept weights (masked MAE in HU).
    """
    config = load_fit_config(config_path, time_budget_s=seconds, max_steps=max_steps)
    fit = training_volumes(data_root, grid_spec, split_file, quiet, modalities=config.modalities)
    logger.info("vae fit: %d volumes of shape %s, %d validation CTs", len(fit.volumes), tuple(fit.grid["shape"]),
                len(fit.val_ct))
    path = Path(fit_vae(fit.volumes, out_dir, config, resume=resume, masks=fit.masks, val_ct=fit.val_ct,
                        val_masks=fit.val_masks, quiet=quiet))
    (path / "training_grid.json").write_text(json.dumps(fit.grid) + "\n")
    return path
