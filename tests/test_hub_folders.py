"""One model format for every model, pushed to and loaded from the hub (offline: the push is
captured, the download is served from the hub's cache layout the test writes itself)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from latent.core.errors import BadFileError, WeightsError
from latent.core.model_folder import publishable_files, read_model_config, resolve_folder, write_model_folder

FAKE_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Offline hub: pushes land in ``remote/<repo>``; ``publish(repo)`` puts them in the local hub cache."""
    import huggingface_hub
    import huggingface_hub.constants as hub_constants

    cache, remote, calls = tmp_path / "hub_cache", tmp_path / "remote", {}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        calls["create_repo"] = (repo_id, private, exist_ok)

    def upload_folder(self, repo_id, folder_path, commit_message=None, **kwargs):
        shutil.copytree(folder_path, remote / repo_id)
        return f"https://huggingface.co/{repo_id}/commit/{FAKE_COMMIT}"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)

    def publish(repo_id: str) -> None:
        folder = cache / ("models--" + repo_id.replace("/", "--"))
        shutil.copytree(remote / repo_id, folder / "snapshots" / FAKE_COMMIT)
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(FAKE_COMMIT)

    return {"remote": remote, "calls": calls, "publish": publish}


def tiny_run(run_dir: Path) -> Path:
    from latent.translate.train import parse_config, train

    class Latents(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int) -> dict:
            mr = torch.randn(4, 8, 8, 8, generator=torch.Generator().manual_seed(index))
            return {"pid": f"p{index}", "mr_mu": mr, "ct_mu": mr}

    config = parse_config({"model": {"family": "l2l_regress", "channels": [8, 8], "norm_num_groups": 4},
                           "data": {"batch_size": 2}, "run_dir": str(run_dir),
                           "train": {"max_steps": 2, "checkpoint_every": 2, "tensorboard": False}})
    return train(config, train_dataset=Latents(), quiet=True)


def test_a_run_pushed_to_the_hub_loads_back_as_hf_spec(tmp_path: Path, hub: dict) -> None:
    from latent.decode.pipeline import load_run
    from latent.app.cli import app

    run_dir = tiny_run(tmp_path / "run")
    result = CliRunner().invoke(app, ["push", str(run_dir), "--repo", "lab/l2l-tiny", "--private"])
    assert result.exit_code == 0, result.output
    assert hub["calls"]["create_repo"] == ("lab/l2l-tiny", True, True) and FAKE_COMMIT in result.output
    pushed = sorted(str(p.relative_to(hub["remote"] / "lab/l2l-tiny")) for p in (hub["remote"] / "lab/l2l-tiny").rglob("*")
                    if p.is_file())
    assert pushed == sorted(["README.md", "config.json", "config.yaml", "producer.json", "final/config.json",
                             "final/model.safetensors", "final/trainer_state.json"])  # no checkpoints, no logs
    card = (hub["remote"] / "lab/l2l-tiny" / "README.md").read_text()
    assert "`l2l_regress`" in card and "latent predict --model hf://lab/l2l-tiny" in card

    with pytest.raises(BadFileError, match="hf://lab/l2l-tiny: cannot be read from the hub"):
        load_run("hf://lab/l2l-tiny", "final")  # offline and not in the cache yet: one line
    hub["publish"]("lab/l2l-tiny")
    local, remote = load_run(run_dir, "final"), load_run("hf://lab/l2l-tiny", "final")
    assert remote.run_dir.name == FAKE_COMMIT
    for name, tensor in local.model.state_dict().items():
        torch.testing.assert_close(remote.model.state_dict()[name], tensor, rtol=0, atol=0)
    assert resolve_folder(f"hf://lab/l2l-tiny@{FAKE_COMMIT}") == remote.run_dir


def test_a_vae_folder_round_trips_through_the_hub(tmp_path: Path, hub: dict) -> None:
    from latent.app.push import push
    from latent.core.vae.loading import load_vae
    from latent.core.vae.fit import VAEFitConfig, fit_vae

    volumes = [np.random.default_rng(i).random((8, 16, 16), dtype=np.float32) for i in range(2)]
    tiny = {"channels": (8, 8, 16), "crop": None, "final_eval_volumes": 0}
    vae_dir = fit_vae(volumes, tmp_path / "vae", VAEFitConfig(max_steps=1, **tiny), quiet=True)
    # the run layout of every family: best/ (what load_vae reads), final/ and the run's records
    assert publishable_files(vae_dir) == ["fit_config.json", "best/config.json", "best/model.safetensors",
                                          "final/config.json", "final/model.safetensors", "final/trainer_state.json"]
    push(vae_dir, "lab/vae-tiny")
    hub["publish"]("lab/vae-tiny")
    local, remote = load_vae(str(vae_dir)), load_vae("hf://lab/vae-tiny")
    assert remote.weights_sha256 == local.weights_sha256
    # the same producer (so the same cache key); a run trained on it records the portable hub spec
    assert {**remote.producer_info(), "path": None} == {**local.producer_info(), "path": None}
    assert remote.producer_info()["path"] == "hf://lab/vae-tiny"


def test_model_folders_are_written_whole_and_checked_on_reading(tmp_path: Path) -> None:
    folder = write_model_folder(tmp_path / "m", {"family": "x"}, {"w": torch.ones(2)})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    (folder / "notes.txt").write_text("kept")
    write_model_folder(folder, {"family": "y"}, {"w": torch.zeros(2)})  # existing folder: files replaced
    assert read_model_config(folder) == {"family": "y"} and (folder / "notes.txt").read_text() == "kept"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary left behind
    (folder / "config.json").write_text("{family")
    with pytest.raises(WeightsError, match=r"config\.json: not valid JSON"):
        read_model_config(folder)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(BadFileError, match=r"half/model\.safetensors: missing"):
        read_model_config(tmp_path / "half")
    with pytest.raises(BadFileError, match="expected hf://owner/name"):
        resolve_folder("hf://no-owner")
    with pytest.raises(BadFileError, match=r"config\.json: missing"):
        publishable_files(tmp_path / "empty")  # neither a run nor a model folder


def test_a_run_without_models_is_not_pushed(tmp_path: Path) -> None:
    run_dir = tmp_path / "unfinished"
    run_dir.mkdir()
    (run_dir / "producer.json").write_text(json.dumps({}))
    with pytest.raises(BadFileError, match="without best/ or final/ model"):
        publishable_files(run_dir)
