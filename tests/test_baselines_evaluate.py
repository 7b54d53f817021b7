"""Baselines and `latent evaluate` on phantoms: grids, scores, and per-case errors."""

import dataclasses
import functools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from latent.core.cases import discover_cases
from latent.evaluation.scoring import default_evaluate_workers, evaluate_predictions, format_summary
from latent.core.io import VolumeProperties, read_volume, write_volume
from latent.app.predict_run import predict_baseline
from latent.core.runner import default_workers, run_over_cases


@pytest.fixture()
def data_copy(phantom_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(phantom_root, root)
    return root


def test_water_baseline_is_on_the_native_grid(phantom_root: Path, tmp_path: Path) -> None:
    run = predict_baseline("water", phantom_root, tmp_path / "water", quiet=True)
    assert run.ok and len(run.results) == 6
    for case in discover_cases(phantom_root):
        sct, sct_properties = read_volume(tmp_path / "water" / f"{case.pid}.mha")
        mask, mask_properties = read_volume(case.mask)
        assert sct_properties.same_grid(mask_properties, tolerance=0)
        assert set(np.unique(sct[mask > 0])) == {0} and set(np.unique(sct[mask == 0])) <= {-1000}


def test_identical_prediction_scores_perfectly(phantom_root: Path, tmp_path: Path) -> None:
    pred = tmp_path / "ct_copy"
    pred.mkdir()
    for case in discover_cases(phantom_root):
        shutil.copy(case.ct, pred / f"{case.pid}.mha")
    evaluation = evaluate_predictions(pred, phantom_root, tmp_path / "scores.csv", quiet=True)
    assert evaluation.run.ok
    for row in evaluation.rows:
        assert row["mae"] == 0.0 and row["psnr"] == float("inf")
        assert row["ms_ssim"] == pytest.approx(1.0) and row["bone_dice"] == pytest.approx(1.0)
    report = json.loads((tmp_path / "scores.json").read_text())
    assert {row["pid"] for row in report["cases"]} == {c.pid for c in discover_cases(phantom_root)}
    assert "| all | 6 |" in format_summary(evaluation.summary)


def test_bulk_beats_water_on_phantoms(phantom_root: Path, tmp_path: Path) -> None:
    cases = discover_cases(phantom_root)
    test_ids = [cases[0].pid, cases[3].pid]
    fit_ids = [case.pid for case in cases if case.pid not in test_ids]
    scores = {}
    for method in ("water", "bulk"):
        predict_baseline(method, phantom_root, tmp_path / method, pids=test_ids, fit_pids=fit_ids, quiet=True)
        evaluation = evaluate_predictions(tmp_path / method, phantom_root, pids=test_ids, quiet=True)
        scores[method] = np.mean([row["mae"] for row in evaluation.rows])
    assert scores["bulk"] < scores["water"]
    assert scores["bulk"] > 30  # the task is not trivial
    model = json.loads((tmp_path / "bulk" / "bulk_model.json").read_text())
    assert model["fitted_on"] == sorted(fit_ids)


def test_broken_cases_are_reported_and_others_scored(data_copy: Path, tmp_path: Path) -> None:
    cases = discover_cases(data_copy)
    pred = tmp_path / "pred"
    predict_baseline("water", data_copy, pred, quiet=True)
    # 1: missing prediction; 2: prediction on another grid; 3: truncated CT; 4: empty mask.
    (pred / f"{cases[0].pid}.mha").unlink()
    sct, properties = read_volume(pred / f"{cases[1].pid}.mha")
    write_volume(pred / f"{cases[1].pid}.mha", sct[:-1], type(properties)(properties.spacing, properties.origin,
                 properties.direction, (properties.size[0], properties.size[1], properties.size[2] - 1)))
    data = cases[2].ct.read_bytes()
    cases[2].ct.write_bytes(data[: len(data) // 3])
    mask, mask_properties = read_volume(cases[3].mask)
    write_volume(cases[3].mask, np.zeros_like(mask), mask_properties)
    evaluation = evaluate_predictions(pred, data_copy, quiet=True)
    failures = evaluation.run.failures
    assert set(failures) == {c.pid for c in cases[:4]}
    assert "no prediction" in failures[cases[0].pid]
    assert "on another grid" in failures[cases[1].pid] and "size" in failures[cases[1].pid]
    assert "cannot be read" in failures[cases[2].pid] and "ct.mha" in failures[cases[2].pid]
    assert "empty mask" in failures[cases[3].pid]
    assert sorted(r["pid"] for r in evaluation.rows) == sorted(c.pid for c in cases[4:])


def test_predict_reports_broken_inputs(data_copy: Path, tmp_path: Path) -> None:
    cases = discover_cases(data_copy)
    nan_mr = np.full((4, 5, 6), np.nan, np.float32)
    from latent.core.io import VolumeProperties
    write_volume(cases[0].mr, nan_mr, VolumeProperties((1, 1, 1), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (6, 5, 4), "float32"))
    cases[1].mask.unlink()
    run = predict_baseline("water", data_copy, tmp_path / "pred", quiet=True)
    assert "NaN/inf" in run.failures[cases[0].pid]
    assert "no mask" in run.failures[cases[1].pid]
    assert len(run.results) == len(cases) - 2


def test_parallel_scoring_equals_serial(data_copy: Path, tmp_path: Path) -> None:
    cases = discover_cases(data_copy)
    pred = tmp_path / "pred"
    predict_baseline("water", data_copy, pred, quiet=True)
    (pred / f"{cases[0].pid}.mha").unlink()  # a failure must be reported the same way too
    serial = evaluate_predictions(pred, data_copy, quiet=True, workers=1)
    parallel = evaluate_predictions(pred, data_copy, quiet=True, workers=2)
    assert len(serial.rows) == len(cases) - 1
    assert json.dumps(parallel.rows) == json.dumps(serial.rows)
    assert json.dumps(parallel.summary) == json.dumps(serial.summary)
    assert json.dumps(parallel.structural_bias) == json.dumps(serial.structural_bias)
    assert serial.structural_bias["regions"][-1]["n"] == len(cases) - 1
    assert parallel.run.failures == serial.run.failures and cases[0].pid in serial.run.failures


def test_default_workers_follow_the_case_size(phantom_root: Path, tmp_path: Path) -> None:
    small = discover_cases(phantom_root)
    assert default_evaluate_workers(small) == 1  # phantoms score faster than a worker starts
    large = tmp_path / "ct.mha"
    properties = VolumeProperties((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), (130, 130, 130))
    write_volume(large, np.zeros((130, 130, 130), np.int16), properties, compress=False)
    cases = [dataclasses.replace(case, ct=large) for case in small]
    assert default_evaluate_workers(cases) == default_workers()
    assert default_evaluate_workers(cases[:1]) == 1


def _pid_or_crash(case, main_pid: int) -> str:
    """In a worker process: die abruptly (a broken pool); in the main process: the case id."""
    if os.getpid() != main_pid:
        os._exit(1)
    return case.pid


def test_a_broken_worker_pool_falls_back_to_this_process(phantom_root: Path, caplog) -> None:
    cases = discover_cases(phantom_root)
    work = functools.partial(_pid_or_crash, main_pid=os.getpid())
    run = run_over_cases(cases, work, "test", quiet=True, workers=2)
    assert run.ok and run.results == {case.pid: case.pid for case in cases}
    assert "worker pool broke" in caplog.text
    with pytest.raises(ValueError, match="workers"):
        run_over_cases(cases, work, "test", quiet=True, workers=0)


@pytest.mark.parametrize("method, fmt", [("water", "dicom"), ("bulk", "nii.gz"), ("grid_floor", "dicom")])
def test_baselines_and_grid_floors_write_every_format(method: str, fmt: str, phantom_root: Path,
                                                      tmp_path: Path) -> None:
    """`latent predict --method M --format F` writes F, like a trained run (no silent .mha)."""
    import SimpleITK as sitk
    from typer.testing import CliRunner

    from latent.app.cli import app

    case = discover_cases(phantom_root)[0]
    out = tmp_path / "pred"
    grid = ["--grid", "6x6x6:32x64x64"] if method == "grid_floor" else []
    result = CliRunner().invoke(app, ["predict", "--method", method, "--data", str(phantom_root), "--out", str(out),
                                      "--format", fmt, "-q", *grid])
    assert result.exit_code == 0, result.output
    if fmt == "dicom":
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(out / case.pid))
        image = sitk.ReadImage(files)
    else:
        assert not (out / f"{case.pid}.mha").exists()
        image = sitk.ReadImage(str(out / f"{case.pid}.{fmt}"))
    reference = sitk.ReadImage(str(case.mr))
    assert image.GetSize() == reference.GetSize()
    assert np.allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-3)
