"""Every third-party package the package code imports is declared in pyproject.toml."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("latent", "encode", "cache", "translate", "decode")
#: Imported only inside the dose extra's lazy loader (docs/dose.md), installed with --no-deps.
UNDECLARED_BY_DESIGN = {"pyRadPlan", "pyradplan"}


def _distribution_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {_distribution_name(r) for r in project["dependencies"]}
    for extra in project.get("optional-dependencies", {}).values():
        names |= {_distribution_name(r) for r in extra}
    return names


def imported_top_levels() -> dict[str, str]:
    """Top-level module name -> one file importing it (absolute imports only)."""
    found: dict[str, str] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def test_every_third_party_import_is_declared() -> None:
    distributions = importlib.metadata.packages_distributions()
    wanted = declared()
    missing = []
    for module, where in sorted(imported_top_levels().items()):
        if module in PACKAGES or module in sys.stdlib_module_names or module in UNDECLARED_BY_DESIGN:
            continue
        providers = {name.lower().replace("_", "-") for name in distributions.get(module, [])}
        if not providers & wanted:
            missing.append(f"{module} (imported in {where}; provided by {sorted(providers) or 'nothing installed'})")
    assert not missing, "undeclared imports: " + "; ".join(missing)
