"""The training loop: run records, exact resume, config errors, validation hook, cache data, 2 processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import Dataset

from latent.translate.models.base import load_pretrained
from latent.translate.train import ConfigError, load_config, parse_config, train

REPO_ROOT = Path(__file__).resolve().parents[1]
LATENT = 8
TINY_MODEL = {"family": "l2l_ddim", "channels": [8, 8], "norm_num_groups": 4, "num_inference_steps": 2, "lr": 3e-3}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ToyLatents(Dataset):
    """Batch-contract items of a learnable mapping (CT latent = 0.5 x MR latent, channels reversed)."""

    def __init__(self, cases: int, seed: int = 0) -> None:
        self.mr = torch.randn(cases, 4, LATENT, LATENT, LATENT, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.mr)

    def __getitem__(self, index: int) -> dict:
        mr = self.mr[index]
        return {"pid": f"toy{index}", "mr_mu": mr, "ct_mu": 0.5 * mr.flip(0)}


def tiny_config(run_dir: Path, **train_changes):
    return parse_config({
        "model": TINY_MODEL, "data": {"batch_size": 2}, "run_dir": str(run_dir),
        "train": {"max_steps": 6, "log_every": 1, "checkpoint_every": 3, "val_every": 3, "tensorboard": False,
                  **train_changes},
    })


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_run_dir_records_checkpoints_best_and_final(tmp_path):
    run_dir = train(tiny_config(tmp_path / "run"), train_dataset=ToyLatents(5), val_dataset=ToyLatents(2, seed=1),
                    quiet=True)
    assert sorted(losses_by_step(run_dir)) == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(v) for v in losses_by_step(run_dir).values())
    val = [r for r in read_metrics(run_dir) if "val/mae" in r]
    assert [r["step"] for r in val] == [3, 6]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["channels"] == [8, 8]
    assert json.loads((run_dir / "config.json").read_text())["train"]["max_steps"] == 6
    assert "producer_key" in json.loads((run_dir / "producer.json").read_text())
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step_0000003", "step_0000006"]
    state = json.loads((run_dir / "checkpoints" / "step_0000006" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["position"]) == (6, 1, 3)  # 3 batches per epoch
    best = json.loads((run_dir / "best" / "validation.json").read_text())
    assert best["mae"] == min(r["val/mae"] for r in val)
    assert "latent-space proxy, not HU" in best["selected_by"]  # the run says which metric chose best/
    assert set(json.loads((run_dir / "final" / "trainer_state.json").read_text())) == {"step", "best_step",
                                                                                       "best_metric"}
    final = load_pretrained(run_dir / "final")
    assert final.config.channels == (8, 8)
    with pytest.raises(FileExistsError, match="resume"):  # a fresh run never overwrites checkpoints
        train(tiny_config(tmp_path / "run"), train_dataset=ToyLatents(5), quiet=True)


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    data = dict(train_dataset=ToyLatents(5), val_dataset=None, quiet=True)
    steps = dict(max_steps=8, checkpoint_every=4)
    full = train(tiny_config(tmp_path / "full", **steps), **data)
    # Interrupted run: its last checkpoint is at step 4, mid-epoch (epochs are 3 batches of 2, 2, 1 cases),
    # and it logged a step past that checkpoint before dying ...
    train(tiny_config(tmp_path / "cut", max_steps=4, checkpoint_every=4), **data)
    with (tmp_path / "cut" / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps({"step": 5, "loss": -1.0}) + "\n")
    state = json.loads((tmp_path / "cut" / "checkpoints" / "step_0000004" / "trainer_state.json").read_text())
    assert (state["epoch"], state["position"]) == (1, 1)
    # ... then a fresh process continues it to the end.
    resumed = train(tiny_config(tmp_path / "cut", resume=True, **steps), **data)
    expected, got = losses_by_step(full), losses_by_step(resumed)
    assert sorted(got) == list(range(1, 9))  # the stale step-5 record is gone
    for step in range(5, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step
    assert len({round(got[step], 6) for step in range(5, 9)}) == 4
    final_a, final_b = load_pretrained(full / "final"), load_pretrained(resumed / "final")
    for key, value in final_a.state_dict().items():
        torch.testing.assert_close(final_b.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_weight_average_is_what_a_run_keeps_and_resumes_exactly(tmp_path):
    """train.ema_decay: final/ holds the ramped EMA of the per-step weights, and a resumed run the same one."""
    data = dict(train_dataset=ToyLatents(5), val_dataset=None, quiet=True)
    live = [load_pretrained(train(tiny_config(tmp_path / f"live{k}", max_steps=k, checkpoint_every=4), **data)
                            / "final").state_dict() for k in (1, 2, 3, 4)]
    decay = 0.2  # below the ramp's (1 + n) / (10 + n) from n = 1 on, so both branches are used
    expected = {key: value.clone() for key, value in live[0].items()}
    for n, weights in enumerate(live[1:], start=1):
        effective = min(decay, (1 + n) / (10 + n))
        for key, value in weights.items():
            if value.is_floating_point():
                expected[key] = expected[key] * effective + value * (1 - effective)
    averaged = train(tiny_config(tmp_path / "ema", max_steps=4, checkpoint_every=4, ema_decay=decay), **data)
    got = load_pretrained(averaged / "final").state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(got[key], live[-1][key]) for key in got if got[key].is_floating_point())
    # Interrupted at step 2 and resumed: the average continues from its checkpoint.
    train(tiny_config(tmp_path / "cut", max_steps=2, checkpoint_every=2, ema_decay=decay), **data)
    resumed = train(tiny_config(tmp_path / "cut", max_steps=4, checkpoint_every=2, ema_decay=decay, resume=True),
                    **data)
    for key, value in load_pretrained(resumed / "final").state_dict().items():
        torch.testing.assert_close(value, got[key], rtol=1e-5, atol=1e-6)


def test_a_vae_recipe_refuses_the_translation_ema_field():
    """The VAE's EMA is model.ema_decay; train.ema_decay in a VAE recipe is named, not ignored."""
    from latent.core.errors import BadConfigError
    from latent.core.vae.pipeline import fit_config_of_recipe

    recipe = {"model": {"family": "vae"}, "data": {"root": "data"}, "train": {"max_steps": 2}}
    assert fit_config_of_recipe(recipe).ema_decay == 0.995
    with pytest.raises(BadConfigError, match=r"^train\.ema_decay: .*model\.ema_decay"):
        fit_config_of_recipe({**recipe, "train": {"max_steps": 2, "ema_decay": 0.9}})


