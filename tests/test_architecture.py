"""The one-way flow (docs/architecture.md): the import-linter contracts cover the whole core,
catch a back-edge, the stages are imported only under the one name ``latent``, and no module inside
translate/ shadows a top-level package."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The stage folders at the top of the checkout, linked into latent/ (latent/encode -> ../encode, ...).
STAGES = ("encode", "cache", "translate", "decode")
#: Every folder of package code.
PACKAGES = ("latent", *STAGES)
LINT_IMPORTS = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")


def contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


#: What latent/ holds besides the linked stages: the application layer, the core, evaluation, data.
LATENT_ROOMS = {"__init__.py", "__main__.py", "app", "core", "evaluation", "configs", "weights"}


def test_latent_holds_only_its_rooms_and_the_contracts_name_them() -> None:
    rooms = {path.name for path in (ROOT / "latent").iterdir()
             if not path.is_symlink() and not path.name.startswith((".", "__pycache__"))}
    assert rooms == LATENT_ROOMS
    forbidden = next(c for c in contracts() if c["type"] == "forbidden")
    assert forbidden["source_modules"] == ["latent.core"]
    assert set(forbidden["forbidden_modules"]) == {"latent.app", "latent.evaluation",
                                                   *(f"latent.{stage}" for stage in STAGES)}
    layers = next(c for c in contracts() if c["type"] == "layers")
    assert layers["layers"] == ["latent.app", "latent.evaluation", "latent.decode", "latent.translate", "latent.cache",
                                "latent.encode"]


def _lint(root: Path) -> subprocess.CompletedProcess:
    if LINT_IMPORTS is None:
        pytest.fail("lint-imports is not installed (import-linter is in the [test] extra)")
    environment = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT_IMPORTS, "--config", str(root / "pyproject.toml"), "--no-cache"],
                          cwd=root, env=environment, capture_output=True, text=True, timeout=300)


def _copy_packages(destination: Path) -> None:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, destination / package, symlinks=True,
                        ignore=shutil.ignore_patterns("weights", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", destination / "pyproject.toml")


def test_the_repository_keeps_its_contracts() -> None:
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "broken" in result.stdout and "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "back_edge", "contract"),
    [
        ("latent/core/grid.py", "import latent.decode.native", "the core"),  # core -> stage
        ("cache/store.py", "import latent.translate.data", "stages import only earlier stages"),  # stage -> later stage
        ("decode/native.py", "import latent.app.cli", "stages import only earlier stages"),  # stage -> app layer
    ],
)
def test_a_deliberate_back_edge_breaks_a_contract(tmp_path: Path, module: str, back_edge: str, contract: str) -> None:
    _copy_packages(tmp_path)
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{back_edge}  # deliberate back-edge\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    broken = [line for line in result.stdout.splitlines() if line.rstrip().endswith("BROKEN")]
    assert broken, result.stdout[-3000:]
    assert contract in result.stdout.split("Broken contracts")[-1] or any(contract in line for line in broken)
    dotted = module.removesuffix(".py").replace("/", ".")
    assert (dotted if dotted.startswith("latent.") else f"latent.{dotted}") in result.stdout


def test_no_module_inside_translate_shadows_a_top_level_package() -> None:
    """`accelerate launch translate/train.py` puts translate/ first on sys.path."""
    top_level = set(PACKAGES) | set(sys.stdlib_module_names)
    top_level |= {name for name in importlib.metadata.packages_distributions()}
    inside = {path.stem if path.suffix == ".py" else path.name
              for path in (ROOT / "translate").iterdir()
              if (path.suffix == ".py" or (path / "__init__.py").exists()) and path.name != "__init__.py"}
    assert inside, "translate/ has no modules?"
    assert not inside & top_level, f"translate/ would shadow: {sorted(inside & top_level)}"


#: Small modules with one job: the longest package module may have this many lines.
MAX_MODULE_LINES = 400


def test_no_package_module_is_longer_than_the_limit() -> None:
    long = {str(path.relative_to(ROOT)): count
            for package in PACKAGES for path in (ROOT / package).rglob("*.py")
            if (count := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"split these by job: {long}"


def test_the_stage_folders_are_linked_into_the_one_import_name() -> None:
    for stage in STAGES:
        link = ROOT / "latent" / stage
        assert link.is_symlink() and link.resolve() == (ROOT / stage).resolve(), f"latent/{stage} must link to ../{stage}"


def _bare_stage_imports(path: Path) -> list[str]:
    """``import translate...`` / ``from cache... import`` lines of one file (they bypass ``latent.``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        found += [f"{path.relative_to(ROOT)}:{node.lineno}: {name}" for name in names
                  if name.split(".")[0] in STAGES]
    return found


def test_no_code_imports_a_stage_by_its_bare_folder_name() -> None:
    """Only ``latent.<stage>`` exists once installed; a bare ``import cache`` would find another package."""
    files = [path for folder in (*PACKAGES, "tests", "benchmarks") for path in (ROOT / folder).rglob("*.py")]
    assert len(files) > 50
    bare = [line for path in files for line in _bare_stage_imports(path)]
    assert not bare, "import these as latent.<stage>:\n" + "\n".join(bare)
