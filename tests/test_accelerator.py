"""One Accelerator builder for every loop: ``auto`` resolved once, two loops in one process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import latent.accelerator as acc
from latent.vae_fit import VAEFitConfig, fit_vae
from latent.translate.train import train

from test_train import ToyLatents, tiny_config


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    yield
    AcceleratorState._reset_state(reset_partial_state=False)


@pytest.mark.parametrize("fast_bf16, expected", [(True, "bf16"), (False, "no")])
def test_auto_follows_the_capability_probe(fast_bf16: bool, expected: str) -> None:
    assert acc.resolve_precision("auto", on_gpu=False, cpu_probe=lambda: fast_bf16) == expected
    assert acc.resolve_precision("no", on_gpu=False, cpu_probe=lambda: fast_bf16) == "no"
    with pytest.raises(ValueError, match="mixed_precision: expected"):
        acc.resolve_precision("fp8", on_gpu=False)


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_vae_fit_then_translation_training_in_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          fast_bf16: bool) -> None:
    """The demo's sequence: a VAE fit (precision "no") and then a recipe with ``auto``: on a CPU with
    native bf16 the second loop used to die with 'AcceleratorState has already been initialized'."""
    monkeypatch.setattr(acc, "cpu_has_fast_bf16", lambda: fast_bf16)
    expected = "bf16" if fast_bf16 else "no"
    volumes = [np.random.default_rng(i).random((8, 16, 16), dtype=np.float32) for i in range(2)]
    fit = VAEFitConfig(channels=(4, 4, 8), norm_num_groups=4, max_steps=1, crop=None, final_eval_volumes=0,
                       mixed_precision="no")
    vae_dir = fit_vae(volumes, tmp_path / "vae", fit, quiet=True)
    assert json.loads((vae_dir / "fit_config.json").read_text())["mixed_precision"] == "no"
    run_dir = train(tiny_config(tmp_path / "run", max_steps=2, mixed_precision="auto"), train_dataset=ToyLatents(2),
                    quiet=True)
    assert json.loads((run_dir / "config.json").read_text())["train"]["mixed_precision"] == expected
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {r["mixed_precision"] for r in logged if "loss" in r} == {expected}
    assert all(np.isfinite(r["loss"]) for r in logged if "loss" in r)
    # and back: a VAE fit with "auto" after the recipe, in the same process
    again = fit_vae(volumes, tmp_path / "vae2", fit.model_copy(update={"mixed_precision": "auto"}), quiet=True)
    assert json.loads((again / "fit_config.json").read_text())["mixed_precision"] == expected
    assert torch.get_default_dtype() == torch.float32
