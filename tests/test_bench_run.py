"""`latent bench` in-process on six tiny phantoms: baselines, the grid and VAE floors and one tiny
trained latent model (the cache is built by the bench with a tiny random VAE), then a rerun that
reuses the trained run, and the one-line errors of bad options."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from matplotlib import image as mpimg
from typer.testing import CliRunner

from latent.app.bench.report import COMPUTE_LABELS, METRIC_LABELS, PAIRED_HEADERS
from latent.app.cli import app
from latent.core.cases import discover_cases, make_splits, save_splits

GRID = "10x10x6:32x32x32"
VAE_KWARGS = {
    "spatial_dims": 3, "in_channels": 1, "out_channels": 1, "latent_channels": 4, "channels": [8, 8, 16],
    "num_res_blocks": 1, "norm_num_groups": 4, "attention_levels": [False, False, False],
    "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False,
}
#: A tiny latent regressor recipe (two optimiser steps, one validation).
TINY_RECIPE = {
    "data": {"batch_size": 2, "preload": True, "val_split": "val"},
    "model": {"family": "l2l_regress", "channels": [8, 8], "num_res_blocks": 1, "norm_num_groups": 4, "lr": 1e-3},
    "train": {"max_steps": 2, "val_every": 2, "log_every": 1, "checkpoint_every": 1000, "mixed_precision": "no",
              "tensorboard": False},
    "run_dir": "unused",
}
METHODS = "water,bulk,grid_floor,vae_floor,l2l_regress,l2l_regress+tta,l2l_regress+ens2"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

cli = CliRunner()


@pytest.fixture(scope="module")
def bench_inputs(phantom_root: Path, tmp_path_factory) -> dict[str, Path]:
    """Data copy, split (3 train / 1 val / 2 test), a tiny VAE folder and a tiny recipe."""
    from monai.networks.nets import AutoencoderKL

    from latent.core.vae.loading import save_vae_dir

    root = tmp_path_factory.mktemp("bench")
    data = root / "data"
    shutil.copytree(phantom_root, data)
    halves = make_splits(discover_cases(data), (0.5, 0.0, 0.5), seed=0)
    split_file = save_splits({"train": halves["train"], "val": halves["test"][:1], "test": halves["test"][1:]},
                             root / "splits.json")
    torch.manual_seed(0)
    vae_dir = save_vae_dir(AutoencoderKL(**VAE_KWARGS), {"class_name": "AutoencoderKL", "kwargs": VAE_KWARGS},
                           root / "vae")
    recipe = root / "tiny_l2l_regress.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    return {"root": root, "data": data, "split_file": split_file, "vae": vae_dir, "recipe": recipe}


def _bench(inputs: dict[str, Path], out: Path, *extra: str) -> object:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: thread hand-over costs more than it saves
    try:
        return cli.invoke(app, ["bench", "--data", str(inputs["data"]), "--cache", str(inputs["root"] / "cache.zarr"),
                                "--out", str(out), "--methods", METHODS, "--split-file", str(inputs["split_file"]),
                                "--runs", str(inputs["root"] / "runs"), "--vae", str(inputs["vae"]), "--grid", GRID,
                                "--recipe", f"l2l_regress={inputs['recipe']}", "--quiet", "--note", "Tiny test.",
                                *extra])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def first_bench(bench_inputs: dict[str, Path]) -> Path:
    out = bench_inputs["root"] / "report"
    result = _bench(bench_inputs, out)
    assert result.exit_code == 0, result.output
    return out


def _valid_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    assert float(np.std(mpimg.imread(path))) > 0, path


def test_bench_writes_every_table_column_and_valid_p_values(first_bench: Path) -> None:
    markdown = (first_bench / "report.md").read_text()
    for header in [*METRIC_LABELS.values(), *PAIRED_HEADERS, *COMPUTE_LABELS.values()]:
        assert f"| {header} |" in markdown, header
    assert "Latent cache: one-time encoding amortised over N experiments" in markdown
    assert "Uncertainty: Spearman correlation of the per-voxel std" in markdown
    assert "Tiny test." in markdown
    with (first_bench / "results.csv").open() as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert list(rows) == METHODS.split(",")
    for name, row in rows.items():
        assert float(row["n"]) == 2 and math.isfinite(float(row["mae"])), name
        assert float(row["seconds_per_volume"]) > 0 and float(row["predict_peak_memory_mb"]) > 0, name
    trained = rows["l2l_regress"]
    assert float(trained["train_seconds"]) > 0 and float(trained["peak_memory_mb"]) > 0
    assert float(trained["parameters"]) > 0 and float(trained["encode_s"]) >= 0
    assert math.isnan(float(rows["water"]["peak_memory_mb"]))  # nothing trained
    assert rows["l2l_regress+tta"]["train_seconds"] == trained["train_seconds"]  # the same run, predicted with flips
    assert float(rows["l2l_regress+ens2"]["parameters"]) == 2 * float(trained["parameters"])
    work = first_bench / "work" / "predictions"
    for name in ("l2l_regress+tta", "l2l_regress+ens2"):
        assert len(list((work / name).glob("*_std.mha"))) == 2, name
    assert not list((work / "l2l_regress").glob("*_std.mha"))
    spearman = {name: float(rows[name]["std_error_spearman"]) for name in ("l2l_regress+tta", "l2l_regress+ens2")}
    assert all(-1.0 <= value <= 1.0 for value in spearman.values()), spearman
    assert math.isnan(float(rows["l2l_regress"]["std_error_spearman"]))
    folds = [json.loads((first_bench.parent / "runs" / f"l2l_regress_fold{k}of2" / "producer.json").read_text())
             for k in (1, 2)]
    assert [f["fold"] for f in folds] == ["1/2", "2/2"] and not set(folds[0]["val_ids"]) & set(folds[1]["val_ids"])
    results = json.loads((first_bench / "results.json").read_text())
    p_values = [c[key] for block in results["paired"].values() for c in block["comparisons"]
                for key in ("wilcoxon_p", "wilcoxon_p_holm", "ttest_p")]
    assert p_values and all(0.0 <= p <= 1.0 for p in p_values if not math.isnan(p))
    metadata = results["metadata"]
    assert {"machine", "git_revision", "library_versions", "recipes"} <= set(metadata)
    assert metadata["recipes"]["l2l_regress"].startswith(str(first_bench.parent / "tiny_l2l_regress.yaml"))
    assert metadata["cache"]["built by this bench"] is True and metadata["cache"]["grid"] == GRID
    cache_rows = results["tables"]["Latent cache: one-time encoding amortised over N experiments"]["rows"]
    assert [row[0] for row in cache_rows] == ["1", "5", "20"]
    structb = results["cohort"]["structural_bias"]
    assert set(structb) == set(rows) and all(r["regions"][-1]["n"] == 2 for r in structb.values())
    assert "StructB of bone" in markdown and "StructB of body" in markdown
    assert math.isfinite(float(rows["water"]["structb_body"]))
    assert set(results["cohort"]["case_uncertainty"]) == {"l2l_regress+tta", "l2l_regress+ens2"}
    assert results["cohort"]["case_uncertainty"]["l2l_regress+tta"][-1]["n"] == 2


def test_bench_figures_are_valid_pngs_embedded_in_the_html(first_bench: Path) -> None:
    figure_files = sorted((first_bench / "figures").glob("*.png"))
    names = {path.stem for path in figure_files}
    assert {"pareto", "region_mae", "training_curves"} <= names
    assert {f"slices_{name}" for name in METHODS.split(",")} <= names
    for path in figure_files:
        _valid_png(path)
    page = (first_bench / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(figure_files)
    assert not re.search(r'src="(?!data:)', page)


def test_bench_reuses_a_complete_run(bench_inputs: dict[str, Path], first_bench: Path, tmp_path: Path) -> None:
    run_dir = bench_inputs["root"] / "runs" / "l2l_regress"
    before = (run_dir / "final" / "model.safetensors").stat().st_mtime_ns
    result = _bench(bench_inputs, tmp_path / "again", "--methods", "bulk,l2l_regress")
    assert result.exit_code == 0, result.output
    assert (run_dir / "final" / "model.safetensors").stat().st_mtime_ns == before
    first = {row["method"]: row for row in csv.DictReader((first_bench / "results.csv").open())}
    again = {row["method"]: row for row in csv.DictReader((tmp_path / "again" / "results.csv").open())}
    assert again["l2l_regress"]["train_seconds"] == first["l2l_regress"]["train_seconds"]
    assert again["l2l_regress"]["mae"] == first["l2l_regress"]["mae"]
    assert again["l2l_regress"]["reused_run"] == str(run_dir)


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--methods", "water,magic", r"--methods: unknown method\(s\) magic"),
    ("--methods", "l2sct+ens1,bulk+tta", r"--methods: unknown method\(s\) l2sct\+ens1, bulk\+tta"),
    ("--ddim-steps", "5,x", r"--ddim-steps: '5,x' is not a comma-separated list"),
    ("--recipe", "water=foo", r"--recipe 'water=foo': 'water' is not a trained method"),
    ("--size", "huge", r"--size 'huge': expected one of demo, full"),
])
def test_bad_bench_options_fail_in_one_line(bench_inputs: dict[str, Path], tmp_path: Path, option: str, value: str,
                                            message: str) -> None:
    result = cli.invoke(app, ["bench", "--data", str(bench_inputs["data"]), "--cache", str(tmp_path / "none.zarr"),
                              "--out", str(tmp_path / "out"), option, value])
    assert result.exit_code == 2
    assert re.search(message, result.output) and "Traceback" not in result.output
    assert not (tmp_path / "none.zarr").exists()


def test_missing_cache_without_a_vae_fails_in_one_line(bench_inputs: dict[str, Path], tmp_path: Path) -> None:
    result = cli.invoke(app, ["bench", "--data", str(bench_inputs["data"]), "--cache", str(tmp_path / "none.zarr"),
                              "--out", str(tmp_path / "out"), "--methods", "vae_floor",
                              "--split-file", str(bench_inputs["split_file"])])
    assert result.exit_code == 2
    assert "none.zarr: no such cache; pass --vae" in result.output and "Traceback" not in result.output


def test_a_method_that_fails_on_an_input_error_is_reported_and_the_others_go_on(bench_inputs: dict[str, Path],
                                                                                first_bench: Path,
                                                                                tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({**TINY_RECIPE, "model": {**TINY_RECIPE["model"], "chanels": [8, 8]}}))
    result = _bench(bench_inputs, tmp_path / "broken", "--methods", "bulk,l2sct", "--recipe", f"l2sct={broken}")
    assert result.exit_code == 1
    assert re.search(r"error: l2sct: .*chanels", result.output) and "Traceback" not in result.output
    rows = list(csv.DictReader((tmp_path / "broken" / "results.csv").open()))
    assert [row["method"] for row in rows] == ["bulk"]
    assert "l2sct" in json.loads((tmp_path / "broken" / "results.json").read_text())["metadata"]["failed methods"]


@pytest.mark.parametrize("family, first, field", [("l2sct", "l2l_regress", "init_trunk_from"),
                                                   ("l2l_controlnet", "l2l_controlnet_prior", "prior_path")])
def test_a_family_that_starts_from_another_run_trains_it_first(family: str, first: str, field: str, tmp_path: Path,
                                                               monkeypatch) -> None:
    """What a class names in ``starts_from`` is trained first (its recipe ``<name>_<size>``) and its run
    folder goes into the field; no family is special-cased by name in the bench."""
    from latent.app.bench import run as bench_run
    from latent.app.bench.config import BenchConfig

    calls = []

    def train_or_reuse(config, name, recipe, split_file, cache, overrides):
        calls.append((name, recipe, list(overrides)))
        return bench_run.TrainRecord(tmp_path / name, 1.0, 0.0, 0.0, recipe, False)

    monkeypatch.setattr(bench_run, "train_or_reuse", train_or_reuse)
    config = BenchConfig(data=tmp_path, cache=tmp_path / "c", out=tmp_path / "o", size="full")
    record = bench_run.train_learned(config, family, tmp_path / "s.json", tmp_path / "c")
    assert calls == [(first, f"{first}_full", []), (family, f"{family}_full", [f"model.{field}={tmp_path / first}"])]
    assert record.seconds == 2.0
    from latent.core.recipes import find_recipe

    assert find_recipe(f"{first}_full").is_file() and find_recipe(f"{first}_demo").is_file()
