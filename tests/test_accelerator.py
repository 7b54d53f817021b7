"""One Accelerator builder for every loop: ``auto`` resolved once, two loops in one process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import latent.core.accelerator as acc
from latent.core.vae.fit import VAEFitConfig, fit_vae
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


def test_explicit_bf16_on_a_cpu_that_fails_the_self_test_is_a_config_error() -> None:
    from latent.core.errors import BadConfigError

    with pytest.raises(BadConfigError, match=r"mixed_precision: bf16 3D convolutions on this CPU differ .* by 0\.9"):
        acc.resolve_precision("bf16", on_gpu=False, cpu_probe=lambda: True, cpu_bf16_error=lambda: 0.9)
    assert acc.resolve_precision("bf16", on_gpu=False, cpu_probe=lambda: True, cpu_bf16_error=lambda: 0.004) == "bf16"
    # "no" never runs the self-test
    assert acc.resolve_precision("no", on_gpu=False, cpu_bf16_error=lambda: pytest.fail("self-test ran")) == "no"


@pytest.mark.parametrize("native, error, expected", [(True, 0.004, True), (True, 0.9, False), (True, float("inf"), False),
                                                     (False, 0.004, False)])
def test_native_bf16_counts_only_when_the_self_test_passes(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                                          native: bool, error: float, expected: bool) -> None:
    """Both answers of the instruction-set check, and a CPU whose bf16 kernels compute wrong gradients."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(acc, "bf16_conv3d_error", lambda: error)
    assert acc.cpu_has_fast_bf16() is expected
    assert ("bf16 self-test failed" in caplog.text) == (native and not expected)


class _WrongWeightGradient(torch.autograd.Function):
    """Identity on the weight whose gradient comes back doubled: a broken bf16 kernel, simulated."""

    @staticmethod
    def forward(ctx, weight):  # type: ignore[override]
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return 2 * grad


def test_the_self_test_measures_a_wrong_bf16_weight_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    shapes = ((8, 4, 4, 4),)  # a shape every CPU kernel computes correctly
    assert acc.bf16_conv3d_error(shapes) < acc.BF16_SELF_TEST_TOLERANCE
    conv3d = torch.nn.functional.conv3d

    def broken_in_bf16(inputs, weight, *args, **kwargs):
        if torch.is_autocast_enabled("cpu"):
            weight = _WrongWeightGradient.apply(weight)
        return conv3d(inputs, weight, *args, **kwargs)

    monkeypatch.setattr(torch.nn.modules.conv.F, "conv3d", broken_in_bf16)
    assert acc.bf16_conv3d_error(shapes) == pytest.approx(1.0, abs=0.05)


def _nan_in_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every bf16-autocast 3D convolution return NaN: a CPU whose bf16 kernels fail the self-test."""
    conv3d = torch.nn.functional.conv3d

    def nan_in_bf16(inputs, weight, *args, **kwargs):
        output = conv3d(inputs, weight, *args, **kwargs)
        return output * float("nan") if torch.is_autocast_enabled("cpu") else output

    monkeypatch.setattr(torch.nn.modules.conv.F, "conv3d", nan_in_bf16)


def test_the_self_test_leaves_the_random_stream_as_it_found_it(monkeypatch: pytest.MonkeyPatch) -> None:
    shapes = ((8, 4, 4, 4), (8, 2, 4, 4))
    torch.manual_seed(5)
    before = torch.get_rng_state()
    first = acc.bf16_conv3d_error(shapes)
    assert torch.equal(torch.get_rng_state(), before)
    assert acc.bf16_conv3d_error(shapes) == first  # deterministic
    _nan_in_bf16(monkeypatch)  # the test now stops at its first shape
    assert acc.bf16_conv3d_error(shapes) == float("inf")
    assert torch.equal(torch.get_rng_state(), before)


def test_a_vae_fit_starts_from_the_same_weights_whether_or_not_the_self_test_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The self-test runs between ``set_seed`` and the model's initialisation: on a CPU with native
    bf16 it used to shift the initial weights, and a resumed fit no longer matched an uninterrupted one."""
    from latent.core.vae.loading import load_vae

    volumes = [np.random.default_rng(i).random((8, 16, 16), dtype=np.float32) for i in range(2)]
    fit = VAEFitConfig(channels=(4, 4, 8), norm_num_groups=4, max_steps=1, crop=None, final_eval_volumes=0,
                       mixed_precision="auto")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    plain = load_vae(str(fit_vae(volumes, tmp_path / "plain", fit, quiet=True)))
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    _nan_in_bf16(monkeypatch)  # the self-test fails and the fit runs float32, as without native bf16
    tested_dir = fit_vae(volumes, tmp_path / "tested", fit, quiet=True)
    assert json.loads((tested_dir / "fit_config.json").read_text())["mixed_precision"] == "no"
    tested = load_vae(str(tested_dir)).network.state_dict()
    for key, value in plain.network.state_dict().items():
        torch.testing.assert_close(tested[key], value, rtol=0, atol=0)


def test_a_bare_yaml_no_is_the_precision_no() -> None:
    """`train.mixed_precision=no` (or `mixed_precision: no` in a recipe) reaches pydantic as False."""
    import yaml
    from pydantic import ValidationError

    from latent.translate.train_config import TrainSection

    assert TrainSection(mixed_precision=yaml.safe_load("no")).mixed_precision == "no"
    assert VAEFitConfig(mixed_precision=yaml.safe_load("no")).mixed_precision == "no"
    with pytest.raises(ValidationError, match="mixed_precision"):
        TrainSection(mixed_precision=True)