def test_weight_average_copies_buffers():
    from latent.core.weight_average import update_average, weight_average

    model = torch.nn.BatchNorm1d(3)
    average = weight_average(model, 0.9)
    model(torch.randn(8, 3) * 5 + 2)  # running statistics move in training mode
    update_average(average, model)
    torch.testing.assert_close(average.module.running_mean, model.running_mean)
    assert int(average.module.num_batches_tracked) == 1


def test_time_budget_stops_early_with_a_resumable_checkpoint(tmp_path):
    run_dir = train(tiny_config(tmp_path / "run", max_steps=100_000, max_seconds=1.0, checkpoint_every=100_000),
                    train_dataset=ToyLatents(4), quiet=True)
    last = max(losses_by_step(run_dir))
    assert 1 <= last < 100_000
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [f"step_{last:07d}"]
    assert (run_dir / "final" / "model.safetensors").is_file()


def test_injected_validator_selects_best(tmp_path):
    maes = iter([3.0, 1.0, 2.0])
    calls = []

    def validator(model, batches):
        calls.append(sorted(pid for batch in batches for pid in batch["pid"]))
        return {"mae": next(maes), "extra": 7.0}

    run_dir = train(tiny_config(tmp_path / "run", val_every=2), train_dataset=ToyLatents(4),
                    val_dataset=ToyLatents(2, seed=1), validator=validator, quiet=True)
    assert calls == [["toy0", "toy1"]] * 3
    best = json.loads((run_dir / "best" / "validation.json").read_text())
    assert best.pop("selected_by").startswith("val/mae of the validator ")
    assert best == {"step": 4, "mae": 1.0, "extra": 7.0}
    assert [r["val/extra"] for r in read_metrics(run_dir) if "val/extra" in r] == [7.0] * 3


