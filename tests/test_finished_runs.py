"""Finished work is never overwritten (issue 32, item 2): a fresh run refuses a folder holding a run,
``--overwrite`` replaces it, and ``--resume`` reads its checkpoint whole before writing anything."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from typer.testing import CliRunner

from latent.app.cli import app
from latent.core.run_folder import RUN_RECORDS, file_problem, validate_checkpoint

TINY_MODEL = {"family": "l2l_regress", "channels": [8, 8], "norm_num_groups": 4}


class Latents(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> dict:
        mr = torch.randn(4, 8, 8, 8, generator=torch.Generator().manual_seed(index))
        return {"pid": f"p{index}", "mr_mu": mr, "ct_mu": 0.5 * mr}


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def in_memory_data(monkeypatch):
    """``latent train`` trains on two in-memory cases (no cache needed); one thread."""
    import latent.translate.train as trainer

    real_train = trainer.train
    monkeypatch.setattr(trainer, "train", lambda config, **kw: real_train(config, train_dataset=Latents(), **kw))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def main(arguments: list[str]) -> int:
    """``latent train ARGUMENTS`` (what ``translate/train.py`` hands over to); its output to stderr."""
    result = CliRunner().invoke(app, ["train", *arguments])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    sys.stderr.write(result.output)
    return result.exit_code


def recipe(tmp_path: Path, run_dir: Path, steps: int = 2) -> list[str]:
    (tmp_path / "recipe.json").write_text(json.dumps({
        "model": TINY_MODEL, "data": {"batch_size": 1}, "run_dir": str(run_dir),
        "train": {"max_steps": steps, "log_every": 1, "checkpoint_every": 1, "keep_checkpoints": 2,
                  "tensorboard": False, "val_every": None}}))
    return ["--config", str(tmp_path / "recipe.json"), "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 2-step run with checkpoints at steps 1 and 2 (copied by each test)."""
    import latent.translate.train as trainer

    tmp = tmp_path_factory.mktemp("trained")
    trainer.train(trainer.load_config(recipe(tmp, tmp / "run")[1]), train_dataset=Latents(), quiet=True)
    return tmp / "run"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_finished_run_without_checkpoints_is_refused_and_unchanged(tmp_path, trained, capsys):
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    shutil.rmtree(run / "checkpoints")  # deleted to save disk: still a finished run
    before = snapshot(run)
    assert main(recipe(tmp_path, run)) == 2
    line = one_error_line(capsys)
    assert line == (f"error: {run}: already holds a run (final/, config.json, config.yaml, producer.json, "
                    "metrics.jsonl): resume it (--resume), choose another folder, or pass --overwrite to replace it")
    assert main(recipe(tmp_path, run) + ["--resume"]) == 2  # nothing to continue from: refused too
    assert "no complete checkpoint to continue from" in one_error_line(capsys)
    assert snapshot(run) == before


def test_overwrite_replaces_the_run_records_and_keeps_other_files(tmp_path, trained, capsys, caplog):
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    (run / "notes.txt").write_text("mine")
    (run / "best").mkdir()
    (run / "best" / "stale.txt").write_text("from the earlier run")
    assert main(recipe(tmp_path, run) + ["--resume", "--overwrite"]) == 2
    assert "--resume and --overwrite exclude each other" in one_error_line(capsys)
    with caplog.at_level(logging.WARNING):
        assert main(recipe(tmp_path, run, steps=1) + ["--overwrite"]) == 0
    assert "--overwrite: removed the earlier run's" in caplog.text
    assert (run / "notes.txt").read_text() == "mine" and not (run / "best").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000001"]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_resume_from_a_truncated_checkpoint_fails_before_writing(tmp_path, trained, capsys):
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    weights = run / "checkpoints" / "step_0000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    before = snapshot(run)
    assert main(recipe(tmp_path, run, steps=3) + ["--resume", "model.lr=1e-4"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {weights}: truncated (") and "the checkpoint cannot be resumed" in line
    assert f"train.resume={run / 'checkpoints' / 'step_0000001'}" in line  # the older one is named
    assert snapshot(run) == before  # the config files were not rewritten

    (run / "checkpoints" / "step_0000002" / "trainer_state.json").write_text('{"step": 2, ')
    assert main(recipe(tmp_path, run, steps=3) + [f"train.resume={run / 'checkpoints' / 'step_0000002'}"]) == 2
    assert "trainer_state.json: not a readable trainer state" in one_error_line(capsys)


def test_a_damaged_random_state_is_an_error_unless_accepted(tmp_path, trained, capsys, caplog):
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    states = run / "checkpoints" / "step_0000002" / "random_states_0.pkl"
    states.write_bytes(states.read_bytes()[:50])
    before = snapshot(run)
    assert main(recipe(tmp_path, run, steps=3) + ["--resume"]) == 2
    assert one_error_line(capsys).startswith(f"error: {states}: random state truncated or damaged: the resume would "
                                             "not be exact; pass --resume-inexact to continue anyway")
    assert snapshot(run) == before
    with caplog.at_level(logging.WARNING):
        assert main(recipe(tmp_path, run, steps=3) + ["--resume-inexact"]) == 0
    assert "random state truncated or damaged: the resume is NOT exact" in caplog.text
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002", "step_0000003"]


def test_every_checkpoint_file_of_a_good_run_reads_whole(trained):
    checkpoint = trained / "checkpoints" / "step_0000002"
    validate_checkpoint(checkpoint)
    assert {p.name for p in checkpoint.iterdir()} >= {"model.safetensors", "optimizer.bin", "random_states_0.pkl"}
    assert all(file_problem(p) is None for p in checkpoint.iterdir())
    assert {p.name.rstrip("/") for p in trained.iterdir()} <= set(RUN_RECORDS)  # every record is known


def test_vae_fit_refuses_a_finished_vae_before_reading_volumes(tmp_path, monkeypatch):
    from latent.core.vae import pipeline as vae_pipeline
    from latent.core.errors import InputError

    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "model.safetensors").write_bytes(b"weights")
    monkeypatch.setattr(vae_pipeline, "training_volumes", lambda *a, **k: pytest.fail("volumes read"))
    with pytest.raises(InputError, match=r"vae: already holds a run \(model\.safetensors\)"):
        vae_pipeline.fit_vae_on_dataset(tmp_path / "data", tmp_path / "vae")
    assert (tmp_path / "vae" / "model.safetensors").read_bytes() == b"weights"
