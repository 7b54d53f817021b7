"""`latent tune` on a tiny phantom cache (tiny regress3d, 4 steps a trial): a study writes its outputs
and a best recipe `latent train` loads; the pruner stops a trial through the loop's validation hook;
a failed trial does not stop the study; two processes share one SQLite study; --resume marks the
interrupted trial failed and counts nothing twice; the space file is checked field by field."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

from latent.app.cli import app
from latent.app.tune.space import check_against_recipe, load_space
from latent.app.tune.study import INTERRUPTED, counted_trials, default_storage
from latent.app.tune.trial import TrialPlan, run_trial
from latent.core.errors import BadConfigError
from latent.translate.train import load_config, parse_config

from test_predict_run import runs  # noqa: F401 - the module fixture: phantom copy, tiny VAE, encoded cache

REPO_ROOT = Path(__file__).resolve().parents[1]
#: regress3d on the fixture's 10 x 10 x 6 mm grid (32^3 voxels): two levels, 4 -> 8 filters.
TINY_REGRESS3D = {"family": "regress3d", "patch_size": [16, 16, 16], "spacing_zyx": [6.0, 10.0, 10.0],
                  "max_levels": 3, "min_feature_size": 2, "base_channels": 4, "max_channels": 8, "deep_supr_num": 0,
                  "sw_batch_size": 2, "channels_last": False, "lr": 1e-3}
SPACE = {"model.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
         "model.gradient_weight": {"type": "uniform", "low": 0.0, "high": 1.0}}
cli = CliRunner()


def recipe(runs, folder: Path) -> dict:  # noqa: F811
    return {"data": {"cache": str(runs.cache), "split_file": str(runs.split_file), "batch_size": 1, "crop": None,
                     "preload": True},
            "model": dict(TINY_REGRESS3D),
            "train": {"max_steps": 4, "val_every": 2, "log_every": 1, "checkpoint_every": 1000,
                      "mixed_precision": "no", "tensorboard": False, "validator": "native"},
            "run_dir": str(folder / "unused")}


def write_inputs(runs, folder: Path, space: dict | None = None) -> tuple[Path, Path]:  # noqa: F811
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe(runs, folder)))
    (folder / "space.yaml").write_text(yaml.safe_dump(space or SPACE))
    return folder / "recipe.yaml", folder / "space.yaml"


def tune(recipe_path: Path, space_path: Path, out: Path, trials: int, *extra: str):
    result = cli.invoke(app, ["tune", "--config", str(recipe_path), "--space", str(space_path), "--out", str(out),
                              "--trials", str(trials), "-q", *extra])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def study_of(out: Path, name: str = "recipe") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=default_storage(out))


def test_a_study_writes_its_outputs_and_a_recipe_train_accepts(runs, tmp_path):  # noqa: F811
    recipe_path, space_path = write_inputs(runs, tmp_path)
    out = tmp_path / "tune"
    result = tune(recipe_path, space_path, out, 4, "--pruner", "none")
    assert result.exit_code == 0, result.output
    assert "ran 4 trial(s) (4 complete)" in result.output
    rows = list(csv.DictReader((out / "tune.csv").open()))
    assert [row["number"] for row in rows] == ["0", "1", "2", "3"] and {row["state"] for row in rows} == {"COMPLETE"}
    assert {"model.lr", "model.gradient_weight", "value", "seconds", "reason"} <= set(rows[0])
    assert all((out / "trials" / f"{n:04d}" / "best" / "validation.json").is_file() for n in range(4))
    record = json.loads((out / "tune.json").read_text())
    best = min(rows, key=lambda row: float(row["value"]))
    assert record["best"]["number"] == int(best["number"]) and record["counts"] == {"COMPLETE": 4}
    # the value is the trial's native-grid validation MAE that chose its best/
    chosen = json.loads((out / "trials" / f"{int(best['number']):04d}" / "best" / "validation.json").read_text())
    assert record["best"]["value"] == pytest.approx(chosen["mae"])
    assert set(record["importances"]) == {"model.lr", "model.gradient_weight"}
    page = (out / "tune.html").read_text()
    assert page.count("data:image/png;base64,") >= 4 and "fANOVA" in page
    config = load_config(out / "best_recipe.yaml")  # as is, no override
    assert config.model.lr == pytest.approx(float(best["model.lr"])) and config.run_dir == str(out / "best_run")

    before = hashlib.sha256((out / "study.db").read_bytes()).hexdigest()
    again = tune(recipe_path, space_path, out, 1)
    assert again.exit_code == 2 and "error: --out" in again.output and "--resume continues it" in again.output
    assert len(again.output.strip().splitlines()) == 1
    assert hashlib.sha256((out / "study.db").read_bytes()).hexdigest() == before


def test_the_pruner_stops_a_trial_at_its_first_validation(runs, tmp_path):  # noqa: F811
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))  # every MAE is above 0
    plan = TrialPlan(raw=recipe(runs, tmp_path), space=load_space(write_inputs(runs, tmp_path)[1]), out=tmp_path,
                     pruner="threshold")
    outcome = run_trial(study, plan)
    assert outcome.state == TrialState.PRUNED and outcome.reason.startswith("pruned by the threshold pruner at step 2")
    run_dir = tmp_path / "trials" / "0000"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2  # max_steps is 4: the loop stopped at the validation that was pruned
    frozen = study.trials[0]
    assert frozen.state == TrialState.PRUNED and frozen.user_attrs["reason"] == outcome.reason
    assert list(frozen.intermediate_values) == [2]


def test_a_failed_trial_is_named_and_the_study_goes_on(runs, tmp_path, monkeypatch):  # noqa: F811
    import latent.app.validation as validation

    real, calls = validation.train_run, []

    def first_fails(config, **kwargs):
        calls.append(config.run_dir)
        if len(calls) == 1:
            raise RuntimeError("out of luck")
        return real(config, **kwargs)

    monkeypatch.setattr(validation, "train_run", first_fails)
    recipe_path, space_path = write_inputs(runs, tmp_path)
    result = tune(recipe_path, space_path, tmp_path / "tune", 2, "--pruner", "none")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "tune" / "tune.csv").open()))
    assert [(row["state"], row["reason"]) for row in rows] == [("FAIL", "RuntimeError: out of luck"), ("COMPLETE", "")]
    record = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert "need at least 4 complete trials; the study has 1" in record["importances_note"]


def test_two_processes_share_one_sqlite_study(runs, tmp_path):  # noqa: F811
    recipe_path, space_path = write_inputs(runs, tmp_path)
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": ""}
    commands = [[sys.executable, "-m", "latent", "tune", "--config", str(recipe_path), "--space", str(space_path),
                 "--trials", trials, "--out", str(tmp_path / name), "--storage", storage, "--study", "shared",
                 "--pruner", "none", "-q"] for name, trials in (("a", "2"), ("b", "1"))]
    processes = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for c in commands]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    study = optuna.load_study(study_name="shared", storage=storage)
    assert sorted(t.number for t in study.trials) == [0, 1, 2]  # 2 + 1: one study, each its own trials
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    folders = sorted(p.name for name in ("a", "b") for p in (tmp_path / name / "trials").iterdir())
    assert folders == ["0000", "0001", "0002"]


def test_resume_marks_the_interrupted_trial_failed_and_counts_nothing_twice(runs, tmp_path):  # noqa: F811
    recipe_path, space_path = write_inputs(runs, tmp_path)
    out = tmp_path / "tune"
    assert tune(recipe_path, space_path, out, 2, "--pruner", "none").exit_code == 0
    killed = study_of(out).ask()  # a process died here: its trial stays RUNNING in the storage
    assert study_of(out).trials[killed.number].state == TrialState.RUNNING

    result = tune(recipe_path, space_path, out, 3, "--pruner", "none", "--resume")
    assert result.exit_code == 0, result.output
    assert f"marked interrupted (failed): trial(s) {killed.number}" in result.output and "ran 1 trial(s)" in result.output
    study = study_of(out)
    states = [(t.state, t.user_attrs.get("reason")) for t in study.trials]
    assert states == [(TrialState.COMPLETE, None)] * 2 + [(TrialState.FAIL, INTERRUPTED), (TrialState.COMPLETE, None)]
    assert counted_trials(study) == 3
    assert "ran 0 trial(s)" in tune(recipe_path, space_path, out, 3, "--resume").output
    assert "no study" in tune(recipe_path, space_path, tmp_path / "empty", 1, "--resume").output


def test_a_study_resumes_after_its_process_is_killed_mid_trial(runs, tmp_path):  # noqa: F811
    """A real SIGKILL while a trial trains: --resume marks that trial failed and runs what is left."""
    recipe_path, space_path = write_inputs(runs, tmp_path)
    out = tmp_path / "tune"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "latent", "tune", "--config", str(recipe_path), "--space", str(space_path),
               "--trials", "2", "--out", str(out), "--pruner", "none", "--trial-seconds", "300", "-q",
               "train.max_steps=100000"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            metrics = out / "trials" / "0000" / "metrics.jsonl"
            if metrics.is_file() and metrics.read_text().strip():  # the trial is training
                break
            time.sleep(0.5)
        else:
            pytest.fail("the first trial never started training")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    assert [t.state for t in study_of(out).trials] == [TrialState.RUNNING]

    result = tune(recipe_path, space_path, out, 2, "--pruner", "none", "--resume")
    assert result.exit_code == 0, result.output
    assert "marked interrupted (failed): trial(s) 0" in result.output and "ran 2 trial(s)" in result.output
    states = [(t.state, t.user_attrs.get("reason")) for t in study_of(out).trials]
    assert states == [(TrialState.FAIL, INTERRUPTED)] + [(TrialState.COMPLETE, None)] * 2
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0000", "0001", "0002"]


@pytest.mark.parametrize("space, message", [
    ({"model.lr": {"type": "gaussian", "low": 1, "high": 2}}, r"model\.lr\.type: Input should be 'loguniform'"),
    ({"model.lr": {"type": "loguniform", "low": 0.0, "high": 1e-2}}, r"model\.lr\.low: a loguniform .* low > 0"),
    ({"data.batch_size": {"type": "int", "low": 1.5, "high": 4}}, r"data\.batch_size: low/high/step: .* whole"),
    ({"model.loss": {"type": "categorical"}}, r"model\.loss\.choices: .* non-empty"),
    ({"run_dir": {"type": "categorical", "choices": ["a"]}}, r"run_dir: set by latent tune itself"),
    ({"model.lrr": {"type": "uniform", "low": 0, "high": 1}}, r"model\.lrr: not a field of the recipe's config"),
    ({"model.lr": {"type": "uniform", "low": -1, "high": 1}}, r"model\.lr = -1\.0: the recipe refuses it"),
    ({"model.lr.x": {"type": "uniform", "low": 0.1, "high": 1}}, r"model\.lr\.x: not a field of the recipe's config"),
])
def test_a_bad_space_is_named_by_field(space, message, tmp_path):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    raw = {"model": dict(TINY_REGRESS3D), "data": {"cache": "c.zarr"}, "train": {"validator": "native"}}
    with pytest.raises(BadConfigError, match=rf"^{tmp_path / 'space.yaml'}: {message}") as caught:
        check_against_recipe(load_space(tmp_path / "space.yaml"), raw, parse_config, tmp_path / "space.yaml")
    assert "\n" not in str(caught.value)


def test_the_shipped_space_fits_its_recipe():
    space = load_space("regress3d_demo_space")
    check_against_recipe(space, yaml.safe_load((REPO_ROOT / "configs" / "regress3d_demo.yaml").read_text()),
                         parse_config, "regress3d_demo_space")
    assert {"model.lr", "model.patch_size"} <= set(space.root)
