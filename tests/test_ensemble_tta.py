"""Folds, ensembles and flip TTA on tiny volumes: fold assignment, orientation after flips,
ensemble averaging and its std map, the std-error Spearman column, and one-line errors.

The trained runs come from the ``runs`` fixture of ``test_predict_run`` (tiny VAE, 32^3 grid,
two training steps per family).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from latent.decode.combine import Moments, flip_variants, mirror
from latent.decode.pipeline import TrainedRun, combine_predictions, predict_canonical, translate_input
from latent.app.cli import app
from latent.app.predict_run import Ensemble, PredictOptions, predict_dataset
from latent.core.cases import fold_of_splits, make_folds, parse_fold, read_split
from latent.evaluation.scoring import evaluate_predictions, std_error_spearman
from latent.core.io import read_volume
from latent.translate.models.base import build_model
from latent.translate.train import parse_config, train

from test_predict_run import FAMILIES, LATENT_UNET, _mask_of, runs  # noqa: F401 - runs is a fixture

cli = CliRunner()


# ----------------------------------------------------------------------------- folds
def _labels(count: int = 30) -> dict[str, tuple[str, str]]:
    regions, centres = ("AB", "HN", "TH"), ("A", "B")
    return {f"1{regions[i % 3]}{centres[(i // 3) % 2]}{i:03d}": (regions[i % 3], centres[(i // 3) % 2])
            for i in range(count)}


def test_folds_are_stratified_disjoint_covering_and_deterministic() -> None:
    labels = _labels(30)
    folds = make_folds(labels, 5, seed=0)
    assert folds == make_folds(labels, 5, seed=0) and folds != make_folds(labels, 5, seed=1)
    everything = [pid for fold in folds for pid in fold]
    assert sorted(everything) == sorted(labels) and len(set(everything)) == len(everything)
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    for key in ({region for region, _ in labels.values()} | set(labels.values())):  # every region, every stratum
        counts = [sum(1 for pid in fold if key in (labels[pid][0], labels[pid])) for fold in folds]
        assert max(counts) - min(counts) <= 1, (key, counts)


def test_a_fold_trains_on_the_others_validates_on_fold_k_and_never_sees_test() -> None:
    labels = _labels(30)
    splits = {"train": sorted(labels)[:20], "val": sorted(labels)[20:24], "test": sorted(labels)[24:]}
    pool = splits["train"] + splits["val"] + splits["test"][:1]  # a test id slipped into the pool
    seen_val = []
    for k in range(1, 5):
        train_ids, val_ids = fold_of_splits(splits, pool, labels, f"{k}/4")
        assert not set(train_ids) & set(val_ids)
        assert sorted(train_ids + val_ids) == sorted(splits["train"] + splits["val"])
        assert not (set(train_ids) | set(val_ids)) & set(splits["test"])
        seen_val += val_ids
    assert sorted(seen_val) == sorted(splits["train"] + splits["val"])
    assert parse_fold("2/5") == (2, 5)
    for bad in ("0/5", "6/5", "x", "1/1", 3, None):
        with pytest.raises(ValueError, match=r"expected k/K"):
            parse_fold(bad)


def test_training_with_a_fold_records_it_and_uses_its_cases(runs, tmp_path: Path) -> None:  # noqa: F811
    config = parse_config({
        "data": {"cache": str(runs.cache), "split_file": str(runs.split_file), "batch_size": 2, "preload": True,
                 "fold": "2/2"},
        "model": {"family": "l2l_regress", **LATENT_UNET},
        "train": {"max_steps": 1, "val_every": 1, "log_every": 1, "checkpoint_every": 1000, "mixed_precision": "no",
                  "tensorboard": False},
        "run_dir": str(tmp_path / "fold_run"),
    })
    run_dir = train(config, quiet=True)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["fold"] == "2/2"
    producer = json.loads((run_dir / "producer.json").read_text())
    pool = read_split(runs.split_file, "train") + read_split(runs.split_file, "val")
    assert producer["fold"] == "2/2" and sorted(producer["train_ids"] + producer["val_ids"]) == sorted(pool)
    assert len(producer["val_ids"]) == 2 and not set(producer["val_ids"]) & set(producer["train_ids"])
    assert not set(pool) & set(runs.splits["test"])


# ----------------------------------------------------------------------------- flip TTA
def test_flip_variants_and_mirror() -> None:
    assert flip_variants(("x",), "none") == [()]
    assert flip_variants(("x",), "flip") == [(), (-1,)]
    assert flip_variants(("z", "x"), "flip") == [(), (-3,), (-1,), (-3, -1)]
    volume = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(1, 2, 3, 4, 5)
    for dims in flip_variants(("z", "y", "x"), "flip"):
        assert torch.equal(mirror(mirror(volume, dims), dims), volume)  # flip of a flip is the identity
    assert torch.equal(mirror(volume, (-1,)), volume.flip(-1))


@pytest.mark.parametrize("family", ["l2l_regress", "pix2pix", "resvit"])
def test_flipped_passes_come_back_in_the_input_orientation(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose output is its (left-right asymmetric) input: every TTA output equals the
    plain output, so nothing was left mirrored; the flipped pass did see a mirrored input."""
    torch.manual_seed(0)
    model = build_model(FAMILIES[family])
    run = TrainedRun(Path("unused"), model, {})
    channels = 4 if model.input_key == "mr_mu" else 1
    inputs = torch.linspace(-1, 1, 8).expand(1, channels, 8, 8, 8).clone()  # a ramp along x
    seen = []

    def asymmetric(tensor, generator=None):
        seen.append(tensor.clone())
        return tensor * 2 + 1

    monkeypatch.setattr(model, "translate", asymmetric)
    plain = translate_input(run, inputs, samples=1)
    flipped = translate_input(run, inputs, samples=1, tta="flip")
    assert len(plain) == 1 and len(flipped) == 2
    assert torch.equal(seen[2], inputs.flip(-1)) and not torch.equal(seen[2], inputs)
    for output in flipped:
        assert torch.equal(output, plain[0])


