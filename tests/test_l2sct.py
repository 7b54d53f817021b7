"""l2sct on the exact decode path of the cache's VAE: exactness at initialisation (the shipped
stand-in, a GroupNorm VAE folder, a MAISI-architecture checkpoint), provenance, the trunk started
from an l2l_regress run, the staged decoder schedule and the configs of runs written before."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from latent.core.errors import BadConfigError
from latent.translate.models.base import build_model, load_pretrained
from latent.translate.models.l2sct import AIR_VALUE, VAE_TO_FULL_OFFSET, VAE_TO_FULL_SCALE, LatentToSCT
from latent.translate.train import group_learning_rate, parse_config, train
from latent.core.vae.loading import build_vae, load_vae, save_vae_dir
from latent.core.vae.inference import decode

MEAN, STD = (0.1, -0.2, 0.3, 0.0), (1.5, 0.7, 1.1, 2.0)
UNET = {"channels": [8, 8], "norm_num_groups": 4, "num_res_blocks": 1}
TINY_VAE = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "latent_channels": 4, "channels": [4, 8, 8],
            "num_res_blocks": [1, 1, 1], "norm_num_groups": 4, "attention_levels": [False] * 3,
            "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vae_folder(root: Path, seed: int = 3) -> Path:
    """A GroupNorm AutoencoderKL with random weights in the project's VAE folder format."""
    torch.manual_seed(seed)
    network = build_vae("AutoencoderKL", TINY_VAE)
    return save_vae_dir(network, {"class_name": "AutoencoderKL", "kwargs": TINY_VAE}, root / f"vae{seed}")


def maisi_checkpoint(root: Path) -> Path:
    """A MAISI-architecture checkpoint (the released configuration) with random weights, as a .pt."""
    from latent.core.vae.loading import MAISI_CONFIG

    torch.manual_seed(7)
    path = root / "maisi_random.pt"
    torch.save(build_vae("AutoencoderKlMaisi", dict(MAISI_CONFIG)).state_dict(), path)
    return path


def vae_decode_in_full_units(spec: str, latent: torch.Tensor) -> torch.Tensor:
    """What the VAE's own ``decode`` gives for a standardised latent, in full-range units (unclipped)."""
    raw = latent * torch.tensor(STD).view(1, 4, 1, 1, 1) + torch.tensor(MEAN).view(1, 4, 1, 1, 1)
    return decode(load_vae(spec), raw) * VAE_TO_FULL_SCALE + VAE_TO_FULL_OFFSET


@pytest.mark.parametrize("which", ["standin", "group_norm_folder", "maisi_architecture"])
def test_exact_decoder_equals_the_vae_decode_at_initialisation(tmp_path, which):
    spec = {"standin": lambda: "standin", "group_norm_folder": lambda: str(tiny_vae_folder(tmp_path)),
            "maisi_architecture": lambda: str(maisi_checkpoint(tmp_path))}[which]()
    model = build_model({"family": "l2sct", **UNET, "vae": spec, "ct_latent_mean": MEAN, "ct_latent_std": STD})
    assert model.config.vae_decoder.class_name == load_vae(spec).class_name
    latent = torch.randn(1, 4, 2, 4, 6, generator=torch.Generator().manual_seed(0))
    expected = vae_decode_in_full_units(spec, latent)
    model.eval()
    # The trunk bypassed: the true CT latent goes straight into the decode path, whole-volume or training path.
    assert torch.allclose(model.decode_latent(latent, whole_volume=True), expected, atol=1e-5)
    assert torch.allclose(model.decode_latent(latent), expected, atol=1e-5)
    # translate = that decode of the trunk's latent, clipped to the full range.
    mr = torch.randn(1, 4, 2, 4, 6)
    with torch.no_grad():
        through = model.decode_latent(model._trunk(mr)).clamp(-1, 1)
    assert torch.allclose(model.translate(mr), through, atol=1e-5)
    # Gradients reach the decoder (fine-tuning) and the trunk.
    model.train()
    batch = {"mr_mu": mr, "ct_pixels": torch.zeros(1, 1, 8, 16, 24), "mask_pixels": torch.ones(1, 1, 8, 16, 24)}
    model(batch)["loss"].backward()
    assert all(p.grad is not None for p in model.vae_decode.parameters())


