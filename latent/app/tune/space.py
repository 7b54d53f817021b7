"""The search space of ``latent tune``: one distribution per dotted recipe field, read from YAML.

    model.lr: {type: loguniform, low: 3.0e-4, high: 1.0e-2}
    model.gradient_weight: {type: uniform, low: 0.0, high: 2.0, step: 0.25}
    data.batch_size: {type: int, low: 1, high: 4}
    model.patch_size: {type: categorical, choices: [[16, 64, 64], [32, 64, 64]]}

Every field is checked against the recipe's typed config (``TrainConfig``) before a trial runs:
each bound and each choice is set on the recipe and validated, so a misspelt field or a value
the family refuses is named in one line.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, RootModel, ValidationError, field_validator, model_validator

from latent.core.errors import BadConfigError, one_line
from latent.core.recipes import RECIPES_DIR, format_validation_errors, set_dotted

#: Fields a search may not change: where the trial's run goes, and resuming (each trial is fresh).
RESERVED_FIELDS = ("run_dir", "train.resume")
#: Optuna stores categorical choices of these types as they are; others (lists) as their YAML text.
SCALAR_TYPES = (type(None), bool, int, float, str)


class Distribution(BaseModel):
    """One field's distribution; which keys it needs depends on ``type``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["loguniform", "uniform", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    step: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _keys_of_the_type(self) -> "Distribution":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("choices: a categorical distribution needs a non-empty list of choices")
            if self.low is not None or self.high is not None or self.step is not None:
                raise ValueError("low/high/step: not used by a categorical distribution (give choices)")
            return self
        if self.choices is not None:
            raise ValueError(f"choices: only a categorical distribution has choices, not {self.type}")
        if self.low is None or self.high is None:
            raise ValueError(f"low/high: a {self.type} distribution needs both bounds")
        if self.low >= self.high:
            raise ValueError(f"low: {self.low} is not below high {self.high}")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"low: a loguniform distribution needs low > 0, got {self.low}")
        if self.type == "loguniform" and self.step is not None:
            raise ValueError("step: a loguniform distribution has no step")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"step: must be > 0, got {self.step}")
        if self.type == "int" and any(v is not None and v != int(v) for v in (self.low, self.high, self.step)):
            raise ValueError("low/high/step: an int distribution needs whole numbers")
        return self

    def values_to_check(self) -> list[Any]:
        """The bounds or every choice: what must validate in the recipe."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def labels(self) -> dict[Any, Any]:
        """Optuna's name of each choice -> the choice (lists by their YAML text)."""
        return {choice if isinstance(choice, SCALAR_TYPES) else yaml.safe_dump(choice, default_flow_style=True).strip():
                choice for choice in self.choices or []}

    def suggest(self, trial: Any, name: str) -> Any:
        """A value for ``name`` from an Optuna trial."""
        if self.type == "categorical":
            labels = self.labels()
            return labels[trial.suggest_categorical(name, list(labels))]
        if self.type == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1))
        return trial.suggest_float(name, self.low, self.high, log=self.type == "loguniform", step=self.step)


class SearchSpace(RootModel[dict[str, Distribution]]):
    """Dotted recipe field -> its distribution."""

    @field_validator("root")
    @classmethod
    def _fields(cls, value: dict[str, Distribution]) -> dict[str, Distribution]:
        if not value:
            raise ValueError("the search space names no field")
        for name in value:
            if not all(part.isidentifier() for part in name.split(".")):
                raise ValueError(f"{name}: not a dotted recipe field (e.g. model.lr)")
            if any(name == field or name.startswith(field + ".") for field in RESERVED_FIELDS):
                raise ValueError(f"{name}: set by latent tune itself, cannot be searched")
        return value

    def suggest(self, trial: Any) -> dict[str, Any]:
        """One value per field from an Optuna trial (TPE decides)."""
        return {name: distribution.suggest(trial, name) for name, distribution in self.root.items()}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The space as plain data (recorded with the study)."""
        return {name: d.model_dump(exclude_none=True) for name, d in self.root.items()}


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a space file (a path, or a shipped space's name in ``latent/configs/``).

    Raises:
        BadConfigError: the file is missing or not YAML, or a field's distribution is invalid
            (the message names the file and the field).
    """
    path = Path(path)
    shipped = RECIPES_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if not path.exists() and path.parent == Path(".") and shipped.is_file():
        path = shipped  # a shipped space by name, e.g. regress3d_demo_space
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as error:
        raise BadConfigError(f"{path}: cannot be read ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise BadConfigError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(raw, dict):
        raise BadConfigError(f"{path}: a search space is a YAML mapping of dotted fields, got {type(raw).__name__}")
    try:
        return SearchSpace.model_validate(raw)
    except ValidationError as error:
        lines = format_validation_errors(error, "search space").splitlines()[1:]
        raise BadConfigError(f"{path}: " + "; ".join(line.strip().removeprefix("config.") for line in lines)) from None


def cell(value: Any) -> Any:
    """A value as a table cell: scalars as they are, lists as JSON."""
    return value if value is None or isinstance(value, (int, float, str)) else json.dumps(value)


def with_values(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of a recipe dict with each dotted field set to its value."""
    recipe = copy.deepcopy(raw)
    for name, value in values.items():
        set_dotted(recipe, name, value)
    return recipe


def check_against_recipe(space: SearchSpace, raw: dict[str, Any], parse: Callable[[dict], Any],
                         path: str | Path) -> None:
    """Set each bound / choice of every field on the recipe and validate it with ``parse``.

    Raises:
        BadConfigError: ``<space file>: <field>: ...`` for the first field the recipe's typed
            config refuses (an unknown field, or a value out of its range).
    """
    for name, distribution in space.root.items():
        for value in distribution.values_to_check():
            try:
                parse(with_values(raw, {name: value}))
            except (BadConfigError, ValidationError) as error:
                text = one_line(error)
                if "Extra inputs are not permitted" in text or "is not a section" in text:
                    raise BadConfigError(f"{path}: {name}: not a field of the recipe's config "
                                         f"({text.removeprefix('invalid training config: ')})") from None
                raise BadConfigError(f"{path}: {name} = {value!r}: the recipe refuses it "
                                     f"({text.removeprefix('invalid training config: ')})") from None
