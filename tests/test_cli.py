"""The `latent` command line: in-process calls and one subprocess smoke test per verb."""

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from latent.app.cli import app

runner = CliRunner()


def test_phantom_split_predict_evaluate_in_process(tmp_path: Path) -> None:
    data = tmp_path / "data"
    result = runner.invoke(app, ["phantom", "--out", str(data), "--cases", "6", "--seed", "3"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["split", "--data", str(data), "--out", str(tmp_path / "s.json")])
    assert result.exit_code == 0 and "train=" in result.output
    result = runner.invoke(app, ["predict", "--method", "bulk", "--data", str(data), "--out", str(tmp_path / "p"), "-q"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate", "--pred", str(tmp_path / "p"), "--data", str(data),
                                 "--out", str(tmp_path / "scores.csv"), "-q"])
    assert result.exit_code == 0, result.output
    assert "| all | 6 |" in result.output and (tmp_path / "scores.csv").is_file()


def test_missing_prediction_folder_is_one_line_error(tmp_path: Path, phantom_root: Path) -> None:
    result = runner.invoke(app, ["evaluate", "--pred", str(tmp_path / "nope"), "--data", str(phantom_root)])
    assert result.exit_code == 2
    assert "nope: prediction folder not found" in result.output
    assert "Traceback" not in result.output


def test_subprocess_smoke(tmp_path: Path, phantom_root: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "latent.app.cli", "predict", "--method", "water", "--data", str(phantom_root),
         "--out", str(tmp_path / "p"), "-q"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    completed = subprocess.run(
        [sys.executable, "-m", "latent.app.cli", "evaluate", "--pred", str(tmp_path / "p"), "--data", str(tmp_path)],
        capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2 and completed.stderr.strip().startswith("error:")
    assert "Traceback" not in completed.stderr


def test_train_verb_runs_the_training_loop_and_reports_a_bad_recipe_in_one_line(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model:\n  family: l2sct\n  trunk_chanels: 8\n")
    result = runner.invoke(app, ["train", "--config", str(recipe), "--quiet", "train.max_steps=1"])
    assert result.exit_code == 2, result.output
    assert "model.trunk_chanels: Extra inputs are not permitted" in result.output
    result = runner.invoke(app, ["train", "--config", "no_such_recipe"])
    assert result.exit_code == 2 and "no shipped recipe of that name" in result.output


def test_train_verb_fits_the_vae_recipe_with_the_shared_loop(tmp_path: Path, phantom_root: Path) -> None:
    import json

    from latent.core.training import latest_checkpoint
    from latent.core.vae.loading import load_vae

    out = tmp_path / "vae"
    small = ["model.channels=[8, 8, 16]", "model.crop=[16, 32, 32]", "model.final_eval_volumes=0", "train.log_every=1"]
    arguments = ["train", "--config", "vae_standin", "--quiet", f"data.root={phantom_root}", "data.split_file=null",
                 "data.grid=3x3x5:32x64x64", f"run_dir={out}", *small, "train.max_steps=2"]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert load_vae(str(out)).class_name == "AutoencoderKL" and latest_checkpoint(out).name == "step_0000002"
    # the run layout of every family: best/ and final/ model folders, final/trainer_state.json, metrics.jsonl
    assert (out / "best" / "model.safetensors").is_file() and (out / "final" / "model.safetensors").is_file()
    assert set(json.loads((out / "final" / "trainer_state.json").read_text())) == {"step", "best_step", "best_metric"}
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    result = runner.invoke(app, arguments)  # a second fresh run would overwrite the checkpoints
    assert result.exit_code == 2 and "--resume" in result.output
    result = runner.invoke(app, [*arguments[:-1], "train.max_steps=3", "--resume"])
    assert result.exit_code == 0 and latest_checkpoint(out).name == "step_0000003", result.output
    result = runner.invoke(app, [*arguments, "model.lr=-1"])
    assert result.exit_code == 2 and "model.lr: Input should be greater than 0" in result.output
    result = runner.invoke(app, [*arguments, "data.root=null"])
    assert result.exit_code == 2 and "data.root: the VAE trains on a data set's volumes" in result.output


def test_debug_shows_the_traceback_of_an_input_error(tmp_path: Path, phantom_root: Path) -> None:
    from latent.core.cases import CaseError

    arguments = ["evaluate", "--pred", str(tmp_path / "nope"), "--data", str(phantom_root)]
    assert runner.invoke(app, arguments).exit_code == 2
    result = runner.invoke(app, ["--debug", *arguments])
    assert isinstance(result.exception, CaseError) and "prediction folder not found" in str(result.exception)
