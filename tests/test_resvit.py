"""ResViT (aggregated residual transformer generator + the shared PatchGAN): shapes, learning,
exact resume, the shared transformer, persistence and config errors. End to end on the native
grid: ``tests/test_predict_run.py`` (its ``FAMILIES``)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch.utils.data import Dataset

from latent.translate.models.base import build_model, load_pretrained
from latent.translate.models.gan_common import WATER_SIGNED
from latent.translate.train import parse_config, train
from test_gan_models import phantom_batch, train_steps

pytestmark = pytest.mark.usefixtures("one_thread")

#: A tiny ResViT: 2 encoder levels (4, 8 channels), 3 ART blocks with a 1-layer, 8-wide transformer
#: in blocks 1 and 3, two steps down to the 4 x 4 tokens of 32 x 32 slices; a 2-scale 1-layer PatchGAN.
TINY = {"family": "resvit", "channels": [4, 8], "art_blocks": 3, "vit_blocks": [1, 3], "vit_downsampling": 2,
        "vit_grid": 4, "vit_hidden": 8, "vit_heads": 2, "vit_mlp": 16, "vit_layers": 1, "vit_dropout": 0.0,
        "disc_channels": 4, "disc_layers": 1, "disc_num_d": 2, "slices_per_volume": 4, "inference_batch_size": 8}


def tiny(**changes) -> dict:
    return {**TINY, **changes}


@pytest.mark.parametrize("mode", ["2d", "2.5d"])
def test_whole_volume_output_has_the_input_shape_and_the_ct_range(mode):
    torch.manual_seed(0)
    model = build_model(tiny(mode=mode, context_slices=5))
    assert model.input_key == "mr_pixels" and model.output_space == "ct_full"
    assert model.flip_axes == ("x",) and model.config.downsampling == 8  # 2 (encoder) x 2 ** 2 (tokens)
    fresh = model.eval().translate(phantom_batch(1)["mr_pixels"])
    assert (fresh - WATER_SIGNED).abs().max().item() < 1e-6  # the zero-initialised head starts at water
    logs = train_steps(model, phantom_batch(), steps=2)
    assert all(torch.isfinite(torch.tensor(value)) for log in logs for value in log.values())
    assert logs[0]["generator/loss"] > 0 and logs[1]["discriminator/loss"] > 0
    assert int(model.generator_steps) == 2
    model.eval()
    odd = torch.rand(2, 1, 7, 30, 27)  # sizes not divisible by the downsampling factor: padded, cropped back
    output = model.translate(odd)
    assert output.shape == odd.shape
    assert torch.isfinite(output).all() and output.abs().max() <= 1.0
    assert output.std() > 0  # trained: no longer the constant water of a fresh generator


def test_a_few_steps_lower_the_training_loss_on_a_phantom():
    torch.manual_seed(0)
    # slices_per_volume = all slices: every step sees the same views, so the trend is not noise.
    # Seeds 0-3 end at 0.42-0.47 of the first L1 with the full default loss (GAN, background);
    # at lr 1e-2 (pix2pix's test) this deeper generator without skips stalls near 0.85.
    model = build_model(tiny(mode="2d", slices_per_volume=8))
    logs = train_steps(model, phantom_batch(1), steps=20, lr=1e-3)
    l1 = [log["generator/l1"] for log in logs if "generator/l1" in log]
    assert sum(l1[-3:]) / 3 < 0.75 * l1[0]


def test_the_transformer_is_shared_and_sees_the_whole_slice():
    torch.manual_seed(0)
    shared, separate = build_model(tiny()), build_model(tiny(share_transformer=False))
    assert len(shared.generator.transformers) == 1 and shared.generator.transformer_of == [0, None, 0]
    assert len(separate.generator.transformers) == 2 and separate.generator.transformer_of == [0, None, 1]
    assert [block.with_transformer for block in shared.generator.art] == [True, False, True]
    # Each transformer block keeps its own embedding; the transformer's weights are stored once.
    names = list(shared.state_dict())
    assert sum(name.startswith("generator.transformers.0.") for name in names) > 0
    assert not any(name.startswith("generator.transformers.1.") for name in names)
    # Global context: one input pixel changes output pixels far outside the convolutions' reach
    # only through the transformer. Batch norm in eval mode (running statistics) keeps the
    # convolutions local (instance norm would spread any change over the slice); random head
    # weights instead of the water start.
    x = torch.zeros(1, 1, 64, 64)
    y = x.clone()
    y[..., 2, 2] = 1.0
    far = {}
    for vit_blocks in ([1], []):
        model = build_model(tiny(mode="2d", art_blocks=1, vit_blocks=vit_blocks, norm="BATCH")).eval()
        torch.nn.init.normal_(model.generator.head.weight, std=0.1)
        change = (model.generator(y) - model.generator(x)).abs()[0, 0]
        assert change[:8, :8].max() > 0
        far[len(vit_blocks)] = change[40:, 40:].max().item()
    assert far[0] == 0.0 and far[1] > 0


def test_position_embedding_resizes_to_other_slice_sizes():
    torch.manual_seed(0)
    model = build_model(tiny(mode="2d")).eval()
    block = model.generator.art[0]
    tokens, size = block.embed(torch.rand(2, 32, 4, 4))  # the learned grid: MONAI's own forward
    assert tokens.shape == (2, 16, 8) and size == (4, 4)
    tokens, size = block.embed(torch.rand(2, 32, 3, 5))
    assert tokens.shape == (2, 15, 8) and size == (3, 5)
    assert model.generator(torch.rand(1, 1, 24, 40)).shape == (1, 1, 24, 40)


class PhantomVolumes(Dataset):
    """Whole-volume items of the batch contract (channel axis included)."""

    def __init__(self, cases: int) -> None:
        batch = phantom_batch(cases, (6, 32, 32))
        self.items = [{key: value[index] for key, value in batch.items()} for index in range(cases)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return {"pid": f"toy{index}", **self.items[index]}


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    def config(name: str, steps: int, resume: bool = False):
        return parse_config({
            "model": tiny(mode="2.5d", vit_dropout=0.1), "data": {"batch_size": 2}, "run_dir": str(tmp_path / name),
            "train": {"max_steps": steps, "checkpoint_every": 2, "log_every": 1, "mixed_precision": "no",
                      "tensorboard": False, "resume": resume},
        })

    full = train(config("full", 4), train_dataset=PhantomVolumes(3), quiet=True)
    halfway = load_pretrained(train(config("cut", 2), train_dataset=PhantomVolumes(3), quiet=True) / "final")
    resumed = train(config("cut", 4, resume=True), train_dataset=PhantomVolumes(3), quiet=True)
    expected, got = load_pretrained(full / "final").state_dict(), load_pretrained(resumed / "final").state_dict()
    assert int(got["generator_steps"]) == 4
    assert any(not torch.allclose(halfway.state_dict()[key].float(), value.float()) for key, value in expected.items())
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)


def test_save_and_load_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny(mode="2.5d"))
    train_steps(model, phantom_batch(), steps=1)
    model.eval()
    inputs = phantom_batch(1)["mr_pixels"]
    loaded = load_pretrained(model.save_pretrained(tmp_path / "resvit"))
    assert type(loaded) is type(model) and loaded.config == model.config
    assert torch.equal(loaded.translate(inputs), model.translate(inputs))


@pytest.mark.parametrize("changes,field", [
    ({"mode": "3d"}, "mode"),
    ({"vit_blocks": [1, 4]}, "vit_blocks"),
    ({"vit_blocks": [1, 1]}, "vit_blocks"),
    ({"vit_hidden": 10, "vit_heads": 4}, "vit_hidden"),
    ({"strides": [3]}, "strides"),
    ({"art_blocks": 0}, "art_blocks"),
    ({"vit_dropout": 1.0}, "vit_dropout"),
    ({"vit_typo": 1}, "vit_typo"),
])
def test_bad_configs_fail_naming_the_field(changes, field):
    with pytest.raises(ValidationError, match=field):
        build_model(tiny(**changes))


def test_recipes_load_with_the_paper_layout_and_the_demo_grid():
    from latent.app.demo import DEMO_GRID
    from latent.core.recipes import find_recipe
    from latent.translate.train import load_config

    full, demo = (load_config(find_recipe(f"resvit_{size}")).model for size in ("full", "demo"))
    for config in (full, demo):
        assert config.family == "resvit" and config.mode == "2.5d" and config.art_blocks == 9
        assert config.vit_blocks == (1, 6) and config.share_transformer and config.vit_downsampling == 2
        assert config.lambda_l1 == 100.0 and config.lr == 2e-4 and config.betas == (0.5, 0.999)
    assert full.channels == (64, 128, 256) and (full.vit_hidden, full.vit_heads, full.vit_mlp, full.vit_layers) == (
        768, 12, 3072, 12)
    assert full.vit_grid * full.downsampling == 512  # the full recipe's 512 px crops
    side = int(DEMO_GRID.split(":")[1].split("x")[-1])
    assert demo.vit_grid * demo.downsampling == side  # tokens on the grid the embedding was learned on
    model = build_model(demo)
    assert model.phases == ("generator", "discriminator") and len(model.generator.transformers) == 1