@pytest.mark.parametrize("override, field", [
    ("train.max_step=3", "train.max_step"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("model.channels=[6, 8]", "model.channels"),
    ("model.bogus=1", "model.bogus"),
    ("data.batch_size=0", "data.batch_size"),
    ("model.family=nope", "model.family"),
])
def test_bad_config_field_is_named(tmp_path, override, field):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": TINY_MODEL, "run_dir": str(tmp_path / "run")}))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(recipe, [override])


def test_overrides_parse_yaml_values(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": TINY_MODEL}))
    config = load_config(recipe, ["train.max_steps=20", "model.lr=1e-4", "data.crop=[4, 4, 4]",
                                  "train.max_seconds=null", "model.prediction_type=sample"])
    assert (config.train.max_steps, config.model.lr, config.data.crop) == (20, 1e-4, (4, 4, 4))
    assert config.train.max_seconds is None and config.model.prediction_type == "sample"
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(recipe, ["train.max_steps"])


LATENT_RECIPES = sorted([*(REPO_ROOT / "configs").glob("l2l_*.yaml"), *(REPO_ROOT / "configs").glob("l2sct_*.yaml")])


def test_latent_recipes_exist():
    names = {p.stem for p in LATENT_RECIPES}
    assert names >= {f"{m}_{s}" for m in ("l2l_ddim", "l2l_controlnet", "l2l_regress", "l2sct") for s in ("demo", "full")}
    assert "l2l_controlnet_prior_demo" in names


@pytest.mark.parametrize("recipe", LATENT_RECIPES, ids=lambda p: p.name)
def test_recipes_are_valid(recipe):
    config = load_config(recipe)
    assert config.run_dir and not Path(config.run_dir).is_absolute()


# ----------------------------------------------------------------------------- on-disk cache
def write_tiny_cache(root: Path) -> tuple[Path, Path]:
    """A latent cache of 6 random cases (4 train, 2 val) written through the cache's public API."""
    from latent.cache import LatentCache, producer_record

    record = producer_record({"weights_sha256": "0" * 64, "config": {"latent_channels": 4}},
                             {"spacing": [1, 1, 3], "shape": [4 * LATENT] * 3}, {"ct": "test", "mr": "test"})
    cache = LatentCache(root / "cache.zarr", record)
    rng = np.random.default_rng(0)
    pids = [f"1ABA{i:03d}" for i in range(6)]
    for pid in pids:
        mr = rng.normal(size=(4, LATENT, LATENT, LATENT)).astype(np.float32)
        pixels = mr[0].repeat(4, 0).repeat(4, 1).repeat(4, 2)
        cache.write_case(pid, {"mr_mu": mr, "ct_mu": 0.5 * mr[::-1].copy(), "mask_latent": (mr[0] > -1).astype(np.uint8),
                               "mr_pixels": pixels, "ct_pixels": np.tanh(pixels),
                               "mask_pixels": (pixels > -1).astype(np.uint8)}, {"region": "AB"})
    cache.update_latent_stats(pids[:4])
    split = root / "split.json"
    split.write_text(json.dumps({"train": pids[:4], "val": pids[4:]}))
    return root / "cache.zarr", split


def test_cache_data_feeds_every_latent_family(tmp_path):
    cache_path, split = write_tiny_cache(tmp_path)
    for family in ({"family": "l2l_regress", "channels": [8, 8], "norm_num_groups": 4, "mask_loss": True},
                   {"family": "l2sct", "trunk_channels": 8, "trunk_blocks": 1, "decoder_channels": [4, 8, 8],
                    "norm_num_groups": 4}):
        config = parse_config({
            "data": {"cache": str(cache_path), "split_file": str(split), "batch_size": 2, "crop": 4},
            "model": family, "run_dir": str(tmp_path / family["family"]),
            "train": {"max_steps": 2, "log_every": 1, "checkpoint_every": 2, "val_every": 2, "tensorboard": False},
        })
        run_dir = train(config, quiet=True)
        producer = json.loads((run_dir / "producer.json").read_text())
        assert producer["latent_stats"]["ct_mu"]["mean"] and producer["record"]["producer_key"] == producer["producer_key"]
        assert [r["step"] for r in read_metrics(run_dir) if "val/mae" in r] == [2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_process_cpu_launch_writes_one_checkpoint(tmp_path):
    cache_path, split = write_tiny_cache(tmp_path)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "data": {"cache": str(cache_path), "split_file": str(split), "batch_size": 1},
        "model": TINY_MODEL, "run_dir": str(tmp_path / "run"),
        "train": {"max_steps": 4, "log_every": 1, "checkpoint_every": 4, "val_every": 4, "tensorboard": False},
    }))
    # `accelerate launch --cpu` uses its simple (one-process) launcher; `--multi_gpu` starts torchrun,
    # and train() asks Accelerate for a CPU process group (gloo) when there is no GPU.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "translate/train.py", "--config", str(recipe), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    checkpoints = list((run_dir / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step_0000004"]
    assert sorted(p.name for p in checkpoints[0].glob("random_states_*.pkl")) == ["random_states_0.pkl",
                                                                                   "random_states_1.pkl"]
    state = json.loads((checkpoints[0] / "trainer_state.json").read_text())
    assert (state["num_processes"], state["epoch"]) == (2, 1)  # 4 cases / (2 processes x batch 1) = 2 steps an epoch
    assert sorted(losses_by_step(run_dir)) == [1, 2, 3, 4]  # logged once, by the main process
    assert (run_dir / "final" / "model.safetensors").is_file()


