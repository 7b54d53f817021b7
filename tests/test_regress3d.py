"""3D nnU-Net-style regression: planner, deep-supervised loss, body-biased patches, sliding windows, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import Dataset

from latent.translate.models.base import build_model, load_pretrained
from latent.translate.models.l2sct import AIR_VALUE
from latent.translate.models.regress3d import (
    CT_PAD,
    Regress3D,
    plan_topology,
    sample_patch_starts,
    split_heads,
    training_patches,
)
from latent.translate.train import ConfigError, parse_config, train

PATCH = (16, 16, 16)
#: Four levels on a 16-voxel patch (16 -> 8 -> 4 -> 2), so two deep-supervision heads fit.
TINY = {"family": "regress3d", "patch_size": list(PATCH), "spacing_zyx": [1.0, 1.0, 1.0], "max_levels": 4,
        "min_feature_size": 2, "base_channels": 4, "max_channels": 16, "deep_supr_num": 2, "lr": 1e-3}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny nets gain nothing from threads; on a busy machine they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_volumes(shape: tuple[int, int, int], batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Batch-contract volumes: a smooth MR, a body mask where it is bright, CT a function of the MR inside."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(batch, 1, *(max(2, s // 4) for s in shape), generator=generator)
    mr = torch.nn.functional.interpolate(noise, size=shape, mode="trilinear", align_corners=False)
    mask = (mr > 0.4).float()
    ct = (mr - 0.5) * mask + AIR_VALUE * (1 - mask)
    return {"mr_pixels": mr * mask, "ct_pixels": ct, "mask_pixels": mask}


def make(**changes) -> Regress3D:
    torch.manual_seed(0)
    return build_model({**TINY, **changes})


def test_planner_isotropic_doubles_every_axis_until_min_feature_size():
    kernels, strides = plan_topology((32, 32, 32), (1.0, 1.0, 1.0), max_levels=6, min_feature_size=4)
    assert strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]  # 32 -> 16 -> 8 -> 4; 4 < 2 x 4 stops
    kernels, strides = plan_topology((32, 32, 32), (1.0, 1.0, 1.0), max_levels=6, min_feature_size=2)
    assert strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert kernels == [[3, 3, 3]] * 5
    assert len(plan_topology((64, 64, 64), (1.0, 1.0, 1.0), max_levels=3)[1]) == 3  # max_levels caps


def test_planner_keeps_a_coarse_axis_flat_until_it_catches_up():
    kernels, strides = plan_topology((16, 64, 64), (3.0, 1.0, 1.0), max_levels=6, min_feature_size=4)
    # z is 3x coarser: kernel 1 and stride 1 on z at first; after one in-plane pooling (2 mm) it is within 2x.
    assert kernels[0] == [1, 3, 3] and strides[1] == [1, 2, 2]
    assert kernels[1] == [3, 3, 3] and strides[2] == [2, 2, 2]
    kernels, strides = plan_topology((16, 64, 64), (5.0, 1.0, 1.0), max_levels=6, min_feature_size=4)
    assert kernels[:2] == [[1, 3, 3], [1, 3, 3]] and strides[1:3] == [[1, 2, 2], [1, 2, 2]]
    assert kernels[2] == [3, 3, 3] and strides[3] == [2, 2, 2]
    assert len(kernels) == len(strides)


def test_training_step_gives_a_finite_loss_through_every_supervision_head():
    model = make().train()
    batch = toy_volumes((16, 24, 24), batch=2)
    torch.manual_seed(3)
    losses = model(batch)
    assert losses["loss"].ndim == 0 and torch.isfinite(losses["loss"])
    assert set(losses) >= {"loss", "l1_body", "l1_background", "mae_hu_body", "deep_supervision"}
    assert losses["deep_supervision"] > 0
    losses["loss"].backward()
    heads = model.network.deep_supervision_heads
    assert len(heads) == 2
    for head in heads:
        assert head.conv.conv.weight.grad.abs().sum() > 0
    # The heads' own outputs are recovered exactly from MONAI's upsampled stack.
    stacked = model.network(torch.rand(1, 1, *PATCH))
    assert stacked.shape == (1, 3, 1, *PATCH)
    own = split_heads(stacked, model.supervision_scales)
    assert [tuple(h.shape[2:]) for h in own] == [PATCH, (8, 8, 8), (4, 4, 4)]
    for head, kept in zip(own[1:], model.network.heads):
        assert torch.equal(head, kept)
    assert sum(model.supervision_weights) == pytest.approx(1.0)
    assert model.supervision_weights == pytest.approx([4 / 7, 2 / 7, 1 / 7])  # halving per level


def test_every_tensor_is_saved_under_one_name():
    model = make()
    state = model.state_dict()
    assert not any("skip_layers" in key for key in state)
    assert len({v.data_ptr() for v in state.values()}) == len(state)
    assert len(list(model.named_parameters(remove_duplicate=False))) == len(list(model.named_parameters()))


def test_gradient_term_and_mse_are_optional():
    batch = toy_volumes(PATCH)
    torch.manual_seed(1)
    losses = make(gradient_weight=0.5, loss="mse")(batch)
    assert "gradient" in losses and torch.isfinite(losses["loss"])


def test_patches_are_centred_on_a_small_body_blob_and_stay_inside():
    mask = torch.zeros(1, 1, 32, 32, 32)
    mask[0, 0, 1:3, 28:31, 2:4] = 1.0  # a small blob near a corner
    generator = torch.Generator().manual_seed(0)
    starts = sample_patch_starts(mask, 20, PATCH, 1.0, generator)[0]
    assert starts.shape == (20, 3)
    assert (starts >= 0).all() and (starts + torch.tensor(PATCH) <= 32).all()
    blob = torch.tensor([[z, y, x] for z in (1, 2) for y in (28, 29, 30) for x in (2, 3)])
    for corner in starts:
        inside = ((blob >= corner) & (blob < corner + torch.tensor(PATCH))).all(dim=1)
        assert inside.any(), corner
    uniform = sample_patch_starts(mask, 40, PATCH, 0.0, torch.Generator().manual_seed(0))[0]
    assert len({tuple(c) for c in uniform.tolist()}) > 10


def test_training_patches_pad_small_volumes_and_repeat_under_the_global_seed():
    batch = toy_volumes((10, 16, 16))
    config = make().config
    torch.manual_seed(5)
    first = training_patches(batch, config)
    torch.manual_seed(5)
    again = training_patches(batch, config)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert first["ct"].shape == (1, 1, *PATCH)
    assert (first["ct"][:, :, 10:] == CT_PAD).all() and (first["mr"][:, :, 10:] == 0).all()
    assert (first["mask"][:, :, 10:] == 0).all()


def test_sliding_window_translate_covers_a_larger_volume(tmp_path):
    model = make()
    model.network.output_block.conv.conv.weight.data.normal_(0, 1.0)  # a non-constant output
    inputs = toy_volumes((24, 40, 20), batch=1)["mr_pixels"]
    model.train()  # translate switches the network to eval itself (no stacked supervision output)
    output = model.translate(inputs)
    assert model.network.training
    assert output.shape == inputs.shape
    assert output.min() >= -1.0 and output.max() <= 1.0 and output.std() > 0
    assert model.translate(inputs[..., :10, :12, :]).shape == (1, 1, 10, 12, 20)  # smaller than a window
    model.save_pretrained(tmp_path / "saved")
    loaded = load_pretrained(tmp_path / "saved")
    assert isinstance(loaded, Regress3D) and loaded.config == model.config
    assert torch.equal(loaded.translate(inputs), output)


def test_channels_last_weights_and_batched_windows_change_speed_not_the_output():
    inputs = toy_volumes((24, 40, 20))["mr_pixels"]
    reference = make(channels_last=False, sw_batch_size=1)
    reference.network.output_block.conv.conv.weight.data.normal_(0, 1.0)
    fast = make(channels_last=True, sw_batch_size=4)
    fast.load_state_dict(reference.state_dict())
    assert any(not p.is_contiguous() for p in fast.parameters())  # channels-last 3D weights
    assert all(v.is_contiguous() for v in fast.state_dict().values())  # what safetensors accepts
    torch.testing.assert_close(fast.translate(inputs), reference.translate(inputs), atol=1e-5, rtol=0)
    batch = toy_volumes(PATCH, batch=2)
    torch.manual_seed(3)
    slow_loss = reference(batch)["loss"]
    torch.manual_seed(3)
    torch.testing.assert_close(fast(batch)["loss"], slow_loss, atol=1e-5, rtol=1e-5)


def test_fresh_model_starts_at_water():
    output = make().translate(toy_volumes(PATCH)["mr_pixels"])
    assert torch.allclose(output, torch.full_like(output, -1 + 2 * 1024 / 4095), atol=1e-6)


@pytest.mark.parametrize("changes, field", [
    ({"patch_size": [18, 16, 16]}, "patch_size"),  # 18 is not a multiple of the planned z stride 8
    ({"patch_size": [4, 4, 4]}, "patch_size"),  # too small for three levels
    ({"deep_supr_num": 3}, "deep_supr_num"),
    ({"body_patch_fraction": 1.5}, "body_patch_fraction"),
    ({"overlap": 1.0}, "overlap"),
    ({"max_channels": 2}, "max_channels"),
    ({"sw_batch_size": 0}, "sw_batch_size"),
    ({"patch_sise": [16, 16, 16]}, "patch_sise"),
])
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        build_model({**TINY, **changes})
    with pytest.raises(ConfigError, match=rf"model\.{field}"):
        parse_config({"model": {**TINY, **changes}})


class ToyVolumes(Dataset):
    """Whole-volume items of the batch contract (channel axis included)."""

    def __init__(self, cases: int) -> None:
        self.items = [{key: value[0] for key, value in toy_volumes((16, 20, 20), seed=i).items()} for i in range(cases)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return {"pid": f"toy{index}", **self.items[index]}


def test_train_loop_runs_two_steps_and_saves_a_loadable_model(tmp_path):
    config = parse_config({
        "model": TINY, "data": {"batch_size": 2}, "run_dir": str(tmp_path / "run"),
        "train": {"max_steps": 2, "log_every": 1, "mixed_precision": "no", "tensorboard": False},
    })
    run_dir = train(config, train_dataset=ToyVolumes(3), quiet=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    final = load_pretrained(run_dir / "final")
    assert isinstance(final, Regress3D)
    assert final.translate(torch.rand(1, 1, 16, 20, 20)).shape == (1, 1, 16, 20, 20)


def test_resume_with_channels_last_weights_matches_the_uninterrupted_run(tmp_path):
    def config(name: str, steps: int, resume: bool = False):
        return parse_config({
            "model": TINY, "data": {"batch_size": 2}, "run_dir": str(tmp_path / name),
            "train": {"max_steps": steps, "checkpoint_every": 2, "log_every": 1, "mixed_precision": "no",
                      "tensorboard": False, "resume": resume},
        })

    full = train(config("full", 4), train_dataset=ToyVolumes(3), quiet=True)
    halfway = load_pretrained(train(config("cut", 2), train_dataset=ToyVolumes(3), quiet=True) / "final").state_dict()
    resumed = train(config("cut", 4, resume=True), train_dataset=ToyVolumes(3), quiet=True)
    expected, got = load_pretrained(full / "final").state_dict(), load_pretrained(resumed / "final").state_dict()
    assert any(not torch.allclose(halfway[key], value) for key, value in expected.items())  # steps 3-4 moved it
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)
