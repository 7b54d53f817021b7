"""The shipped stand-in VAE: pinned by SHA-256, refused when altered, used frozen by the demo."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from latent.core.vae.loading import SHIPPED_ROOT, SHIPPED_VAES, VAEError, load_vae, sha256_file
from latent.core.vae.inference import decode, encode_mu

ENTRY = SHIPPED_VAES["standin"]
FOLDER = SHIPPED_ROOT / ENTRY.folder


def test_shipped_files_match_their_pinned_hashes_and_provenance() -> None:
    assert sha256_file(FOLDER / "model.safetensors") == ENTRY.weights_sha256
    assert sha256_file(FOLDER / "config.json") == ENTRY.config_sha256
    assert (FOLDER / "model.safetensors").stat().st_size <= 20 * 2**20
    provenance = (FOLDER / "PROVENANCE.md").read_text()
    assert ENTRY.weights_sha256 in provenance and "latent vae fit" in provenance


def test_standin_loads_frozen_and_runs_on_any_shape() -> None:
    vae = load_vae("standin")
    assert vae.name == "standin" and vae.norm == "none" and vae.inference_tile is None
    assert vae.weights_sha256 == ENTRY.weights_sha256
    assert not any(p.requires_grad for p in vae.network.parameters()) and not vae.network.training
    torch.manual_seed(0)
    for shape in ((32, 128, 128), (16, 48, 96)):  # the demo grid and another shape
        x = torch.rand(1, 1, *shape) * 0.5
        z = encode_mu(vae, x)
        assert z.shape == (1, 4, *(s // 4 for s in shape))
        assert decode(vae, z).shape == x.shape


@pytest.mark.parametrize("filename", ["model.safetensors", "config.json"])
def test_an_altered_shipped_file_is_refused_with_one_line(tmp_path: Path, filename: str) -> None:
    copy = tmp_path / ENTRY.folder
    shutil.copytree(FOLDER, copy)
    data = bytearray((copy / filename).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / filename).write_bytes(bytes(data))
    with pytest.raises(VAEError) as error:
        load_vae("standin", shipped=SHIPPED_VAES, shipped_root=tmp_path)
    message = str(error.value)
    assert "\n" not in message and "SHA-256 mismatch" in message and str(copy / filename) in message
    (copy / filename).unlink()
    with pytest.raises(VAEError, match="is missing"):
        load_vae("standin", shipped=SHIPPED_VAES, shipped_root=tmp_path)


def test_demo_encodes_with_the_shipped_vae_without_fitting(tmp_path: Path) -> None:
    from latent.cache import LatentCache, list_producers
    from latent.app.demo import DemoConfig, prepare_data, vae_and_encode

    config = DemoConfig(cases=9, dose=False)
    data, splits = prepare_data(tmp_path, config)
    spec, cache_path, vae_seconds = vae_and_encode(data, tmp_path, config)
    assert spec == "standin" and vae_seconds == 0.0 and not (tmp_path / "vae").exists()
    cache = LatentCache.open(cache_path, next(iter(list_producers(cache_path))))
    assert cache.record["vae_weights_sha256"] == ENTRY.weights_sha256
    assert sorted(cache.case_ids()) == sorted(p for v in splits.values() for p in v)


def test_demo_refuses_too_few_cases(tmp_path: Path) -> None:
    from latent.app.demo import DemoConfig, run_demo

    with pytest.raises(ValueError, match="--cases 8: the demo needs at least 9 cases"):
        run_demo(tmp_path, DemoConfig(cases=8))
    assert not any(tmp_path.iterdir())


def test_the_v2_command_writes_its_data_once_and_continues_its_run(tmp_path: Path) -> None:
    """benchmarks/standin_v2.sh at a tiny size: phantoms and split once, a resumed second call."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "standin_v2.sh"
    env = {**os.environ, "CASES": "8", "LATENT": str(Path(sys.executable).parent / "latent")}
    tiny = ["model.channels=[4,8,8]", "model.crop=[16,32,32]", "data.batch_size=1", "model.val_cases=1",
            "train.checkpoint_seconds=1", "train.val_every=100000", "-q"]

    def call() -> int:
        subprocess.run(["bash", str(script), str(tmp_path), "4", *tiny], env=env, check=True, capture_output=True)
        (checkpoint,) = (tmp_path / "vae" / "checkpoints").iterdir()  # the VAE keeps the newest only
        return int(checkpoint.name.split("_")[1])

    first = call()
    assert first > 0 and not (tmp_path / "data.partial").exists()
    data_files = sorted(p.name for p in (tmp_path / "data").rglob("*"))
    assert json.loads((tmp_path / "splits.json").read_text())["val"]
    assert call() > first  # continued, not restarted
    assert sorted(p.name for p in (tmp_path / "data").rglob("*")) == data_files
