"""`latent vae fit` and `latent train` on a VAE recipe (``model.family: vae``): a data set's
canonical, normalised MR and CT volumes -> :func:`fit_vae` (the project's one training loop)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from latent.core.errors import BadConfigError
from latent.core.cases import check_split_ids, discover_cases, load_splits, read_split
from latent.core.recipes import ConfigError, format_validation_errors, read_recipe
from latent.core.prepare import prepare_case, resolve_grid
from latent.core.runner import run_over_cases
from latent.core.recipe_sections import DataConfig, TrainSection
from latent.core.vae.fit import VAEFitConfig, fit_vae
from latent.core.vae.fit_config import LOOP_FIELDS, VAEModelConfig, vae_fit_config

logger = logging.getLogger(__name__)


def is_earlier_vae_recipe(raw: dict) -> bool:
    """A VAE recipe of the earlier layout: ``family: vae`` and the ``fit`` settings at the top."""
    return raw.get("family") == "vae"


def upgrade_earlier_vae_recipe(raw: dict, source: object = None) -> dict:
    """An earlier-layout VAE recipe as the one recipe schema: ``fit`` splits into ``model`` (the
    :class:`VAEModelConfig` fields) and ``train`` (the loop's, with the earlier defaults kept, so
    the recipe means what it meant); ``data`` and ``run_dir`` stay.

    Raises:
        ConfigError: an invalid ``fit`` section (the field named) or an unknown top-level key.
    """
    unknown = sorted(set(raw) - {"family", "data", "run_dir", "fit"})
    if unknown:
        raise ConfigError(f"{source or 'VAE recipe'}: {', '.join(unknown)}: not a field of a VAE recipe")
    try:
        fit = VAEFitConfig.model_validate(dict(raw.get("fit") or {}))
    except ValidationError as error:
        raise ConfigError(format_validation_errors(error, "VAE recipe")) from None
    values = fit.model_dump()
    model = {name: values[name] for name in VAEModelConfig.model_fields}
    train = {name: values[name] for name in LOOP_FIELDS}
    train["max_seconds"] = values["time_budget_s"]
    data = {**dict(raw.get("data") or {}), "batch_size": values["batch_size"]}
    logger.warning("%s: a VAE recipe of the earlier layout (family and fit at the top), read as model.family: vae "
                   "with its fit settings in model and train (configs/vae_standin.yaml shows the layout)",
                   source or "recipe")
    return {"model": model, "data": data, "train": train, **({"run_dir": raw["run_dir"]} if "run_dir" in raw else {})}


def fit_config_of_recipe(raw: dict, source: object = None) -> VAEFitConfig:
    """:class:`VAEFitConfig` of a VAE recipe (``model``, ``data`` and ``train`` sections)."""
    try:
        model = VAEModelConfig.model_validate(raw.get("model") or {})
        data = DataConfig.model_validate(raw.get("data") or {})
        train = TrainSection.model_validate(raw.get("train") or {})
    except ValidationError as error:
        raise ConfigError(format_validation_errors(error, f"VAE recipe {source or ''}".strip())) from None
    return vae_fit_config(model, data, train)


def load_fit_config(path: str | os.PathLike | None, **overrides) -> VAEFitConfig:
    """A :class:`VAEFitConfig` from a VAE recipe (its ``model`` and ``train`` sections; the command
    names the data), an earlier-layout recipe, or a flat file of its fields (YAML/JSON, a path or a
    shipped recipe's name), plus non-None overrides."""
    values: dict = {}
    if path is not None:
        values = read_recipe(path)
        if is_earlier_vae_recipe(values):
            values = upgrade_earlier_vae_recipe(values, path)
        if (values.get("model") or {}).get("family") == "vae":
            values = fit_config_of_recipe(values, path).model_dump()
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return VAEFitConfig.model_validate(values)
    except ValidationError as error:
        raise ConfigError(format_validation_errors(error, f"VAE fit config {path}")) from None


@dataclass
class FitVolumes:
    """Canonical-grid volumes for :func:`latent.core.vae.fit.fit_vae`: training MR/CT with body masks,
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
        check_split_ids(split_file, splits, [name for name in ("train", "val") if name in splits],
                        [case.pid for case in cases], data_root)
        train, val_ids = set(read_split(split_file, "train")), set(splits.get("val", []))
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
    config: VAEFitConfig | None = None,
    seconds: float | None = None,
    max_steps: int | None = None,
    resume: bool = False,
    quiet: bool = False,
    overwrite: bool = False,
    resume_inexact: bool = False,
) -> Path:
    """Fit the small VAE on the training cases' MR and CT at the canonical grid; return its folder.

    With a split file, the ``val`` cases' CTs select the kept weights (masked MAE in HU). The
    settings are ``config``, else read from ``config_path``, with ``seconds`` and ``max_steps``
    (when given) replacing the budget. A folder that holds a run is refused before any volume is
    read, unless ``resume`` or ``overwrite`` (see :func:`latent.core.vae.fit.fit_vae`).
    """
    from latent.core.run_folder import check_resume_flags, refuse_finished_run

    check_resume_flags(resume, overwrite)
    if not resume:
        refuse_finished_run(Path(out_dir), overwrite=overwrite)
    if config is None:
        config = load_fit_config(config_path, time_budget_s=seconds, max_steps=max_steps)
    else:
        budget = {k: v for k, v in {"time_budget_s": seconds, "max_steps": max_steps}.items() if v is not None}
        config = config.model_copy(update=budget)
    fit = training_volumes(data_root, grid_spec, split_file, quiet, modalities=config.modalities)
    logger.info("vae fit: %d volumes of shape %s, %d validation CTs", len(fit.volumes), tuple(fit.grid["shape"]),
                len(fit.val_ct))
    path = Path(fit_vae(fit.volumes, out_dir, config, resume=resume, masks=fit.masks, val_ct=fit.val_ct,
                        val_masks=fit.val_masks, quiet=quiet, overwrite=overwrite, resume_inexact=resume_inexact))
    (path / "training_grid.json").write_text(json.dumps(fit.grid) + "\n")
    return path
