"""A cache's latent statistics are frozen once computed (issue 32, item 3): encoding more cases keeps
them byte for byte, ``--recompute-stats`` recomputes them and keeps the old values; ``cache verify``
names a case whose metadata cannot be read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from monai.networks.nets import AutoencoderKL
from typer.testing import CliRunner

from latent.app.cli import app
from latent.app.encode_run import encode_dataset
from latent.cache import LatentCache
from latent.core.cases import discover_cases, save_splits
from latent.core.vae.loading import load_vae, save_vae_dir

GRID = "10x10x6:32x32x32"
TINY_VAE = dict(
    spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4, channels=(8, 8, 16),
    num_res_blocks=1, norm_num_groups=4, attention_levels=(False, False, False),
    with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False,
)
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoencoderKL(**TINY_VAE)
    return save_vae_dir(model, {"class_name": "AutoencoderKL", "kwargs": TINY_VAE},
                        tmp_path_factory.mktemp("vae") / "vae")


def copy_cases(source: Path, out: Path, pids: list[str]) -> Path:
    for case in discover_cases(source):
        if case.pid in pids:
            shutil.copytree(case.folder, out / "Task1" / case.region / case.pid)
    return out


def first_of_each_region(phantom_root: Path) -> list[str]:
    firsts: dict[str, str] = {}
    for case in discover_cases(phantom_root):
        firsts.setdefault(case.region, case.pid)
    return list(firsts.values())


def test_adding_a_case_keeps_the_statistics_and_the_flag_recomputes_them(tmp_path, phantom_root, vae_dir):
    pids = first_of_each_region(phantom_root)
    root = copy_cases(phantom_root, tmp_path / "data", pids[:2])
    split = save_splits({"train": pids[:2], "val": [], "test": []}, tmp_path / "split.json")
    path = tmp_path / "latents.zarr"
    vae = load_vae(str(vae_dir))
    first = encode_dataset(root, path, vae, GRID, split_file=split, quiet=True)
    cache = LatentCache.open(path, first.producer_key)
    frozen = cache.latent_stats()
    assert frozen["ct_mu"]["pids"] == pids[:2] and str(split.resolve()) in frozen["split"]
    group_meta = (cache.group_dir / "zarr.json").read_bytes()

    copy_cases(phantom_root, root, pids[2:])  # one more case, encoded without --split-file (issue 32)
    added = encode_dataset(root, path, vae, GRID, quiet=True)
    assert added.encoded == pids[2:]
    assert (cache.group_dir / "zarr.json").read_bytes() == group_meta  # the statistics did not move
    assert cache.latent_stats() == frozen

    everything = save_splits({"train": pids, "val": [], "test": []}, tmp_path / "all.json")
    result = runner.invoke(app, ["encode", "--data", str(root), "--cache", str(path), "--vae", str(vae_dir),
                                 "--grid", GRID, "--split-file", str(everything), "--recompute-stats", "-q"])
    assert result.exit_code == 0, result.output
    stats = cache.latent_stats()
    assert stats["ct_mu"]["pids"] == pids and str(everything.resolve()) in stats["split"]
    assert stats["ct_mu"]["scale_factor"] != frozen["ct_mu"]["scale_factor"]
    history = json.loads((cache.group_dir / "zarr.json").read_text())["attributes"]["latent_stats_history"]
    assert history == [{"replaced_at": stats["computed_at"], "latent_stats": frozen}]


def test_cache_verify_names_a_case_whose_metadata_is_truncated(tmp_path, phantom_root, vae_dir):
    pids = first_of_each_region(phantom_root)[:2]
    root = copy_cases(phantom_root, tmp_path / "data", pids)
    path = tmp_path / "latents.zarr"
    report = encode_dataset(root, path, load_vae(str(vae_dir)), GRID, quiet=True)
    meta = path / "producers" / report.producer_key / "cases" / pids[0] / "zarr.json"
    meta.write_bytes(meta.read_bytes()[: meta.stat().st_size // 2])
    result = runner.invoke(app, ["cache", "verify", str(path)])
    assert result.exit_code == 1, result.output
    assert (f"problem: {pids[0]}: case metadata unreadable: {meta} is not valid JSON (truncated?); "
            "the case is skipped by every reader (encode again to rewrite it)") in result.stderr
    assert "problem: latent_stats are stale" in result.stderr  # the statistics' case is gone too