def test_saved_model_rebuilds_without_the_vae_and_keeps_its_provenance(tmp_path):
    folder = tiny_vae_folder(tmp_path)
    model = build_model({"family": "l2sct", **UNET, "vae": str(folder), "ct_latent_mean": MEAN, "ct_latent_std": STD})
    model.save_pretrained(tmp_path / "model")
    shutil.rmtree(folder)
    loaded = load_pretrained(tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["vae_decoder"]["weights_sha256"] == model.config.vae_decoder.weights_sha256
    assert saved["vae_decoder"]["source"].endswith("vae3") and saved["ct_latent_std"] == list(STD)
    mr = torch.randn(1, 4, 2, 4, 4)
    assert torch.equal(loaded.translate(mr), model.eval().translate(mr))


def test_channels_last_weights_train_like_contiguous_ones(tmp_path):
    """The default channels-last layout changes speed only: same loss and gradients to rounding,
    and the saved weights are plain contiguous tensors that load into either layout."""
    spec = str(tiny_vae_folder(tmp_path))
    models = {}
    for layout in (True, False):
        torch.manual_seed(0)
        models[layout] = build_model({"family": "l2sct", **UNET, "vae": spec, "ct_latent_mean": MEAN,
                                      "ct_latent_std": STD, "channels_last": layout})
    fast, plain = models[True], models[False]
    kernels = [p for p in fast.parameters() if p.dim() == 5]
    assert kernels and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in kernels)
    assert not all(p.is_contiguous() for p in kernels)
    assert all(p.is_contiguous() for p in plain.parameters())
    batch = {"mr_mu": torch.randn(2, 4, 2, 4, 4, generator=torch.Generator().manual_seed(1)),
             "ct_pixels": torch.rand(2, 1, 8, 16, 16) * 2 - 1, "mask_pixels": torch.ones(2, 1, 8, 16, 16)}
    losses = [model(batch)["loss"] for model in (fast, plain)]
    for loss in losses:
        loss.backward()
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    for (name, a), (_, b) in zip(fast.named_parameters(), plain.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name
    fast.save_pretrained(tmp_path / "model")
    assert all(t.is_contiguous() for t in fast.state_dict().values())
    mr = torch.randn(1, 4, 2, 4, 4)
    assert torch.allclose(load_pretrained(tmp_path / "model").translate(mr), plain.eval().translate(mr), atol=1e-5)


def test_for_producer_takes_the_cache_vae_and_statistics_and_refuses_another_vae(tmp_path):
    folder = tiny_vae_folder(tmp_path)
    sha = load_vae(str(folder)).weights_sha256
    producer = {"record": {"vae_location": {"path": str(folder), "name": "vae3"}, "vae_weights_sha256": sha},
                "latent_stats": {"ct_mu": {"mean": list(MEAN), "std": list(STD)}, "mr_mu": {"mean": [0] * 4, "std": [1] * 4}}}
    config = LatentToSCT.for_producer(LatentToSCT.config_class(**UNET), producer)
    assert (config.vae, config.vae_sha256, config.ct_latent_std) == (str(folder), sha, STD)
    assert isinstance(build_model(config), LatentToSCT)
    other = tiny_vae_folder(tmp_path, seed=4)
    with pytest.raises(BadConfigError, match=r"^model\.vae: .*vae4 has weights sha256"):
        build_model(config.model_copy(update={"vae": str(other)}))
    with pytest.raises(BadConfigError, match=r"^model\.vae: decoder: from_vae needs"):
        build_model({"family": "l2sct", **UNET})


def test_configs_of_earlier_runs_are_the_scratch_model():
    legacy = {"family": "l2sct", "trunk_channels": 8, "trunk_blocks": 1, "decoder_channels": [4, 8, 8],
              "norm_num_groups": 4}
    model = build_model(legacy)
    assert (model.config.decoder, model.config.trunk) == ("scratch", "resblocks") and hasattr(model, "decoder")
    assert build_model({"family": "l2sct", "decoder": "scratch", "decoder_channels": [4, 8, 8], "norm_num_groups": 4,
                        **UNET}).config.trunk == "unet"
    # New configs (recipes and saved models) name both and are the exact decoder with a UNet trunk.
    assert LatentToSCT.config_class(trunk_channels=8).trunk == "resblocks"
    assert (LatentToSCT.config_class().decoder, LatentToSCT.config_class().trunk) == ("from_vae", "unet")


def test_trunk_starts_from_an_l2l_regress_run(tmp_path):
    torch.manual_seed(1)
    regress = build_model({"family": "l2l_regress", **UNET})
    regress.save_pretrained(tmp_path / "run" / "best")
    folder = tiny_vae_folder(tmp_path)
    model = build_model({"family": "l2sct", **UNET, "vae": str(folder), "init_trunk_from": str(tmp_path / "run")})
    for key, value in regress.unet.state_dict().items():
        assert torch.equal(model.trunk.state_dict()[key], value), key
    assert model.config.init_trunk_from is None and model.config.trunk_initialised_from == str(tmp_path / "run")
    with pytest.raises(BadConfigError, match=r"^model\.channels: \[8, 16\] differs from \[8, 8\]"):
        build_model({"family": "l2sct", **UNET, "channels": [8, 16], "vae": str(folder),
                     "init_trunk_from": str(tmp_path / "run")})
    with pytest.raises(BadConfigError, match="not l2l_regress"):
        model.save_pretrained(tmp_path / "l2sct")
        build_model({"family": "l2sct", **UNET, "vae": str(folder), "init_trunk_from": str(tmp_path / "l2sct")})


def test_group_learning_rate_freezes_then_scales():
    group = {"frozen_steps": 3, "lr_scale": 0.1}
    assert [group_learning_rate(1.0, group, step) for step in (0, 2, 3, 9)] == [0.0, 0.0, pytest.approx(0.1),
                                                                               pytest.approx(0.1)]
    assert group_learning_rate(0.5, {}, 0) == 0.5


class PixelPairs(Dataset):
    """Random MR latents with a CT that is a blurred copy of their first channel, 4x upsampled."""

    def __init__(self, cases: int = 4) -> None:
        generator = torch.Generator().manual_seed(0)
        self.mr = torch.randn(cases, 4, 2, 4, 4, generator=generator)

    def __len__(self) -> int:
        return len(self.mr)

    def __getitem__(self, index: int) -> dict:
        pixels = self.mr[index, :1].repeat_interleave(4, 1).repeat_interleave(4, 2).repeat_interleave(4, 3)
        mask = (pixels > -0.5).float()
        return {"pid": f"c{index}", "mr_mu": self.mr[index], "ct_pixels": 0.3 * torch.tanh(pixels) * mask
                + AIR_VALUE * (1 - mask), "mask_pixels": mask}


def test_decoder_stays_frozen_for_its_steps_and_then_learns(tmp_path):
    folder = tiny_vae_folder(tmp_path)
    reference = load_vae(str(folder)).network.decoder.state_dict()

    def run(steps: int) -> LatentToSCT:
        config = parse_config({"model": {"family": "l2sct", **UNET, "vae": str(folder), "decoder_freeze_steps": 2,
                                         "decoder_lr_scale": 0.5, "lr": 1e-2},
                               "data": {"batch_size": 2}, "run_dir": str(tmp_path / f"run{steps}"),
                               "train": {"max_steps": steps, "checkpoint_every": 100, "val_every": None,
                                         "tensorboard": False}})
        return load_pretrained(train(config, train_dataset=PixelPairs(), quiet=True) / "final")

    frozen, tuned = run(2), run(3)
    assert all(torch.equal(v, reference[k]) for k, v in frozen.vae_decode.network.decoder.state_dict().items())
    assert any(not torch.equal(v, reference[k]) for k, v in tuned.vae_decode.network.decoder.state_dict().items())
    assert any(not torch.equal(v, tuned.trunk.state_dict()[k]) for k, v in frozen.trunk.state_dict().items())
