"""The built wheel carries the recipes and the shipped VAE, claims the one import name ``latent``,
and works in a fresh environment next to other packages called encode, cache, translate, decode."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("encode", "cache", "translate", "decode")

CHECK = textwrap.dedent("""
    import sys
    from pathlib import Path
    import latent, latent.encode, latent.cache, latent.translate, latent.decode
    prefix = Path(sys.prefix).resolve()
    for package in (latent, latent.encode, latent.cache, latent.translate, latent.decode):
        assert Path(package.__file__).resolve().is_relative_to(prefix), package.__file__
    import encode, cache, translate, decode  # the other distributions' packages, untouched
    assert all(module.OTHER for module in (encode, cache, translate, decode))
    from latent.core.recipes import find_recipe, shipped_recipes
    from latent.translate.train_config import load_config
    assert {"l2sct_demo", "l2sct_full", "pix2pix_demo", "vae_standin"} <= set(shipped_recipes())
    config = load_config("l2l_ddim_full")
    assert config.model.family == "l2l_ddim"
    assert find_recipe("configs/pix2pix_demo.yaml").is_relative_to(prefix)
    from latent.core.vae.loading import load_vae
    assert load_vae("standin").name == "standin"
    from latent.translate.models.base import model_class
    assert model_class("regress3d").__module__ == "latent.translate.models.regress3d"
    from latent.core.registration.elastix import parameter_files
    assert all(p.is_relative_to(prefix) and p.is_file() for p in parameter_files("bspline"))
    print("wheel ok")
""")


def _build_wheel(folder: Path) -> Path:
    """Build from a copy of the sources, so that no stale build/ folder of the checkout leaks in."""
    source = folder / "source"
    source.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("latent", *STAGES):
        shutil.copytree(ROOT / package, source / package, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(folder),
                    str(source)], check=True, capture_output=True, timeout=300)
    return next(folder.glob("latent_sct-*.whl"))


def _fresh_environment(folder: Path) -> Path:
    """A new virtual environment that sees this one's dependencies (through a path file, so this
    environment's editable install of the project is not among them) and has its own pip."""
    venv.create(folder, with_pip=True)
    python = folder / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    for other in STAGES:  # what another distribution of that name would install
        (Path(site) / other).mkdir()
        (Path(site) / other / "__init__.py").write_text("OTHER = True\n")
    return python


def test_the_wheel_claims_one_import_name_and_runs_in_a_fresh_environment(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path / "wheels")
    with zipfile.ZipFile(wheel) as archive:
        top_level = {name.split("/")[0] for name in archive.namelist() if not name.split("/")[0].endswith(".dist-info")}
        names = archive.namelist()
    assert top_level == {"latent"}, top_level
    assert {"latent/configs/elastix/rigid.txt", "latent/configs/elastix/bspline.txt"} <= set(names)
    for stage in STAGES:
        assert f"latent/{stage}/__init__.py" in names, f"latent/{stage} is missing from the wheel"
    python = _fresh_environment(tmp_path / "fresh")
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=300, env=environment)
    completed = subprocess.run([str(python), "-c", CHECK], cwd=tmp_path, env=environment,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "wheel ok" in completed.stdout
    command = subprocess.run([str(python.parent / "latent"), "--help"], cwd=tmp_path, env=environment,
                             capture_output=True, text=True, timeout=300)
    assert command.returncode == 0 and "predict" in command.stdout, command.stderr[-3000:]


def test_every_recipe_the_demo_trains_is_shipped_and_valid() -> None:
    from latent.app.demo import DEMO_METHODS, DemoConfig
    from latent.translate.train_config import load_config

    folder = DemoConfig().configs_dir
    for name, (recipe, _seconds) in DEMO_METHODS.items():
        config = load_config(folder / recipe)
        assert config.model.family == name.split("+")[0] or config.model.family in name, (name, recipe)


def test_the_demo_trains_every_method_with_the_same_tools() -> None:
    """Equal tools: every recipe the demo compares picks its precision by ``auto`` (bf16 only where
    the CPU's bf16 passes the self-test) and keeps the same EMA of the weights."""
    from latent.app.demo import DEMO_METHODS, DemoConfig
    from latent.translate.train_config import load_config

    configs = {name: load_config(DemoConfig().configs_dir / recipe) for name, (recipe, _) in DEMO_METHODS.items()}
    assert {name: config.train.mixed_precision for name, config in configs.items()} == dict.fromkeys(configs, "auto")
    assert len({config.train.ema_decay for config in configs.values()}) == 1
