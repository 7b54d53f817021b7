"""Trained run -> `latent predict` -> evaluate, on CPU with tiny networks (KonfAI-style integration).

One phantom data set is encoded once per module with a tiny random VAE; every model family is
trained for a few steps on that cache, predicts the test split from the raw MR files and is
scored. The other tests reuse those runs: native geometry, cache vs. files, run/VAE mismatch,
K-sample uncertainty, single-file and Grand Challenge modes, DICOM output and the native
validator inside ``train()``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from latent.decode.pipeline import RunMismatchError, predict_canonical
from latent.app.predict_run import PredictOptions, load_run_and_vae, predict_dataset, predict_from_cache
from latent.core.cases import discover_cases, make_splits, save_splits
from latent.app.cli import app
from latent.evaluation.scoring import evaluate_predictions
from latent.core.intensity import AIR_HU
from latent.core.io import VolumeProperties, read_volume
from latent.app.validation import train_run
from latent.translate.train import parse_config

#: Canonical grid (spacing x, y, z : shape z, y, x): 32 x 32 x 32 voxels (multiples of 32), latents 8 x 8 x 8.
GRID = "10x10x6:32x32x32"
#: Tiny AutoencoderKL: three levels (downsampling factor 4), one residual block per level.
VAE_KWARGS = {
    "spatial_dims": 3, "in_channels": 1, "out_channels": 1, "latent_channels": 4, "channels": [8, 8, 16],
    "num_res_blocks": 1, "norm_num_groups": 4, "attention_levels": [False, False, False],
    "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False,
}
LATENT_UNET = {"channels": [8, 8], "num_res_blocks": 1, "norm_num_groups": 4, "num_head_channels": 4, "lr": 1e-3}
DIFFUSION = {**LATENT_UNET, "prediction_type": "v_prediction", "num_inference_steps": 2, "eta": 0.0}
PIXEL_GAN = {"mode": "2.5d", "context_slices": 3, "channels": [4, 8], "num_res_units": 1, "disc_channels": 4,
             "disc_layers": 1, "disc_num_d": 1, "slices_per_volume": 2, "inference_batch_size": 16}
#: Model section of each family's run (the ControlNet's prior is trained first, see ``_Runs``).
FAMILIES = {
    "l2l_ddim": {"family": "l2l_ddim", **DIFFUSION},
    "l2l_regress": {"family": "l2l_regress", **LATENT_UNET, "mask_loss": True},
    "l2sct": {"family": "l2sct", "trunk_channels": 8, "trunk_blocks": 1, "decoder_channels": [4, 8, 8],
              "norm_num_groups": 4, "lr": 1e-3},
    "l2l_controlnet": {"family": "l2l_controlnet", "stage": "controlnet", "conditioning_embedding_channels": 8,
                       "num_inference_steps": 2, "lr": 1e-3},
    "pix2pix": {"family": "pix2pix", **PIXEL_GAN},
    "cyclegan": {"family": "cyclegan", **PIXEL_GAN},
    "cut": {"family": "cut", **PIXEL_GAN, "nce_layers": [0, 1, 2], "nce_patches": 16, "nce_dim": 8},
    "unetpp25d": {"family": "unetpp25d", "backbone": "resnet10", "decoder_channels": [8, 8, 8, 8, 8],
                  "context_slices": 3, "slices_per_volume": 2, "lr": 1e-3},
    "resvit": {"family": "resvit", **PIXEL_GAN, "art_blocks": 2, "vit_blocks": [1], "vit_grid": 4, "vit_hidden": 8,
               "vit_heads": 2, "vit_mlp": 16, "vit_layers": 1},
}
PRIOR = {"family": "l2l_controlnet", "stage": "prior", **DIFFUSION}
#: The run that also validates with the native-grid validator (HU metrics inside ``train()``).
NATIVE_VALIDATED = "l2sct"
NATIVE_VALIDATOR = "native"

cli = CliRunner()


def _save_tiny_vae(folder: Path, seed: int) -> Path:
    from monai.networks.nets import AutoencoderKL

    from latent.core.vae.loading import save_vae_dir

    torch.manual_seed(seed)
    network = AutoencoderKL(**VAE_KWARGS)
    return save_vae_dir(network, {"class_name": "AutoencoderKL", "kwargs": VAE_KWARGS}, folder)


@dataclass
class _Runs:
    """The module's data set, cache and VAE; trains each family once, on first use."""

    root: Path
    data: Path
    cache: Path
    split_file: Path
    splits: dict[str, list[str]]
    vae_dir: Path
    other_vae_dir: Path
    trained: dict[str, Path] = field(default_factory=dict)

    def train(self, name: str, model: dict, **train_changes) -> Path:
        config = parse_config({
            "data": {"cache": str(self.cache), "split_file": str(self.split_file), "batch_size": 2,
                     "preload": True, "val_split": "val" if model.get("stage") != "prior" else None},
            "model": model,
            "train": {"max_steps": 2, "val_every": 2, "log_every": 1, "checkpoint_every": 1000,
                      "mixed_precision": "no", "tensorboard": False, **train_changes},
            "run_dir": str(self.root / "runs" / name),
        })
        return train_run(config, quiet=True)

    def run(self, family: str) -> Path:
        """Run folder of ``family`` (trained now if this module has not trained it yet)."""
        if family not in self.trained:
            model = dict(FAMILIES[family])
            changes = {"validator": NATIVE_VALIDATOR} if family == NATIVE_VALIDATED else {}
            if family == "l2l_controlnet":
                model["prior_path"] = str(self.train("l2l_controlnet_prior", PRIOR) / "final")
            self.trained[family] = self.train(family, model, **changes)
        return self.trained[family]

    def load(self, family: str):
        """``(TrainedRun, vae)``, naming the VAE explicitly (``producer_info`` records no path to find it by)."""
        return load_run_and_vae(self.run(family), str(self.vae_dir))


