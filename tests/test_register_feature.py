"""`latent register --method feature` (docs/registration.md): frozen VAE features over a smooth field."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from typer.testing import CliRunner

from latent.app.cli import app
from latent.core.cases import discover_cases, scan_cases
from latent.core.io import read_volume
from latent.core.phantom.generate import generate_phantom_dataset
from latent.core.registration.case import RegisterSettings, RegistrationError, case_folder, register_case
from latent.core.registration.elastix import warp
from latent.core.registration.feature import control_grid, feature_extractor, optimise_displacement
from latent.core.registration.settings import FeatureSettings
from latent.core.vae.loading import load_vae

runner = CliRunner()
#: A short identity-started fit: enough to exercise the checks, cheap.
QUICK = FeatureSettings(initial="identity", levels=1, steps=5)


@pytest.fixture(scope="module")
def deformed_root(tmp_path_factory) -> Path:
    """One abdomen phantom with a known smooth deformation and its true CT (read-only)."""
    root = tmp_path_factory.mktemp("deformed")
    generate_phantom_dataset(root, 1, ["AB"], seed=0, defects=["deformation"], write_truth=True)
    return root


def _toy_shift(**settings) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float, float]]:
    """A smooth random volume, the same moved by (0, -2, 3) mm, and the field fitted between them."""
    rng = np.random.default_rng(0)
    fixed = ndimage.gaussian_filter(rng.normal(size=(16, 24, 24)).astype(np.float32), 2)
    spacing = (3.0, 2.0, 2.0)
    shift = np.zeros((3, *fixed.shape), np.float32)
    shift[1], shift[2] = -2.0, 3.0  # the moving image shows the fixed one's voxel p at p - shift / spacing
    moving = warp(fixed, -shift, spacing, 0.0)
    field = optimise_displacement(torch.from_numpy(fixed)[None, None], torch.from_numpy(moving)[None, None],
                                  np.ones(fixed.shape, bool), spacing,
                                  FeatureSettings(feature_spacing_mm=1.0, levels=1, steps=50, lr_mm=0.2,
                                                  smoothness=1.0, **settings))
    return fixed, moving, field, spacing


def test_a_known_shift_is_recovered_in_the_register_arrays_convention():
    fixed, moving, field, spacing = _toy_shift()
    assert field.shape == (3, *fixed.shape) and field.dtype == np.float32
    inner = field[:, 5:11, 8:16, 8:16].reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(inner, [0.0, -2.0, 3.0], atol=0.4)
    registered = warp(moving, field, spacing, 0.0)[5:11, 8:16, 8:16]
    assert np.abs(registered - fixed[5:11, 8:16, 8:16]).mean() < 0.5 * np.abs(moving - fixed)[5:11, 8:16, 8:16].mean()


def test_in_plane_only_leaves_the_slices_where_they_are():
    fixed, moving, field, spacing = _toy_shift(in_plane_only=True)
    assert not field[0].any()
    np.testing.assert_allclose(field[1:, 5:11, 8:16, 8:16].reshape(2, -1).mean(axis=1), [-2.0, 3.0], atol=0.4)
    free = _toy_shift(in_plane_only=False)[2]
    assert np.abs(free[0]).max() > 0


def test_the_anchor_holds_the_field_back():
    free = _toy_shift()[2]
    anchored = _toy_shift(anchor=1000.0)[2]
    assert np.abs(anchored).mean() < 0.5 * np.abs(free).mean()


def test_the_features_are_the_standin_encoders_full_resolution_level():
    loaded = load_vae("standin")
    extractor = feature_extractor(loaded)
    assert [type(block).__name__ for block in extractor] == ["Convolution", "AEKLResBlock"]
    volume = torch.zeros((1, 1, 8, 12, 12))
    assert extractor(volume).shape == (1, 16, 8, 12, 12)
    assert control_grid((30, 111, 128), (3.15, 2.35, 2.35), 32.0) == (4, 10, 11)


def test_feature_registers_a_deformed_phantom_through_the_cli(deformed_root, tmp_path):
    out = tmp_path / "registered"
    result = runner.invoke(app, ["register", "--data", str(deformed_root), "--out", str(out), "--method", "feature",
                                 "-q"])
    assert result.exit_code == 0, result.output
    case = discover_cases(deformed_root)[0]
    with open(out / "register.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert row["pid"] == case.pid and row["method"] == "feature"
    assert float(row["nmi_after"]) > float(row["nmi_before"])
    # reported against the truth (docs); whether it helps is the benchmark's question: on phantom
    # deformations of about 1 mm it mostly does not (benchmarks/results/bench_register.md)
    assert float(row["true_mae_before"]) > 0 and float(row["true_mae_after"]) > 0
    assert float(row["residual_mm_before"]) > 0 and float(row["residual_mm_after"]) > 0
    assert float(row["negative_jacobian_fraction"]) == 0 and 0 < float(row["mean_displacement_mm"]) < 10
    registered, properties = read_volume(case_folder(out, case) / "ct.mha")
    assert registered.dtype == np.int16 and properties == read_volume(case.ct)[1]
    assert json.loads((out / "register.json").read_text())["feature"]["vae"] == "standin"
    again = runner.invoke(app, ["register", "--data", str(deformed_root), "--out", str(out), "--method", "feature",
                                "-q"])
    assert again.exit_code == 0, again.output
    assert all(case.get("reused") for case in json.loads((out / "register.json").read_text())["cases"])


def test_divergence_and_folding_checks_apply_to_the_feature_method(deformed_root, tmp_path):
    case = scan_cases(deformed_root).cases[0]
    with pytest.raises(RegistrationError, match=r"feature registration diverged .*no registered CT written"):
        register_case(case, deformed_root, tmp_path, RegisterSettings(method="feature", nmi_tolerance=-1.0,
                                                                      feature=QUICK))
    with pytest.raises(RegistrationError, match=r"feature registration folds .*no registered CT written"):
        register_case(case, deformed_root, tmp_path, RegisterSettings(method="feature", nmi_tolerance=1.0,
                                                                      max_negative_jacobian=-1.0, feature=QUICK))
    assert not (tmp_path / "Task1").exists()


def test_a_bad_feature_vae_is_one_line(deformed_root, tmp_path):
    result = runner.invoke(app, ["register", "--data", str(deformed_root), "--out", str(tmp_path / "o"),
                                 "--method", "feature", "--feature-vae", str(tmp_path / "nothing")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: VAE spec") and "nothing' does not exist" in lines[0]
    assert not (tmp_path / "o").exists()


def test_feature_runs_with_a_segmentation_network_from_a_weights_folder(deformed_root, tmp_path):
    """The CLI path: the network is loaded, recorded with its weights' hash, and the case is registered
    or refused by the usual checks (a tiny random network is no guide to anatomy, so either may happen)."""
    from test_perception_loss import write_weights

    weights = write_weights(tmp_path / "seg")
    out = tmp_path / "registered"
    result = runner.invoke(app, ["register", "--data", str(deformed_root), "--out", str(out), "--method", "feature",
                                 "--feature-network", str(weights), "--feature-layers", "input_block", "-q"])
    assert result.exit_code in (0, 1), result.output
    record = json.loads((out / "register.json").read_text())
    assert record["feature"]["network"] == str(weights) and record["feature"]["network_layers"] == ["input_block"]
    if result.exit_code:
        assert "feature registration diverged" in result.output or "folds" in result.output
    else:
        assert record["cases"][0]["method"] == "feature"


def test_segmentation_network_features_recover_a_known_shift(tmp_path):
    """Features on the image grid (padding cropped, resized back): a shift of the image is a shift of them."""
    from latent.core.registration.feature import network_feature_maps
    from latent.core.segmentation_network import load_segmentation_network
    from test_perception_loss import write_weights

    loaded = load_segmentation_network(write_weights(tmp_path / "seg"), ["input_block"])
    fixed, moving, _, spacing = _toy_shift()
    maps = [network_feature_maps(loaded, loaded.intensity.from_unit(torch.from_numpy(image) * 0.2 + 0.5))
            for image in (fixed, moving)]
    field = optimise_displacement(*maps, np.ones(fixed.shape, bool), spacing,
                                  FeatureSettings(feature_spacing_mm=1.0, levels=1, steps=50, lr_mm=0.2, smoothness=1.0))
    inner = field[:, 5:11, 8:16, 8:16].reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(inner, [0.0, -2.0, 3.0], atol=0.6)


def test_segmentation_features_cover_the_image_grid_whatever_its_size(tmp_path):
    from latent.core.registration.feature import network_feature_maps
    from latent.core.segmentation_network import load_segmentation_network
    from test_perception_loss import write_weights

    loaded = load_segmentation_network(write_weights(tmp_path / "seg"))  # input_block (full) + downsamples.0 (1/2)
    maps = network_feature_maps(loaded, torch.rand(7, 19, 23))
    assert maps.shape == (1, 12, 7, 19, 23) and torch.isfinite(maps).all()


def test_a_bad_feature_network_is_one_line(deformed_root, tmp_path):
    from test_perception_loss import write_weights

    weights = write_weights(tmp_path / "seg")
    for extra, expected in ((["--feature-network", str(tmp_path / "none")], "config.json: missing"),
                            (["--feature-network", str(weights), "--feature-layers", "nope"],
                             "DynUNet has no layer 'nope' (--feature-layers)")):
        result = runner.invoke(app, ["register", "--data", str(deformed_root), "--out", str(tmp_path / "o"),
                                     "--method", "feature", *extra])
        assert result.exit_code == 2
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], lines
    assert not (tmp_path / "o").exists()
