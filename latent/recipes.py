"""The training recipes that ship with the package (``latent/configs/*.yaml``; in a checkout
``configs/`` points at the same folder), found by file path or by name."""

from __future__ import annotations

import os
from pathlib import Path

from latent.errors import BadConfigError

#: Folder of the shipped recipes (package data, so a pip install has them too).
RECIPES_DIR = Path(__file__).resolve().parent / "configs"


def shipped_recipes() -> list[str]:
    """Names of the shipped recipes (file stems), sorted."""
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


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
