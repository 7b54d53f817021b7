"""Typed training config (``TrainConfig``), YAML recipes and dotted command-line overrides: the one
schema of every recipe, a translation model's or the VAE's.

A recipe has four sections: ``data`` (where the training data come from), ``model`` (validated by
the family's own config class, picked by ``model.family``; ``vae`` is the frozen VAE's family,
trained by ``latent train`` through the same loop), ``train`` (budget, schedule, precision,
checkpoints, validation, resume) and ``run_dir``. Unknown fields are refused, and every error
names its field with a dotted path (``model.channels: ...``, ``train.max_step: Extra inputs ...``).
VAE recipes of the earlier layout (``family: vae`` and ``fit:`` at the top) are read as this one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from pydantic import SerializeAsAny, ValidationError, field_validator, model_validator

from latent.core.recipe_sections import VALIDATOR_ALIASES, DataConfig, Section, TrainSection  # noqa: F401
from latent.core.recipes import ConfigError, apply_overrides, format_validation_errors, read_recipe
from latent.core.vae.fit_config import VAEModelConfig
from latent.core.vae.pipeline import is_earlier_vae_recipe, upgrade_earlier_vae_recipe
from latent.translate.models.base import ModelConfig, model_class


class TrainConfig(Section):
    """Everything a training run needs; unknown fields are refused with their dotted name."""

    data: DataConfig = DataConfig()
    #: Validated by the family's config class (``model.family`` picks it; ``vae``: VAEModelConfig).
    model: SerializeAsAny[ModelConfig | VAEModelConfig]
    train: TrainSection = TrainSection()
    run_dir: str = "runs/run"
    #: Start from another run's weights (its ``best/``, else ``final/``; same family and sizes):
    #: the second stage of a two-stage training (latent.translate.init_from). None: fresh weights.
    init_from: str | None = None

    @property
    def is_vae(self) -> bool:
        """A recipe of the VAE (trained on the data set's volumes) rather than a translation model."""
        return self.model.family == "vae"

    @model_validator(mode="after")
    def _data_source(self) -> "TrainConfig":
        if self.is_vae and not self.data.root:
            raise ValueError("data.root: the VAE trains on a data set's volumes; give its root")
        if not self.is_vae and self.data.root:
            raise ValueError("data.root: only the VAE reads volumes; a translation model reads data.cache")
        if self.is_vae and (self.init_from is not None or self.data.regions is not None):
            field = "init_from" if self.init_from is not None else "data.regions"
            raise ValueError(f"{field}: translation models only (the VAE trains on every region from scratch)")
        return self

    @field_validator("model", mode="before")
    @classmethod
    def _family_config(cls, value: Any) -> Any:
        if isinstance(value, dict):
            if "family" not in value:
                raise ValueError("model.family is required")
            if value["family"] == "vae":
                return VAEModelConfig.model_validate(value)
            try:
                family_class = model_class(value["family"])
            except ValueError as error:
                raise ValueError(f"family: {error}") from None
            return family_class.config_class.model_validate(value)
        return value


def parse_config(raw: dict[str, Any]) -> TrainConfig:
    """Validate a config dict.

    Raises:
        ConfigError: naming each bad field, e.g. ``model.channels: ...`` or ``train.max_step: ...``.
    """
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_errors(error, "training config")) from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML recipe (optional; a file, or a shipped recipe's name), apply dotted overrides, validate."""
    raw = read_recipe(path) if path is not None else {}
    if is_earlier_vae_recipe(raw):
        raw = upgrade_earlier_vae_recipe(raw, path)
    return parse_config(apply_overrides(raw, overrides))
