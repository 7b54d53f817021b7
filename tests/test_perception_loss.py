"""The anatomical perception loss of ``regress3d``: a frozen segmentation network from a weights
folder, a zero term for sCT == CT, no gradient into the network, not saved, one-line errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from monai.networks.nets import DynUNet
from safetensors.torch import save_file

from latent.core.errors import BadConfigError, BadFileError, WeightsError
from latent.translate.models.base import load_pretrained
from latent.core.segmentation_network import IntensityMap, register_once
from latent.translate.models.perception import load_perception_network
from latent.translate.train import ConfigError, parse_config, train

from test_regress3d import PATCH, TINY, ToyVolumes, make, one_thread, toy_volumes  # noqa: F401 (fixture)

SEG_KWARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "kernel_size": [3, 3, 3],
              "strides": [1, 2, 2], "upsample_kernel_size": [2, 2], "filters": [4, 8, 8]}
LAYERS = ["input_block", "downsamples.0"]


def tiny_segmenter(seed: int = 0) -> DynUNet:
    torch.manual_seed(seed)
    return DynUNet(**SEG_KWARGS)


def write_weights(folder: Path, *, pt: bool = False, **config_changes) -> Path:
    """A weights folder of a tiny DynUNet: ``model.safetensors`` or a plain torch state dict ``model.pt``."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"class_name": "DynUNet", "kwargs": SEG_KWARGS, "input_range": [-1024, 3000], "layers": LAYERS,
              **config_changes}
    (folder / "config.json").write_text(json.dumps(config))
    if pt:  # as torch saves a DynUNet: every tensor also under skip_layers.*
        torch.save(tiny_segmenter().state_dict(), folder / "model.pt")
    else:
        save_file({k: v.contiguous() for k, v in register_once(tiny_segmenter()).state_dict().items()},
                  str(folder / "model.safetensors"))
    return folder


@pytest.fixture()
def weights(tmp_path: Path) -> Path:
    return write_weights(tmp_path / "seg")


def test_intensity_map_clips_hu_then_scales():
    hu = torch.tensor([-1024.0, 3071.0])
    assert torch.allclose(IntensityMap().from_hu(hu), torch.tensor([0.0, 1.0]))
    assert torch.allclose(IntensityMap(-1000.0, 1000.0, 0.0, 500.0).from_hu(hu), torch.tensor([-2.0, 2.0]))
    assert torch.allclose(IntensityMap(-1000.0, 1000.0).from_unit(torch.tensor([0.0, 0.25, 1.0])),
                          torch.tensor([0.0, 0.25, 1.0]))


@pytest.mark.parametrize("pt", [False, True])
def test_term_is_zero_for_sct_equal_ct_and_positive_otherwise(tmp_path, pt):
    network = load_perception_network(write_weights(tmp_path / "seg", pt=pt))
    assert network.layers == tuple(LAYERS) and not network.network.training
    volumes = toy_volumes(PATCH)
    ct, mask = volumes["ct_pixels"], volumes["mask_pixels"]
    assert network.loss(ct, ct, mask) == 0.0
    other = network.loss(ct + 0.1 * torch.randn(ct.shape, generator=torch.Generator().manual_seed(0)), ct, mask)
    assert torch.isfinite(other) and other > 0


def test_training_step_adds_the_term_and_leaves_the_segmenter_alone(weights):
    model = make(perception_weights=str(weights), perception_weight=0.5).train()
    model.prepare_training()
    segmenter = model.perception_network()
    before = {k: v.clone() for k, v in segmenter.state_dict().items()}
    optimizer = torch.optim.Adam(model.phase_parameters("main"), lr=1e-2)
    assert not {id(p) for p in segmenter.parameters()} & {id(p) for p in model.phase_parameters("main")}
    torch.manual_seed(3)
    losses = model(toy_volumes((16, 20, 20), batch=2))
    assert torch.isfinite(losses["perception"]) and losses["perception"] > 0
    losses["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in segmenter.parameters())
    assert model.network.output_block.conv.conv.weight.grad.abs().sum() > 0
    optimizer.step()
    assert not segmenter.network.training
    assert all(torch.equal(before[k], v) for k, v in segmenter.state_dict().items())


def test_saved_model_holds_no_segmenter_tensors_and_predicts_without_them(weights, tmp_path):
    model = make(perception_weights=str(weights))
    model.prepare_training()
    assert model.config.perception == "on"
    assert set(model.state_dict()) == set(make().state_dict())
    model.save_pretrained(tmp_path / "saved")
    for path in weights.iterdir():
        path.unlink()  # predicting needs no perception weights
    loaded = load_pretrained(tmp_path / "saved")
    assert loaded.config == model.config and loaded.config.perception == "on"
    inputs = toy_volumes(PATCH)["mr_pixels"]
    assert torch.equal(loaded.translate(inputs), model.translate(inputs))


def test_off_without_weights_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="latent.translate.models.regress3d"):
        model = make()
    assert model.config.perception == "off" and model.perception_network() is None
    assert "perception loss off" in caplog.text
    torch.manual_seed(0)
    assert "perception" not in model(toy_volumes(PATCH))
    assert parse_config({"model": TINY}).model.model_dump()["perception"] == "off"
    with pytest.raises(ConfigError, match=r"model\.perception"):
        parse_config({"model": {**TINY, "perception": "on"}})
    assert parse_config(yaml.safe_load("model: {family: regress3d, perception: off}")).model.perception == "off"


@pytest.mark.parametrize("damage, error, names", [
    (lambda f: (f / "config.json").unlink(), BadFileError, "config.json"),
    (lambda f: (f / "model.safetensors").unlink(), BadFileError, "model.safetensors"),
    (lambda f: (f / "model.safetensors").write_bytes(b"\0" * 32), WeightsError, "model.safetensors"),
    (lambda f: write_weights(f, kwargs={**SEG_KWARGS, "filters": [4, 8, 16]}), WeightsError, "model.safetensors"),
    (lambda f: write_weights(f, class_name="SwinUNETR"), BadConfigError, "config.json"),
    (lambda f: write_weights(f, layers=["decoder.9"]), BadConfigError, "config.json"),
    (lambda f: (f / "config.json").write_text("{"), BadConfigError, "config.json"),
])
def test_bad_weights_give_one_line_naming_the_file(weights, damage, error, names):
    damage(weights)
    with pytest.raises(error) as info:
        load_perception_network(weights)
    message = str(info.value)
    assert "\n" not in message and str(weights / names) in message


def test_train_loop_logs_the_term_and_refuses_bad_weights_before_any_step(weights, tmp_path):
    def config(folder: Path, name: str):
        return parse_config({
            "model": {**TINY, "perception_weights": str(folder)}, "data": {"batch_size": 1},
            "run_dir": str(tmp_path / name),
            "train": {"max_steps": 1, "log_every": 1, "mixed_precision": "no", "tensorboard": False},
        })
    with pytest.raises(BadFileError, match="config.json"):
        train(config(tmp_path / "nowhere", "bad"), train_dataset=ToyVolumes(1), quiet=True)
    assert not (tmp_path / "bad").exists()
    run_dir = train(config(weights, "run"), train_dataset=ToyVolumes(1), quiet=True)
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert record["perception"] > 0
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["perception"] == "on"
