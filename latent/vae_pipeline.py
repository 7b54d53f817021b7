"""`latent vae fit` on a data set: canonical, normalised MR and CT volumes -> :func:`fit_vae`."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import yaml

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
            raise ValueError(f"{path}: expected a mapping of VAEFitConfig fields")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return VAEFitConfig.model_validate(values)


def training_volumes(data_root: str | os.PathLike, grid_spec: str, split_file: str | os.PathLike | None,
                     quiet: bool = False) -> tuple[list[np.ndarray], dict]:
    """Normalised canonical MR and CT volumes of the training cases, and the grid used."""
    cases = discover_cases(data_root)
    if split_file is not None:
        train = set(load_splits(split_file)["train"])
        cases = [case for case in cases if case.pid in train]
    grid, _ = resolve_grid(grid_spec, cases)
    run = run_over_cases(cases, lambda case: prepare_case(case, grid), "prepare", quiet)
    volumes = []
    for prepared in run.results.values():
        volumes.append(prepared.mr_unit)
        if prepared.ct_vae is not None:
            volumes.append(prepared.ct_vae)
    if not volumes:
        raise ValueError(f"{data_root}: no usable training volume")
    return volumes, grid.to_dict()


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
    """Fit the small VAE on the training cases' MR and CT at the canonical grid; return its folder."""
    config = load_fit_config(config_path, time_budget_s=seconds, max_steps=max_steps)
    volumes, grid = training_volumes(data_root, grid_spec, split_file, quiet)
    logger.info("vae fit: %d volumes of shape %s", len(volumes), tuple(grid["shape"]))
    path = Path(fit_vae(volumes, out_dir, config, resume=resume, quiet=quiet))
    (path / "training_grid.json").write_text(json.dumps(grid) + "\n")
    return path
