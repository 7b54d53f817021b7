"""Training recipes: the ones that ship with the package (``latent/configs/*.yaml``; in a checkout
``configs/`` points at the same folder), found by file path or by name; reading them, dotted
command-line overrides, and one-line errors that name the field. Shared by the translation
recipes (``translate/train_config.py``) and the VAE recipe (``latent/core/vae/pipeline.py``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import yaml
from pydantic import ValidationError

from latent.core.errors import BadConfigError

#: Folder of the shipped recipes (package data, so a pip install has them too).
RECIPES_DIR = Path(__file__).resolve().parents[1] / "configs"


def shipped_recipes() -> list[str]:
    """Names of the shipped recipes (file stems), sorted; ``*_space.yaml`` are search spaces of
    ``latent tune``, not recipes."""
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml") if not path.stem.endswith("_space"))


def find_recipe(spec: str | os.PathLike) -> Path:
    """A recipe file: ``spec`` itself when it exists, else the shipped recipe of that name
    (``l2sct_demo``, ``l2sct_demo.yaml`` or ``configs/l2sct_demo.yaml`` outside a checkout).

    Raises:
        BadConfigError: neither a file nor a shipped recipe name (lists the names).
    """
    path = Path(spec)
    if path.is_file():
        return path
    name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    shipped = RECIPES_DIR / name
    if shipped.is_file():
        return shipped
    raise BadConfigError(f"{spec}: no such recipe file, and no shipped recipe of that name "
                         f"(shipped: {', '.join(shipped_recipes())})")


class ConfigError(BadConfigError):
    """A recipe that cannot be loaded; the message names every bad field (dotted path)."""


def read_recipe(spec: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a recipe file (a path or a shipped recipe's name, see :func:`find_recipe`).

    Raises:
        ConfigError: the file is not a YAML mapping.
    """
    path = find_recipe(spec)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a YAML mapping, got {type(raw).__name__}")
    return raw


def set_dotted(raw: dict[str, Any], path: str, value: Any, what: str | None = None) -> dict[str, Any]:
    """Set the field ``a.b.c`` of a config dict to ``value`` (sections created when missing).

    Raises:
        ConfigError: a part of the path is not a section (``what`` names the source in the message).
    """
    node = raw
    parts = path.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{what or path}: {part} is not a section")
        node = child
    node[parts[-1]] = value
    return raw


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed with ``yaml.safe_load``) to a config dict."""
    for override in overrides:
        path, sep, text = override.partition("=")
        if not sep or not path:
            raise ConfigError(f"override {override!r}: expected dotted.key=value")
        set_dotted(raw, path, yaml.safe_load(text), f"override {override!r}")
    return raw


def format_validation_errors(error: ValidationError, what: str) -> str:
    """Every field error of a pydantic validation as ``dotted.field: reason`` lines."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        # Our validators start their messages with the field they judge ("channels: ...").
        field, sep, rest = message.partition(": ")
        if sep and field.isidentifier():
            where, message = f"{where}.{field}", rest
        lines.append(f"{where}: {message}" + (f" (got {item['input']!r})" if item["type"] == "extra_forbidden" else ""))
    return f"invalid {what}:\n  " + "\n  ".join(lines)