@pytest.fixture(scope="module")
def runs(phantom_root: Path, tmp_path_factory) -> Iterator[_Runs]:
    """Phantom copy, splits (3 train / 1 val / 2 test), tiny VAE and the encoded cache."""
    from latent.app.encode_run import encode_dataset
    from latent.core.vae.loading import load_vae

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: thread hand-over costs more than it saves
    root = tmp_path_factory.mktemp("predict_run")
    data = root / "data"
    shutil.copytree(phantom_root, data)
    # 2 cases per region: half train, half test, then one test case becomes the validation case.
    halves = make_splits(discover_cases(data), (0.5, 0.0, 0.5), seed=0)
    splits = {"train": halves["train"], "val": halves["test"][:1], "test": halves["test"][1:]}
    split_file = save_splits(splits, root / "splits.json")
    vae_dir = _save_tiny_vae(root / "vae", seed=0)
    other_vae_dir = _save_tiny_vae(root / "other_vae", seed=1)
    report = encode_dataset(data, root / "cache.zarr", load_vae(str(vae_dir)), GRID, split_file=split_file, quiet=True)
    assert not report.failures and len(report.encoded) == 6
    yield _Runs(root, data, root / "cache.zarr", split_file, splits, vae_dir, other_vae_dir)
    torch.set_num_threads(threads)


def _same_geometry(actual: VolumeProperties, expected: VolumeProperties, atol: float = 0.0) -> None:
    """Same size, spacing, origin and direction: exactly (MetaImage round-trips doubles), or within
    ``atol`` (DICOM stores decimal strings of at most 16 characters)."""
    assert actual.size == expected.size
    for name in ("spacing", "origin", "direction"):
        np.testing.assert_allclose(getattr(actual, name), getattr(expected, name), rtol=0, atol=atol, err_msg=name)


def _mr_of(runs: _Runs, pid: str) -> Path:
    return next(case.mr for case in discover_cases(runs.data) if case.pid == pid)


def _mask_of(runs: _Runs, pid: str) -> Path:
    return next(case.mask for case in discover_cases(runs.data) if case.pid == pid)