def test_tta_through_the_vae_keeps_orientation_and_std_is_zero(runs, monkeypatch) -> None:  # noqa: F811
    run, vae = runs.load("l2l_regress")
    inputs = torch.randn(1, 4, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(run.model, "translate", lambda tensor, generator=None: tensor * 0.5)  # flip-equivariant
    plain, no_std, _ = predict_canonical(run, vae, inputs)
    mean, std, _ = predict_canonical(run, vae, inputs, tta="flip")
    assert no_std is None and std is not None and np.all(std == 0)
    np.testing.assert_array_equal(mean, plain)


# ----------------------------------------------------------------------------- ensembles
def test_moments_of_groups_are_the_mixture_moments() -> None:
    rng = np.random.default_rng(0)
    groups = [rng.normal(size=(3, 4, 5, 6)).astype(np.float32) for _ in range(2)]  # 2 members x 3 outputs
    moments = Moments()
    for group in groups:
        moments.add(group.mean(0), group.std(0))
    mean, std = moments.result()
    everything = np.concatenate(groups).astype(np.float64)
    np.testing.assert_allclose(mean, everything.mean(0), atol=1e-5)
    np.testing.assert_allclose(std, everything.std(0), atol=1e-5)


def test_ensemble_is_the_mean_of_its_members_and_writes_the_std(runs, tmp_path: Path) -> None:  # noqa: F811
    pid = runs.splits["test"][0]
    members = [runs.load("l2l_regress"), runs.load("l2sct")]
    singles = []
    for index, (run, vae) in enumerate(members):
        result = predict_dataset(run, vae, runs.data, tmp_path / f"single{index}", pids=[pid], quiet=True)
        assert not result.failures and not (tmp_path / f"single{index}" / f"{pid}_std.mha").exists()
        singles.append(read_volume(tmp_path / f"single{index}" / f"{pid}.mha", dtype=np.float32)[0])
    result = predict_dataset(Ensemble(members), None, runs.data, tmp_path / "ensemble", pids=[pid], quiet=True)
    assert not result.failures
    ensemble, properties = read_volume(tmp_path / "ensemble" / f"{pid}.mha", dtype=np.float32)
    assert np.abs(ensemble - (singles[0] + singles[1]) / 2).max() <= 1  # int16 files: rounding only
    std, std_properties = read_volume(tmp_path / "ensemble" / f"{pid}_std.mha")
    assert not std_properties.grid_differences(properties) and std.dtype == np.float32
    np.testing.assert_allclose(std, np.abs(singles[0] - singles[1]) / 2, atol=1)  # two members: |a - b| / 2
    mask = read_volume(_mask_of(runs, pid))[0]
    assert np.all(std[mask == 0] == 0) and std[mask > 0].max() > 0


def test_combine_predictions_averages_exactly() -> None:
    from latent.decode.pipeline import CasePrediction

    rng = np.random.default_rng(1)
    a, b = (rng.normal(0, 300, (4, 5, 6)).astype(np.float32) for _ in range(2))
    combined = combine_predictions([CasePrediction(a, None, {"translate": 1.0}), CasePrediction(b, None, {"translate": 2.0})])
    np.testing.assert_allclose(combined.hu, (a.astype(np.float64) + b) / 2, rtol=0, atol=1e-4)
    np.testing.assert_allclose(combined.std, np.abs(a.astype(np.float64) - b) / 2, rtol=0, atol=1e-3)
    assert combined.seconds == {"translate": 3.0}
    single = CasePrediction(a, None, {})
    assert combine_predictions([single]) is single


def test_cli_ensemble_with_flip_tta_then_evaluate_reports_spearman(runs, tmp_path: Path) -> None:  # noqa: F811
    pid = runs.splits["test"][0]
    split_file = tmp_path / "one.json"
    split_file.write_text(json.dumps({"test": [pid]}))
    common = ["--data", str(runs.data), "--split-file", str(split_file), "-q"]
    members = f"{runs.run('l2l_regress')},{runs.run('l2sct')}"
    result = cli.invoke(app, ["predict", "--ensemble", members, "--vae", str(runs.vae_dir), "--tta", "flip",
                              "--out", str(tmp_path / "pred"), *common])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "pred" / f"{pid}.mha").is_file() and (tmp_path / "pred" / f"{pid}_std.mha").is_file()
    evaluation = evaluate_predictions(tmp_path / "pred", runs.data, tmp_path / "scores.csv", pids=[pid], quiet=True)
    value = evaluation.run.results[pid]["std_error_spearman"]
    assert -1 <= value <= 1
    assert "std_error_spearman" in (tmp_path / "scores.csv").read_text().splitlines()[0]
    assert "std_error_spearman" in evaluation.summary[-1]


