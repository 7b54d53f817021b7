"""StructB on constructed masks with known answers, its common grid, and `latent evaluate`'s cohort figures."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from latent.app.predict_run import predict_baseline
from latent.core.cases import discover_cases
from latent.core.grid import GridError, parse_grid_spec
from latent.core.io import VolumeProperties, read_volume, write_volume
from latent.evaluation.case_uncertainty import case_uncertainty, std_mae_spearman
from latent.evaluation.scoring import evaluate_predictions
from latent.evaluation.structb import (case_structures, cohort_structural_bias, structb_by_region, structb_grid,
                                       structural_bias)

SHAPE = (10, 10, 10)
N = math.prod(SHAPE)


def cube(corner: tuple[int, int, int], side: int, shape=SHAPE) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    z, y, x = corner
    mask[z:z + side, y:y + side, x:x + side] = True
    return mask


def test_identical_masks_give_zero():
    mask = cube((2, 2, 2), 4)
    assert structural_bias(mask, mask) == 0.0
    assert cohort_structural_bias([mask, cube((1, 1, 1), 3)], [mask, cube((1, 1, 1), 3)]) == 0.0


def test_disjoint_masks_of_equal_volume():
    # d = +-1 on 2V voxels: ||d|| = sqrt(2V); both averages V/N, so StructB = sqrt(2N / V).
    real, synthetic = cube((0, 0, 0), 2), cube((5, 5, 5), 2)
    volume = 8
    assert structural_bias(real, synthetic) == pytest.approx(math.sqrt(2 * N / volume))  # 15.81


def test_cube_shifted_by_one_voxel():
    # Side s shifted one voxel along x: 2 s^2 voxels differ,
    # so StructB = 2 sqrt(2 s^2) N / (sqrt(N) 2 s^3) = sqrt(2N) / s^2.
    side = 4
    real, synthetic = cube((2, 2, 2), side), cube((2, 2, 3), side)
    assert structural_bias(real, synthetic) == pytest.approx(math.sqrt(2 * N) / side**2)


def test_the_means_over_cases_are_compared():
    # Real: A twice; synthetic: A once and a disjoint B once. d = 0.5 on A, -0.5 on B: half the disjoint value.
    a, b = cube((0, 0, 0), 2), cube((5, 5, 5), 2)
    assert cohort_structural_bias([a, a], [a, b]) == pytest.approx(math.sqrt(2 * N / 8) / 2)
    # Case order within a cohort does not matter, only the mean masks.
    assert cohort_structural_bias([a, a], [b, a]) == cohort_structural_bias([a, a], [a, b])


def test_empty_and_mismatched_masks():
    empty = np.zeros(SHAPE, dtype=bool)
    assert math.isnan(structural_bias(empty, empty))
    assert structural_bias(cube((0, 0, 0), 2), empty) == pytest.approx(2 * math.sqrt(8) * math.sqrt(N) / 8)
    with pytest.raises(ValueError, match="share one non-empty shape"):
        structural_bias(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="as many real as synthetic"):
        cohort_structural_bias([empty], [])


def test_structb_grid_needs_one_shape():
    assert structb_grid("3x3x3:32x32x32").shape == (32, 32, 32)
    with pytest.raises(GridError, match=r"--structb-grid 2x2x3:fit: StructB needs one shape"):
        structb_grid("2x2x3:fit")
    with pytest.raises(GridError, match="--structb-grid"):
        structb_grid("3x3")


def native_case(shift: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, VolumeProperties]:
    """A 20^3 native case at 3 mm: body (0 HU) in a box, a bone cube (1000 HU) shifted by ``shift`` x voxels."""
    ct = np.full((20, 20, 20), -1000.0, dtype=np.float32)
    ct[4:16, 4:16, 4:16] = 0.0
    ct[8:12, 8:12, 8 + shift:12 + shift] = 1000.0
    mask = (ct > -1000).astype(np.uint8)
    return ct, ct.copy(), mask, VolumeProperties((3.0, 3.0, 3.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1),
                                                 (20, 20, 20))


def test_case_structures_on_the_common_grid():
    grid = parse_grid_spec("3x3x3:32x32x32")  # native spacing: resampling moves whole voxels only
    ct, _, mask, properties = native_case()
    shifted, *_ = native_case(shift=1)
    same = case_structures(ct, ct, mask, properties, grid)
    moved = case_structures(ct, shifted, mask, properties, grid)
    real_bone, synthetic_bone = moved.masks("bone")
    assert real_bone.shape == (32, 32, 32) and real_bone.sum() == synthetic_bone.sum() == 64
    real_body, _ = moved.masks("body")
    assert real_body.sum() == 12**3
    result = structb_by_region([("AB", same), ("AB", moved), ("HN", same)], grid)
    regions = {entry["region"]: entry for entry in result["regions"]}
    assert [entry["region"] for entry in result["regions"]] == ["AB", "HN", "all"]
    assert regions["HN"]["bone"] == 0.0 and regions["AB"]["body"] == 0.0 and regions["all"]["n"] == 3
    # AB: one of two sCT cubes (side 4) shifted one voxel: d = +-0.5 on 2 * 16 voxels; both averages 64 / N.
    n_grid = 32**3
    expected = 2 * math.sqrt(32 * 0.25) / (math.sqrt(n_grid) * 2 * 64 / n_grid)
    assert regions["AB"]["bone"] == pytest.approx(expected)
    assert result["grid"] == "3x3x3:32x32x32"


def test_std_mae_spearman_on_constructed_cases():
    maes = [50.0, 80.0, 120.0, 200.0]
    assert std_mae_spearman([1.0, 2.0, 3.0, 9.0], maes) == pytest.approx({"n": 4, "spearman": 1.0, "p": 0.0}, abs=1e-9)
    assert std_mae_spearman([9.0, 3.0, 2.0, 1.0], maes)["spearman"] == pytest.approx(-1.0)
    dropped = std_mae_spearman([1.0, math.nan, 3.0, 9.0], maes)
    assert dropped["n"] == 3 and dropped["spearman"] == pytest.approx(1.0)
    assert math.isnan(std_mae_spearman([1.0, 2.0], maes[:2])["spearman"])
    assert math.isnan(std_mae_spearman([5.0, 5.0, 5.0], maes[:3])["spearman"])
    rows = [{"region": region, "mae": mae, "std_mean": std}
            for region, mae, std in [("AB", 10, 1), ("AB", 20, 2), ("AB", 30, 3), ("HN", 40, 2), ("HN", 50, 1),
                                     ("HN", 60, 0.5), ("TH", 5, None)]]
    entries = {entry["region"]: entry for entry in case_uncertainty(rows)}
    assert set(entries) == {"AB", "HN", "all"} and entries["all"]["n"] == 6
    assert entries["AB"]["spearman"] == pytest.approx(1.0) and entries["HN"]["spearman"] == pytest.approx(-1.0)
    assert case_uncertainty([{"region": "AB", "mae": 1.0}]) == []


def test_evaluate_reports_structb_and_per_case_uncertainty(phantom_root: Path, tmp_path: Path) -> None:
    grid = "4x4x4:64x64x64"
    copy = tmp_path / "ct_copy"
    copy.mkdir()
    for case in discover_cases(phantom_root):
        shutil.copy(case.ct, copy / f"{case.pid}.mha")
    perfect = evaluate_predictions(copy, phantom_root, tmp_path / "perfect.csv", quiet=True, structb=grid)
    assert [entry["region"] for entry in perfect.structural_bias["regions"]] == ["AB", "HN", "TH", "all"]
    assert all(entry["bone"] == 0.0 and entry["body"] == 0.0 for entry in perfect.structural_bias["regions"])
    assert perfect.case_uncertainty == []

    # Water (0 HU in the mask) has no bone: the bone StructB is positive; its std map is |error|, so each
    # case's mean std is its MAE and the per-case ranking is perfect.
    water = tmp_path / "water"
    predict_baseline("water", phantom_root, water, quiet=True)
    for case in discover_cases(phantom_root):
        ct, properties = read_volume(case.ct, dtype=np.float32)
        sct, _ = read_volume(water / f"{case.pid}.mha", dtype=np.float32)
        write_volume(water / f"{case.pid}_std.mha", np.abs(sct - ct), properties)
    evaluation = evaluate_predictions(water, phantom_root, tmp_path / "water.csv", quiet=True, structb=grid)
    overall = evaluation.structural_bias["regions"][-1]
    assert overall["region"] == "all" and overall["n"] == 6 and overall["bone"] > 0.5
    for row in evaluation.rows:
        assert row["std_mean"] == pytest.approx(row["mae"], rel=1e-4)
    assert evaluation.case_uncertainty[-1]["spearman"] == pytest.approx(1.0)
    report = json.loads((tmp_path / "water.json").read_text())
    assert report["structural_bias"]["grid"] == grid and report["case_uncertainty"][-1]["n"] == 6
    assert evaluate_predictions(water, phantom_root, quiet=True, structb=None).structural_bias is None
