"""The 2.5D U-Net++ / ResNet family and two-stage training (init_from): shapes, range, learning,
exact resume, local encoder weights, the 2D perception loss, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.networks.nets import UNet
from safetensors.torch import save_file

from latent.core.errors import BadConfigError, WeightsError
from latent.translate.init_from import init_from_run
from latent.translate.models.base import build_model, load_pretrained
from latent.translate.models.l2sct import START_VALUE
from latent.translate.models.unetpp25d import UNetPP25D
from latent.translate.train import ConfigError, parse_config, train

from test_regress3d import ToyVolumes, toy_volumes

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"family": "unetpp25d", "backbone": "resnet10", "decoder_channels": [16, 16, 8, 8, 8], "context_slices": 3,
        "slices_per_volume": 4, "lr": 1e-3}
SEG_2D = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2],
          "num_res_units": 0}


def make(**changes) -> UNetPP25D:
    torch.manual_seed(0)
    return build_model({**TINY, **changes})


def run_config(tmp_path: Path, name: str, steps: int, **top) -> object:
    return parse_config({
        "model": {**TINY, **top.pop("model", {})}, "data": {"batch_size": 2}, "run_dir": str(tmp_path / name),
        "train": {"max_steps": steps, "checkpoint_every": 2, "log_every": 1, "mixed_precision": "no",
                  "tensorboard": False, "resume": top.pop("resume", False)}, **top,
    })


def test_whole_volume_output_keeps_the_shape_and_the_range_and_starts_at_water():
    model = make()
    volume = toy_volumes((5, 40, 36))["mr_pixels"]  # in-plane sizes not multiples of 32
    fresh = model.translate(volume)
    assert fresh.shape == volume.shape and torch.allclose(fresh, torch.full_like(fresh, START_VALUE))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    output = model.translate(volume * 50)
    assert output.shape == volume.shape and output.min() >= -1 and output.max() <= 1
    assert output.min() == -1 or output.max() == 1  # clipped, not squashed


def test_a_few_steps_lower_the_training_loss():
    model = make().train()
    batch = toy_volumes((6, 32, 32), batch=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss() -> torch.Tensor:
        torch.manual_seed(1)  # the same slices every time
        return model(batch)["loss"]

    first = float(loss().detach())
    for _ in range(12):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert float(loss().detach()) < 0.7 * first


def test_resume_matches_the_uninterrupted_run(tmp_path):
    full = train(run_config(tmp_path, "full", 4), train_dataset=ToyVolumes(3), quiet=True)
    halfway = load_pretrained(train(run_config(tmp_path, "cut", 2), train_dataset=ToyVolumes(3), quiet=True) / "final")
    resumed = train(run_config(tmp_path, "cut", 4, resume=True), train_dataset=ToyVolumes(3), quiet=True)
    expected, got = load_pretrained(full / "final").state_dict(), load_pretrained(resumed / "final").state_dict()
    assert isinstance(load_pretrained(full / "final"), UNetPP25D)
    assert any(not torch.equal(halfway.state_dict()[key], value) for key, value in expected.items())
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)


def test_local_encoder_weights_load_adapt_the_first_layer_and_fail_in_one_line(tmp_path):
    source = make(context_slices=1).network.encoder.state_dict()  # a 1-channel first layer
    source["fc.weight"] = torch.zeros(2, 2)  # a classifier head is skipped
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in source.items()}, str(path))
    model = make(encoder_weights=str(path))
    loaded = model.network.encoder.state_dict()
    torch.testing.assert_close(loaded["layer1.0.conv1.weight"], source["layer1.0.conv1.weight"])
    torch.testing.assert_close(loaded["conv1.weight"], source["conv1.weight"].repeat(1, 3, 1, 1) / 3)
    assert model.config.encoder_weights is None and model.config.encoder_initialised_from == str(path)
    model.save_pretrained(tmp_path / "saved")
    path.unlink()  # the saved model carries the weights
    assert torch.equal(load_pretrained(tmp_path / "saved").network.encoder.state_dict()["layer1.0.conv1.weight"],
                       loaded["layer1.0.conv1.weight"])
    del source["layer4.0.bn2.bias"]
    save_file({k: v.contiguous() for k, v in source.items()}, str(path))
    with pytest.raises(WeightsError) as info:
        make(encoder_weights=str(path))
    assert "\n" not in str(info.value) and str(path) in str(info.value) and "layer4.0.bn2.bias" in str(info.value)
    with pytest.raises(WeightsError, match="no such file"):
        make(encoder_weights=str(tmp_path / "nowhere.pt"))


def _segmenter_folder(folder: Path, kwargs: dict, layers: list[str]) -> Path:
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in UNet(**kwargs).state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"class_name": "UNet", "kwargs": kwargs, "layers": layers}))
    return folder


def test_perception_loss_uses_a_2d_network_and_refuses_a_3d_one(tmp_path):
    folder = _segmenter_folder(tmp_path / "seg2d", SEG_2D, ["model.0"])
    model = make(perception_weights=str(folder), perception_weight=0.5).train()
    model.prepare_training()
    torch.manual_seed(0)
    losses = model(toy_volumes((6, 32, 32), batch=2))
    assert losses["perception"] > 0 and "perception" not in dict(model.named_parameters())
    assert not any(name.startswith("perception") for name in model.state_dict())
    three_d = _segmenter_folder(tmp_path / "seg3d", {**SEG_2D, "spatial_dims": 3}, ["model.0"])
    with pytest.raises(BadConfigError) as info:
        make(perception_weights=str(three_d)).prepare_training()
    assert "\n" not in str(info.value) and "3D network" in str(info.value) and str(three_d) in str(info.value)


@pytest.mark.parametrize("changes, field", [
    ({"model": {**TINY, "context_slices": 4}}, r"model\.context_slices"),
    ({"model": {**TINY, "backbone": "resnet50"}}, r"model\.backbone"),
    ({"model": TINY, "data": {"regions": ["AB", "XX"]}}, r"data\.regions.*'XX'"),
    ({"model": TINY, "data": {"regions": []}}, r"data\.regions"),
])
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        parse_config(changes)


def test_init_from_starts_from_another_run_and_refuses_a_mismatch_in_one_line(tmp_path):
    first = train(run_config(tmp_path, "global", 2), train_dataset=ToyVolumes(3), quiet=True)
    expected = load_pretrained(first / "final").state_dict()
    model = make()
    assert init_from_run(model, str(first)) == first / "final"  # no validation: final/
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    second = train(run_config(tmp_path, "stage2", 1, init_from=str(first)), train_dataset=ToyVolumes(3), quiet=True)
    assert json.loads((second / "producer.json").read_text())["init_from"] == str(first / "final")
    assert json.loads((second / "config.json").read_text())["init_from"] == str(first)
    moved = load_pretrained(second / "final").state_dict()
    fresh = make().state_dict()
    key = "network.encoder.layer1.0.conv1.weight"  # one step from the first run's weights, not from fresh ones
    assert (moved[key] - expected[key]).abs().max() < (moved[key] - fresh[key]).abs().max()
    with pytest.raises(WeightsError) as info:
        init_from_run(make(decoder_channels=[16, 16, 8, 8, 4]), str(first))
    message = str(info.value)
    assert "\n" not in message and str(first / "final") in message and "network.final_block" in message
    with pytest.raises(BadConfigError, match="'unetpp25d' model; this run trains 'regress3d'"):
        init_from_run(build_model({"family": "regress3d", "patch_size": [16, 16, 16], "max_levels": 3,
                                   "min_feature_size": 2, "base_channels": 4, "max_channels": 8,
                                   "deep_supr_num": 0}), str(first))
    with pytest.raises(BadConfigError, match="init_from: .* is neither a training run"):
        init_from_run(make(), str(tmp_path))
