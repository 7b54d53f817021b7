"""The built wheel carries the recipes and the shipped VAE, and works outside a checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = textwrap.dedent("""
    import sys
    from pathlib import Path
    import latent, encode, cache, translate, decode
    target = Path(sys.argv[1]).resolve()
    for package in (latent, encode, cache, translate, decode):
        assert Path(package.__file__).resolve().is_relative_to(target), package.__file__
    from latent.recipes import find_recipe, shipped_recipes
    from translate.train_config import load_config
    assert {"l2sct_demo", "l2sct_full", "pix2pix_demo", "vae_standin"} <= set(shipped_recipes())
    config = load_config("l2l_ddim_full")
    assert config.model.family == "l2l_ddim"
    assert find_recipe("configs/pix2pix_demo.yaml").is_relative_to(target)
    from latent.vae import load_vae
    assert load_vae("standin").name == "standin"
    from latent.app.cli import app
    print("wheel ok")
""")


def test_the_wheel_installs_recipes_and_weights_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(wheels.glob("latent_sct-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    environment = {**os.environ, "PYTHONPATH": str(target)}
    completed = subprocess.run([sys.executable, "-c", CHECK, str(target)], cwd=tmp_path, env=environment,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "wheel ok" in completed.stdout


def test_every_recipe_the_demo_trains_is_shipped_and_valid() -> None:
    from latent.app.demo import DEMO_METHODS, DemoConfig
    from translate.train_config import load_config

    folder = DemoConfig().configs_dir
    for name, (recipe, _seconds) in DEMO_METHODS.items():
        config = load_config(folder / recipe)
        assert config.model.family == name.split("+")[0] or config.model.family in name, (name, recipe)