# ----------------------------------------------------------------------------- every family end to end
@pytest.mark.parametrize("family", list(FAMILIES))
def test_train_predict_evaluate(runs: _Runs, family: str, tmp_path: Path) -> None:
    run_dir = runs.run(family)
    assert (run_dir / "producer.json").is_file() and (run_dir / "final" / "model.safetensors").is_file()
    run, vae = runs.load(family)
    assert (vae is None) == (run.model.input_key == "mr_pixels")
    test_pids = runs.splits["test"]
    result = predict_dataset(run, vae, runs.data, tmp_path / "pred", pids=test_pids, quiet=True)
    assert not result.failures and sorted(result.results) == test_pids
    written = sorted(path.name for path in (tmp_path / "pred").iterdir())
    assert written == sorted([f"{pid}.mha" for pid in test_pids] + ["timings.json"])  # no std map for K = 1
    for pid in test_pids:  # exactly the MR's grid, air outside the body mask
        sct, properties = read_volume(tmp_path / "pred" / f"{pid}.mha")
        _same_geometry(properties, read_volume(_mr_of(runs, pid))[1])
        assert np.all(sct[read_volume(_mask_of(runs, pid))[0] == 0] == AIR_HU)
    timings = json.loads((tmp_path / "pred" / "timings.json").read_text())
    assert sorted(timings["cases"]) == test_pids and timings["mean_seconds"]["translate"] > 0
    evaluation = evaluate_predictions(tmp_path / "pred", runs.data, pids=test_pids, quiet=True)
    assert not evaluation.run.failures and sorted(evaluation.run.results) == test_pids
    for pid, row in evaluation.run.results.items():
        assert math.isfinite(row["mae"]) and row["mae"] > 0, (pid, row)
        assert math.isfinite(row["psnr"]), (pid, row)


# ----------------------------------------------------------------------------- inputs and outputs
def test_prediction_from_cache_equals_prediction_from_files(runs: _Runs, tmp_path: Path) -> None:
    run, vae = runs.load("l2l_regress")  # deterministic: one translation per case
    test_pids = runs.splits["test"]
    from_files = predict_dataset(run, vae, runs.data, tmp_path / "files", pids=test_pids, quiet=True)
    from_cache = predict_from_cache(run, vae, runs.cache, tmp_path / "cache", pids=test_pids + ["1XXX999"], quiet=True)
    assert sorted(from_cache.results) == test_pids
    assert from_cache.failures == {"1XXX999": f"1XXX999: not in cache {runs.cache}"}
    for pid in test_pids:
        files_hu, files_properties = read_volume(from_files.results[pid], dtype=np.float32)
        cache_hu, cache_properties = read_volume(from_cache.results[pid], dtype=np.float32)
        assert cache_properties == files_properties
        # The cache stores the MR latent in float16, the files route re-encodes it in float32: at
        # most a flip of the int16 rounding, in a few voxels.
        difference = np.abs(files_hu - cache_hu)
        assert difference.max() <= 1 and difference.mean() < 0.01, (pid, difference.mean(), difference.max())