def test_std_error_spearman() -> None:
    rng = np.random.default_rng(2)
    error = rng.random(10_000)
    assert std_error_spearman(error * 3 + 1, error) == pytest.approx(1.0)
    assert std_error_spearman(-error, error) == pytest.approx(-1.0)
    noisy = error + rng.random(10_000)
    assert std_error_spearman(noisy, error, max_voxels=500) == std_error_spearman(noisy, error, max_voxels=500)
    assert -1 <= std_error_spearman(noisy, error, max_voxels=500) <= 1
    assert math.isnan(std_error_spearman(np.zeros(100), error[:100]))


def test_evaluate_without_std_map_has_no_spearman_column(runs, tmp_path: Path) -> None:  # noqa: F811
    pid = runs.splits["test"][0]
    assert cli.invoke(app, ["predict", "--method", "water", "--data", str(runs.data), "--out", str(tmp_path / "w"),
                            "-q"]).exit_code == 0
    evaluation = evaluate_predictions(tmp_path / "w", runs.data, pids=[pid], quiet=True)
    assert "std_error_spearman" not in evaluation.run.results[pid]


# ----------------------------------------------------------------------------- one-line errors
@pytest.mark.parametrize("value", ["0/5", "6/5", "x"])
def test_bad_fold_is_one_line_naming_the_field(value: str, tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"family": "l2l_regress"}, "run_dir": str(tmp_path / "run")}))
    result = cli.invoke(app, ["train", "--config", str(recipe), f"data.fold={value}", "--quiet"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid training config: data.fold: expected k/K"), lines
    assert not (tmp_path / "run").exists()


def test_a_fold_needs_enough_cases(runs, tmp_path: Path, capsys) -> None:  # noqa: F811
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "data": {"cache": str(runs.cache), "split_file": str(runs.split_file), "fold": "1/9"},
        "model": {"family": "l2l_regress", **LATENT_UNET}, "run_dir": str(tmp_path / "run")}))
    result = cli.invoke(app, ["train", "--config", str(recipe), "--quiet"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines == ["error: data.fold: 9 folds need at least 9 train + val cases, got 4"], lines


def _ensemble_errors(runs) -> dict[str, tuple[list[str], str]]:  # noqa: F811
    one = str(runs.run("l2l_regress"))
    model = ["--data", str(runs.data), "--vae", str(runs.vae_dir)]
    return {
        "one run": (["--ensemble", one, *model], r"error: --ensemble: .* names one run"),
        "empty name": (["--ensemble", f"{one},,{one}", *model], r"error: --ensemble: empty run name"),
        "repeated run": (["--ensemble", f"{one},{one}", *model], r"error: --ensemble: .* is named twice"),
        "missing run": (["--ensemble", f"{one},{one}_gone", *model], r"error: .*_gone/producer\.json: missing"),
        "model and ensemble": (["--model", one, "--ensemble", f"{one},{one}x", *model],
                               r"error: --ensemble: give either --model"),
        "bad tta": (["--model", one, "--tta", "mirror", *model], r"error: --tta: 'mirror' is not one of none, flip"),
    }


@pytest.mark.parametrize("name", ["one run", "empty name", "repeated run", "missing run", "model and ensemble",
                                  "bad tta"])
def test_bad_ensemble_and_tta_inputs_are_one_line(name: str, runs, tmp_path: Path) -> None:  # noqa: F811
    import re

    arguments, pattern = _ensemble_errors(runs)[name]
    result = cli.invoke(app, ["predict", *arguments, "--out", str(tmp_path / "p"), "-q"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(pattern, lines[0]), lines
    assert "Traceback" not in result.output and not (tmp_path / "p").exists()


def test_predict_options_default_to_no_tta() -> None:
    assert PredictOptions().tta == "none" and flip_variants(("x",), PredictOptions().tta) == [()]
