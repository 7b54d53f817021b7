"""`latent register` (docs/registration.md): elastix CT -> MR on phantoms with known motion."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from typer.testing import CliRunner

from latent.app.cli import app
from latent.core.cases import discover_cases, scan_cases
from latent.core.io import read_volume
from latent.core.phantom.generate import generate_phantom_dataset
from latent.core.phantom.truth import read_truth
from latent.core.registration.case import RegisterSettings, RegistrationError, case_folder, register_case
from latent.core.registration.elastix import warp
from latent.core.registration.truth import residual_motion, smoothed_mae, truth_columns

runner = CliRunner()


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {row["pid"]: row for row in csv.DictReader(handle)}


def _residual(ct: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """MAE (HU) against the true CT in the mask, both lightly smoothed: the phantom's CT and MR share
    a fine texture that any resampling blurs, so the raw MAE mostly measures interpolation."""
    def smooth(volume: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(volume.astype(np.float32), (0.5, 1.5, 1.5))
    return float(np.abs(smooth(ct) - smooth(truth))[mask > 0].mean())


@pytest.fixture(scope="module")
def moved_root(tmp_path_factory) -> Path:
    """Two abdomen phantoms with a known rigid misregistration and their true CT (read-only)."""
    root = tmp_path_factory.mktemp("moved")
    generate_phantom_dataset(root, 2, ["AB"], seed=0, defects=["misregistration"], write_truth=True)
    return root


def test_truth_is_written_only_on_request_and_ignored_as_a_case_file(moved_root, tmp_path):
    case = discover_cases(moved_root)[0]
    assert (case.folder / "ct_true.mha").is_file() and case.ct.name == "ct.mha"
    generate_phantom_dataset(tmp_path, 1, ["AB"], seed=0, defects=["misregistration"])
    assert not list(tmp_path.rglob("ct_true.mha"))
    assert "write_truth" not in json.loads((tmp_path / "phantom.json").read_text())


def test_rigid_recovers_known_offsets_and_leaves_the_data_untouched(moved_root, tmp_path, monkeypatch):
    before = _hashes(moved_root)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # transformix must not leave files in the working folder
    out = tmp_path / "registered"
    result = runner.invoke(app, ["register", "--data", str(moved_root), "--out", str(out), "--method", "rigid", "-q"])
    assert result.exit_code == 0, result.output
    assert _hashes(moved_root) == before
    rows = _rows(out / "register.csv")
    assert sorted(rows) == ["1ABA001", "1ABB001"]
    for case in discover_cases(moved_root):
        row, folder = rows[case.pid], case_folder(out, case)
        assert float(row["nmi_after"]) > float(row["nmi_before"])
        assert 0 < float(row["mean_displacement_mm"]) <= float(row["p95_displacement_mm"]) < 10
        registered, properties = read_volume(folder / "ct.mha")
        moved, original = read_volume(case.ct)
        truth, mask = read_volume(case.folder / "ct_true.mha")[0], read_volume(case.mask)[0]
        assert registered.dtype == np.int16 and properties == original
        assert _residual(registered, truth, mask) < _residual(moved, truth, mask)
        assert float(row["true_mae_after"]) < float(row["true_mae_before"])
        assert float(row["residual_mm_after"]) < float(row["residual_mm_before"]) and float(row["residual_mm_after"]) < 1.0
        for name, source in (("ct_orig.mha", case.ct), ("mr.mha", case.mr), ("mask.mha", case.mask)):
            assert (folder / name).read_bytes() == source.read_bytes()
    assert [c.pid for c in discover_cases(out)] == ["1ABA001", "1ABB001"]
    assert not list((tmp_path / "cwd").iterdir())
    assert "data:image/png;base64," in (out / "register.html").read_text()
    again = runner.invoke(app, ["register", "--data", str(moved_root), "--out", str(out), "-q"])
    assert again.exit_code == 0, again.output
    assert all(case.get("reused") for case in json.loads((out / "register.json").read_text())["cases"])


def test_bspline_improves_a_deformed_case(tmp_path):
    data = tmp_path / "data"
    generate_phantom_dataset(data, 1, ["AB"], seed=0, defects=["deformation"], write_truth=True)
    out = tmp_path / "registered"
    result = runner.invoke(app, ["register", "--data", str(data), "--out", str(out), "--method", "bspline", "-q"])
    assert result.exit_code == 0, result.output
    case = discover_cases(data)[0]
    row = _rows(out / "register.csv")[case.pid]
    assert float(row["nmi_after"]) > float(row["nmi_before"]) and float(row["negative_jacobian_fraction"]) == 0
    truth, mask = read_volume(case.folder / "ct_true.mha")[0], read_volume(case.mask)[0]
    registered = read_volume(case_folder(out, case) / "ct.mha")[0]
    interior = mask.copy()
    interior[:2], interior[-2:] = 0, 0  # at the end slices a slide along z reads the air outside the volume
    assert _residual(registered, truth, interior) < _residual(read_volume(case.ct)[0], truth, interior)
    # the truth in mm: the in-plane B-spline (z left to the rigid stage) brings the CT closer
    assert 0 < float(row["residual_mm_after"]) < float(row["residual_mm_before"])


def test_residual_motion_composes_the_registration_with_the_true_motion():
    spacing = (3.0, 2.0, 2.0)
    motion = np.zeros((3, 6, 8, 8), np.float32)
    motion[2] = 2.0  # the moved CT shows the true CT 2 mm further along x
    perfect, none = -motion, np.zeros_like(motion)
    mask = np.ones((6, 8, 8), np.uint8)
    assert np.abs(residual_motion(perfect, motion, spacing)).max() == 0
    np.testing.assert_allclose(residual_motion(none, motion, spacing), motion)
    ramp = np.zeros_like(motion)
    ramp[2] = np.arange(8, dtype=np.float32)[None, None, :]  # m(x) grows 1 mm per voxel along x
    half = np.zeros_like(motion)
    half[2] = 2.0  # one voxel along x: the residual reads the motion one voxel further on
    inner = residual_motion(half, ramp, spacing)[2][:, :, :-1]
    np.testing.assert_allclose(inner, 2.0 + ramp[2][:, :, 1:])
    row = truth_columns(np.zeros((6, 8, 8)), np.zeros((6, 8, 8)), perfect, mask, spacing, np.zeros((6, 8, 8)), motion)
    assert row["residual_mm_before"] == 2.0 and row["residual_mm_after"] == 0.0


def test_the_phantom_records_its_true_motion(tmp_path):
    generate_phantom_dataset(tmp_path, 2, ["AB"], seed=0, defects=["misregistration", "deformation"],
                             write_truth=True)
    for case in discover_cases(tmp_path):
        moved, properties = read_volume(case.ct)
        truth_ct, motion = read_truth(case.folder)
        assert motion.shape == (3, *moved.shape) and 0.5 < np.linalg.norm(motion, axis=0).mean() < 8
        spacing = tuple(reversed(properties.spacing))
        mask = read_volume(case.mask)[0]
        fill = float(truth_ct.min())
        through_truth = warp(truth_ct, motion, spacing, fill)
        backwards = warp(truth_ct, -motion, spacing, fill)
        assert smoothed_mae(through_truth, moved, mask) < 0.5 * smoothed_mae(truth_ct, moved, mask)
        assert smoothed_mae(through_truth, moved, mask) < 0.5 * smoothed_mae(backwards, moved, mask)


def test_bad_cases_fail_in_one_line_and_the_others_go_on(tmp_path):
    data = tmp_path / "data"
    generate_phantom_dataset(data, 3, ["AB"], seed=0, defects=["misregistration"])
    (data / "Task1/AB/1ABA001/ct.mha").unlink()
    mask_path = data / "Task1/AB/1ABC001/mask.mha"
    image = sitk.ReadImage(str(mask_path))
    image.SetOrigin(tuple(v + 5.0 for v in image.GetOrigin()))
    sitk.WriteImage(image, str(mask_path), True)
    out = tmp_path / "registered"
    result = runner.invoke(app, ["register", "--data", str(data), "--out", str(out), "-q"])
    assert result.exit_code == 1, result.output
    assert "1ABA001: no CT file in" in result.output and "registration needs the CT" in result.output
    assert "mask" in result.output and "is on another grid than the MR" in result.output
    assert list(_rows(out / "register.csv")) == ["1ABB001"]
    assert not (out / "Task1/AB/1ABA001").exists() and not (out / "Task1/AB/1ABC001").exists()


def test_a_diverging_registration_writes_nothing(moved_root, tmp_path):
    case = next(c for c in scan_cases(moved_root).cases if c.pid == "1ABA001")
    with pytest.raises(RegistrationError, match=r"1ABA001: rigid registration diverged .*no registered CT written"):
        register_case(case, moved_root, tmp_path, RegisterSettings(nmi_tolerance=-1.0))
    assert not (tmp_path / "Task1").exists()