def test_run_refuses_a_vae_other_than_its_own(runs: _Runs, tmp_path: Path) -> None:
    run_dir = runs.run("l2l_regress")
    with pytest.raises(RunMismatchError, match=r"weights sha256 .* but run .* was trained on latents of .*--vae"):
        load_run_and_vae(run_dir, str(runs.other_vae_dir))
    result = cli.invoke(app, ["predict", "--model", str(run_dir), "--data", str(runs.data), "--out", str(tmp_path / "p"),
                              "--vae", str(runs.other_vae_dir), "-q"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: VAE ") and "weights sha256" in lines[0], result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "p").exists()
    missing = tmp_path / "no_vae"
    result = cli.invoke(app, ["predict", "--model", str(run_dir), "--data", str(runs.data), "--out", str(tmp_path / "p"),
                              "--vae", str(missing), "-q"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == f"error: VAE spec {str(missing)!r} does not exist; use one of " \
        "['maisi-ct', 'maisi-mr', 'standin'], a weights file or a VAE directory"


def test_samples_std_is_zero_exactly_where_the_samples_agree(runs: _Runs, monkeypatch: pytest.MonkeyPatch) -> None:
    run, vae = runs.load("l2l_ddim")
    inputs = torch.randn(1, 4, 8, 8, 8, generator=torch.Generator().manual_seed(3))
    fixed = torch.randn(1, 4, 8, 8, 8, generator=torch.Generator().manual_seed(4))
    seeds = []

    def identical(latent, generator=None):
        seeds.append(generator.initial_seed())
        return fixed.clone()

    monkeypatch.setattr(run.model, "translate", identical)
    single, no_std, _ = predict_canonical(run, vae, inputs, samples=1, seed=5)
    mean, std, seconds = predict_canonical(run, vae, inputs, samples=3, seed=5)
    assert no_std is None and seeds == [5, 5, 6, 7]  # sample k is seeded seed + k
    assert std.shape == mean.shape == (32, 32, 32) and set(seconds) == {"translate", "decode"}
    assert np.all(std == 0)
    np.testing.assert_array_equal(mean, single)

    def differing(latent, generator=None):  # the samples differ only in the upper half of the latent
        out = fixed.clone()
        out[:, :, 4:] += generator.initial_seed()
        return out

    monkeypatch.setattr(run.model, "translate", differing)
    _, std, _ = predict_canonical(run, vae, inputs, samples=3, seed=0)
    assert std.max() > 1


def test_diffusion_samples_write_a_std_map_inside_the_mask(runs: _Runs, tmp_path: Path) -> None:
    run, vae = runs.load("l2l_ddim")
    pid = runs.splits["test"][0]
    result = predict_dataset(run, vae, runs.data, tmp_path, pids=[pid], options=PredictOptions(samples=3, seed=0),
                             quiet=True)
    assert not result.failures
    std, properties = read_volume(tmp_path / f"{pid}_std.mha")
    mask, mr_properties = read_volume(_mask_of(runs, pid))
    _same_geometry(properties, mr_properties)
    assert std.dtype == np.float32 and np.all(std >= 0)
    assert np.all(std[mask == 0] == 0) and std[mask > 0].max() > 0


def test_single_file_and_grand_challenge_modes_write_on_the_mr_grid(runs: _Runs, tmp_path: Path) -> None:
    run_dir, pid = runs.run("l2l_regress"), runs.splits["test"][0]
    mr, mask = _mr_of(runs, pid), _mask_of(runs, pid)
    mr_properties = read_volume(mr)[1]
    model = ["predict", "--model", str(run_dir), "--vae", str(runs.vae_dir), "-q"]
    result = cli.invoke(app, [*model, "--mr", str(mr), "--mask", str(mask), "--out", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    single, properties = read_volume(tmp_path / "one" / "mr.mha")
    _same_geometry(properties, mr_properties)
    assert set(json.loads((tmp_path / "one" / "mr_timings.json").read_text())) == {"encode", "translate", "decode"}

    gc_in, gc_out = tmp_path / "in", tmp_path / "out"
    (gc_in / "images" / "mri").mkdir(parents=True)
    (gc_in / "images" / "body").mkdir(parents=True)
    shutil.copy(mr, gc_in / "images" / "mri" / "x.mha")
    shutil.copy(mask, gc_in / "images" / "body" / "x.mha")
    (gc_in / "region.json").write_text(json.dumps("Abdomen"))
    result = cli.invoke(app, [*model, "--gc-io", str(gc_in), str(gc_out), "--out", str(tmp_path / "unused")])
    assert result.exit_code == 0, result.output
    assert [p.relative_to(gc_out).as_posix() for p in gc_out.rglob("*") if p.is_file()] == ["images/synthetic-ct/x.mha"]
    gc_sct, gc_properties = read_volume(gc_out / "images" / "synthetic-ct" / "x.mha")
    _same_geometry(gc_properties, mr_properties)
    np.testing.assert_array_equal(gc_sct, single)  # same MR, same mask, same model


def test_dicom_output_rereads_to_the_mr_geometry(runs: _Runs, tmp_path: Path) -> None:
    run_dir, pid = runs.run("l2l_regress"), runs.splits["test"][0]
    split_file = save_splits({**runs.splits, "test": [pid]}, tmp_path / "one.json")
    common = ["predict", "--model", str(run_dir), "--vae", str(runs.vae_dir), "--data", str(runs.data),
              "--split-file", str(split_file), "-q"]
    result = cli.invoke(app, [*common, "--out", str(tmp_path / "dicom"), "--format", "dicom"])
    assert result.exit_code == 0, result.output
    result = cli.invoke(app, [*common, "--out", str(tmp_path / "mha")])
    assert result.exit_code == 0, result.output
    series = tmp_path / "dicom" / pid
    assert series.is_dir() and len(list(series.glob("*.dcm"))) == read_volume(_mr_of(runs, pid))[1].size[2]
    dicom_hu, dicom_properties = read_volume(series)
    _same_geometry(dicom_properties, read_volume(_mr_of(runs, pid))[1], atol=1e-4)
    np.testing.assert_array_equal(dicom_hu, read_volume(tmp_path / "mha" / f"{pid}.mha")[0])


# ----------------------------------------------------------------------------- validation inside train()
def test_native_validator_scores_hu_on_the_native_grid(runs: _Runs, tmp_path: Path) -> None:
    run_dir = runs.run(NATIVE_VALIDATED)
    assert json.loads((run_dir / "config.json").read_text())["train"]["validator"] == NATIVE_VALIDATOR
    validation = json.loads((run_dir / "best" / "validation.json").read_text())
    assert validation["step"] == 2 and set(validation) == {"step", "selected_by", "mae", "psnr", "ms_ssim",
                                                                 "bone_dice"}
    assert validation["selected_by"].startswith("val/mae: masked MAE in HU on the native grid")
    assert math.isfinite(validation["mae"]) and validation["mae"] > 1  # HU, not normalised units
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["val/mae"] for r in logged if "val/mae" in r] == [validation["mae"]]
    # The validator sees what a user gets: the best model's sCT of the val case from the cache, scored natively.
    run, vae = runs.load(NATIVE_VALIDATED)
    predict_from_cache(run, vae, runs.cache, tmp_path, pids=runs.splits["val"], quiet=True)
    scored = evaluate_predictions(tmp_path, runs.data, pids=runs.splits["val"], quiet=True)
    assert scored.run.results[runs.splits["val"][0]]["mae"] == pytest.approx(validation["mae"], abs=0.1)
    assert scored.run.results[runs.splits["val"][0]]["bone_dice"] == pytest.approx(validation["bone_dice"], abs=0.01)


# ----------------------------------------------------------------------------- one predictor
def _method_arguments(kind: str, runs: _Runs) -> list[str]:
    """`latent predict` arguments of each kind of method (all through one predictor loop)."""
    data = ["--data", str(runs.data), "--split-file", str(runs.split_file)]
    return {
        "water": ["--method", "water", *data],
        "bulk": ["--method", "bulk", *data],
        "grid_floor": ["--method", "grid_floor", "--grid", GRID, *data],
        "vae_floor": ["--method", "vae_floor", "--from-cache", str(runs.cache), "--vae", str(runs.vae_dir),
                      "--split-file", str(runs.split_file)],
        "run": ["--model", str(runs.run("l2l_regress")), "--vae", str(runs.vae_dir), *data],
        "ensemble": ["--ensemble", f"{runs.run('l2l_regress')},{runs.run('pix2pix')}", "--vae", str(runs.vae_dir),
                     *data],
        "run from cache": ["--model", str(runs.run("l2l_regress")), "--vae", str(runs.vae_dir), "--from-cache",
                           str(runs.cache), "--split-file", str(runs.split_file)],
    }[kind]


@pytest.mark.parametrize("kind", ["water", "bulk", "grid_floor", "vae_floor", "run", "ensemble", "run from cache"])
def test_every_method_kind_writes_a_dicom_series(kind: str, runs: _Runs, tmp_path: Path) -> None:
    """Each kind of method goes through the one predictor loop and its one writer: `--format dicom`
    gives a CT series on the MR's native grid for every kind."""
    out = tmp_path / "pred"
    result = cli.invoke(app, ["predict", *_method_arguments(kind, runs), "--out", str(out), "--format", "dicom", "-q"])
    assert result.exit_code == 0, result.output
    for pid in runs.splits["test"]:
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(out / pid))
        assert files, f"{kind}: no DICOM series for {pid}"
        series = sitk.ReadImage(files)
        case = next(c for c in discover_cases(runs.data) if c.pid == pid)
        _same_geometry(VolumeProperties.from_image(series), VolumeProperties.from_image(sitk.ReadImage(str(case.mr))),
                       atol=1e-3)
        assert not list(out.glob(f"{pid}.mha"))


def test_one_reader_of_a_case_mr() -> None:
    """Only latent/core/prepare.py reads a case's MR and mask (read_native); the readers that the
    baselines, prediction from files and the app had are gone."""
    root = Path(__file__).resolve().parents[1]
    readers = []
    for folder in ("latent", "encode", "cache", "translate", "decode"):
        for path in (root / folder).rglob("*.py"):
            if path.is_symlink() or any(parent.is_symlink() for parent in path.parents if parent != root):
                continue
            text = path.read_text()
            if re.search(r"read_volume\((case\.mr|mr)\b", text):
                readers.append(str(path.relative_to(root)))
    assert readers == ["latent/core/prepare.py"], readers
    for gone in ("read_mr_and_mask", "prepare_mr_only", "predict_prepared", "predict_cached"):
        assert not any(gone in path.read_text() for folder in ("latent", "decode")
                       for path in (root / folder).rglob("*.py") if not path.is_symlink()), gone
