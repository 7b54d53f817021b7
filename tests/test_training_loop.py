"""The shared training loop (latent.core.training) on a toy task: budgets, exact resume, best selection,
checkpoint rotation; and that the VAE fit and a translation run leave the same run layout."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from latent.core.accelerator import make_accelerator
from latent.core.training import (
    CHECKPOINT_DIR,
    METRICS_FILE,
    LoopSettings,
    LoopState,
    latest_checkpoint,
    resume_point,
    run_loop,
    scheduled_lr,
)


class ToyTask:
    """Fit y = 3 x with one weight; batches are a function of (epoch, position) only."""

    def __init__(self, accelerator: Any, validation: list[float] | None = None) -> None:
        self.accelerator = accelerator
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.optimizer = accelerator.prepare(torch.optim.SGD([self.weight], lr=0.05))
        self.scores = list(validation or [])
        self.saved: list[int] = []
        self.seen: list[int] = []

    def epoch_length(self) -> int:
        return 4

    def batches(self, epoch: int, position: int):
        return (epoch * 10 + index for index in range(position, 4))

    def learning_rate(self, step: int) -> float:
        return 0.05

    def train_micro_batch(self, batch: int, step: int) -> tuple[dict[str, float], bool]:
        self.seen.append(batch)
        x = torch.randn(8)  # drawn after the loop's per-micro-step reseed
        loss = ((self.weight * x - 3 * x) ** 2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": float(loss.detach())}, True

    def validate(self, step: int) -> dict[str, float] | None:
        return {"mae": self.scores.pop(0)} if self.scores else None

    def save_best(self, step: int, metrics: dict[str, float]) -> None:
        self.saved.append(step)

    def extra_state(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        self.seen = list(extra["seen"])


def run(run_dir: Path, max_steps: int, checkpoint: Path | None = None, **settings: Any) -> tuple[ToyTask, LoopState]:
    accelerator = make_accelerator("no", cpu=True)
    task = ToyTask(accelerator, settings.pop("validation", None))
    on_validation = settings.pop("on_validation", None)
    accelerator.register_for_checkpointing(_Weight(task.weight))
    loop = LoopSettings(run_dir=run_dir, seed=1, max_steps=max_steps, log_every=1, checkpoint_every=3, **settings)
    return task, run_loop(accelerator, task, loop, checkpoint, quiet=True, on_validation=on_validation)


class _Weight:
    """Checkpointable holder of the toy parameter (accelerate needs state_dict / load_state_dict)."""

    def __init__(self, weight: torch.nn.Parameter) -> None:
        self.weight = weight

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.detach().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.weight.copy_(state["weight"])


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_resume_continues_exactly_and_rotates_checkpoints(tmp_path: Path) -> None:
    full, _ = run(tmp_path / "full", 7, keep_checkpoints=5)
    first, state = run(tmp_path / "cut", 5, keep_checkpoints=5)  # checkpoints at 3 and 5 (the end)
    assert (state.step, state.epoch, state.position) == (5, 1, 1)
    with pytest.raises(FileExistsError, match="resume"):
        resume_point(False, tmp_path / "cut")
    checkpoint = resume_point(True, tmp_path / "cut")
    assert checkpoint == latest_checkpoint(tmp_path / "cut") and checkpoint.name == "step_0000005"
    resumed, state = run(tmp_path / "cut", 7, checkpoint, keep_checkpoints=5)
    assert state.step == 7 and resumed.seen == full.seen == [0, 1, 2, 3, 10, 11, 12]
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "full"))
    assert float(resumed.weight.detach()) == pytest.approx(float(full.weight.detach()))
    # keep_checkpoints=1: only the newest complete folder stays
    run(tmp_path / "one", 7, keep_checkpoints=1)
    assert [f.name for f in (tmp_path / "one" / CHECKPOINT_DIR).iterdir()] == ["step_0000007"]


def test_checkpoint_seconds_saves_between_step_checkpoints_and_resumes_exactly(tmp_path: Path) -> None:
    """A run under a wall-clock limit checkpoints by time too, at any step, and resumes from it exactly."""
    full, _ = run(tmp_path / "full", 7, keep_checkpoints=10)
    run(tmp_path / "steps", 5, keep_checkpoints=10, checkpoint_seconds=1e9)
    assert sorted(f.name for f in (tmp_path / "steps" / CHECKPOINT_DIR).iterdir()) == ["step_0000003", "step_0000005"]
    run(tmp_path / "timed", 4, keep_checkpoints=10, checkpoint_seconds=1e-9)
    saved = sorted(f.name for f in (tmp_path / "timed" / CHECKPOINT_DIR).iterdir())
    assert saved == [f"step_{step:07d}" for step in (1, 2, 3, 4)]
    resumed, state = run(tmp_path / "timed", 7, resume_point(True, tmp_path / "timed"), keep_checkpoints=10)
    assert state.step == 7 and resumed.seen == full.seen
    assert float(resumed.weight.detach()) == pytest.approx(float(full.weight.detach()))


def test_an_incomplete_checkpoint_is_never_resumed(tmp_path: Path) -> None:
    run(tmp_path / "run", 3)
    (tmp_path / "run" / CHECKPOINT_DIR / "step_0000009").mkdir()  # save_state died before trainer_state.json
    assert latest_checkpoint(tmp_path / "run").name == "step_0000003"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resume_point(str(tmp_path / "run" / CHECKPOINT_DIR / "step_0000009"), tmp_path / "run")


def test_validation_keeps_the_lowest_metric_and_time_budget_stops(tmp_path: Path) -> None:
    task, state = run(tmp_path / "val", 6, val_every=2, validation=[5.0, 2.0, 4.0])
    assert task.saved == [2, 4] and (state.best_step, state.best_metric) == (4, 2.0)
    with pytest.raises(ValueError, match="both unset"):
        LoopSettings(run_dir=tmp_path, max_steps=None, max_seconds=None)
    _, state = run(tmp_path / "time", None, max_seconds=1e-6)
    assert state.step == 1 and latest_checkpoint(tmp_path / "time").name == "step_0000001"


def test_on_validation_sees_every_validation_and_may_stop_the_run(tmp_path: Path) -> None:
    seen: list[tuple[int, float]] = []

    def watch(step: int, metrics: dict[str, float]) -> bool:
        seen.append((step, metrics["mae"]))
        return metrics["mae"] > 4.5  # the second validation asks to stop

    task, state = run(tmp_path / "stopped", 10, val_every=2, validation=[3.0, 5.0, 1.0], on_validation=watch)
    assert seen == [(2, 3.0), (4, 5.0)] and state.step == 4 and task.saved == [2]
    assert latest_checkpoint(tmp_path / "stopped").name == "step_0000004"  # checkpointed as at the end
    seen.clear()
    _, state = run(tmp_path / "full", 6, val_every=2, validation=[3.0, 2.0, 1.0], on_validation=watch)
    assert [step for step, _ in seen] == [2, 4, 6] and state.step == 6


def test_schedule_warms_up_then_follows_the_cosine() -> None:
    common = {"warmup_steps": 2, "schedule": "cosine", "max_steps": 12, "min_lr_ratio": 0.1}
    assert scheduled_lr(1.0, 0, **common) == pytest.approx(0.5)
    assert scheduled_lr(1.0, 2, **common) == pytest.approx(1.0)
    assert scheduled_lr(1.0, 12, **common) == pytest.approx(0.1)
    assert scheduled_lr(1.0, 7, **common) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert scheduled_lr(1.0, 7, **{**common, "max_steps": None}) == 1.0  # a time budget only: constant


def test_vae_fit_and_translation_runs_share_one_layout(tmp_path: Path) -> None:
    import numpy as np

    from latent.core.vae.fit import VAEFitConfig, fit_vae
    from latent.translate.train import parse_config, train

    volumes = [np.random.default_rng(i).random((8, 16, 16), dtype=np.float32) for i in range(2)]
    tiny = {"channels": (8, 8, 16), "crop": None, "final_eval_volumes": 0, "checkpoint_every": 2, "log_every": 1}
    vae_dir = fit_vae(volumes, tmp_path / "vae", VAEFitConfig(max_steps=2, **tiny), quiet=True)

    class Latents(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int) -> dict:
            mr = torch.randn(4, 8, 8, 8, generator=torch.Generator().manual_seed(index))
            return {"pid": f"p{index}", "mr_mu": mr, "ct_mu": mr}

    config = parse_config({"model": {"family": "l2l_regress", "channels": [8, 8], "norm_num_groups": 4},
                           "data": {"batch_size": 2}, "run_dir": str(tmp_path / "l2l"),
                           "train": {"max_steps": 2, "log_every": 1, "checkpoint_every": 2, "tensorboard": False}})
    translation_dir = train(config, train_dataset=Latents(), quiet=True)
    for run_dir in (vae_dir, translation_dir):
        state = LoopState.read(latest_checkpoint(run_dir))
        assert state.step == 2 and latest_checkpoint(run_dir).name == "step_0000002"
        assert sorted(losses(run_dir)) == [1, 2]


class DivergingTask(ToyTask):
    """The toy task whose loss turns NaN from optimiser step ``nan_from`` (1-based) on."""

    def __init__(self, accelerator: Any, nan_from: int) -> None:
        super().__init__(accelerator)
        self.nan_from = nan_from

    def train_micro_batch(self, batch: int, step: int) -> tuple[dict[str, float], bool]:
        losses, stepped = super().train_micro_batch(batch, step)
        if step + 1 >= self.nan_from:
            losses["loss"] = math.nan
        return losses, stepped


def test_a_non_finite_loss_stops_the_run_and_keeps_the_earlier_checkpoint(tmp_path: Path) -> None:
    from latent.core.training import NonFiniteLossError

    accelerator = make_accelerator("no", cpu=True)
    task = DivergingTask(accelerator, nan_from=5)
    accelerator.register_for_checkpointing(_Weight(task.weight))
    loop = LoopSettings(run_dir=tmp_path, seed=1, max_steps=10, log_every=1, checkpoint_every=3)
    with pytest.raises(NonFiniteLossError, match=r"not finite at step 5 \(loss = nan\).*step_0000003 is the last checkpoint"):
        run_loop(accelerator, task, loop, None, quiet=True)
    assert latest_checkpoint(tmp_path).name == "step_0000003"
    logged = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4]  # the NaN step is not logged as a result