def test_validator_names_of_earlier_recipes_load_and_native_needs_the_app(tmp_path):
    """`train.validator` is `canonical` or `native`; earlier spellings load as them (no code is loaded
    by name), and the translate stage alone refuses `native` in one line naming the field."""
    from latent.core.errors import BadConfigError

    def validator_of(value):
        return parse_config({"model": TINY_MODEL, "run_dir": str(tmp_path / "r"),
                             "train": {"validator": value}}).train.validator

    assert validator_of("default") == "canonical"
    assert validator_of("latent.app.validation:native_validator") == "native"
    with pytest.raises(ConfigError, match=r"train\.validator"):
        validator_of("some.module:factory")
    config = tiny_config(tmp_path / "run", validator="native", max_steps=1)
    with pytest.raises(BadConfigError, match=r"^train\.validator: native .* `latent train"):
        train(config, train_dataset=ToyLatents(2), val_dataset=ToyLatents(1), quiet=True)


def test_a_vae_recipe_and_a_translation_recipe_share_one_schema(tmp_path):
    """`model.family: vae` is a family of the one recipe schema: the same data and train sections,
    the same dotted errors; the earlier VAE layout (family and fit at the top) reads as the same."""
    import yaml as yaml_module

    from latent.core.vae.pipeline import load_fit_config

    vae, l2sct = load_config("vae_standin"), load_config("l2sct_demo")
    assert type(vae) is type(l2sct) and type(vae.train) is type(l2sct.train) and type(vae.data) is type(l2sct.data)
    assert vae.is_vae and not l2sct.is_vae and vae.train.max_steps == 3000
    with pytest.raises(ConfigError, match=r"train\.max_stepz: Extra inputs are not permitted"):
        load_config("vae_standin", ["train.max_stepz=3"])
    with pytest.raises(ConfigError, match=r"model\.chanels: Extra inputs are not permitted"):
        load_config("vae_standin", ["model.chanels=[8,8,8]"])
    earlier = {"family": "vae", "data": {"root": "d", "grid": "3x3x5:32x128x128"}, "run_dir": "r",
               "fit": {"channels": [8, 16, 16], "max_steps": 7, "time_budget_s": 30, "lr": 1e-3}}
    (tmp_path / "earlier.yaml").write_text(yaml_module.safe_dump(earlier))
    upgraded = load_config(str(tmp_path / "earlier.yaml"))
    assert upgraded.is_vae and upgraded.model.channels == (8, 16, 16) and upgraded.model.lr == 1e-3
    assert (upgraded.train.max_steps, upgraded.train.max_seconds, upgraded.train.warmup_steps) == (7, 30, 50)
    assert load_fit_config(str(tmp_path / "earlier.yaml")) == load_fit_config(None, channels=[8, 16, 16], max_steps=7,
                                                                                time_budget_s=30, lr=1e-3)
    with pytest.raises(ConfigError, match=r"data\.root: only the VAE reads volumes"):
        load_config("l2sct_demo", ["data.root=/data"])
