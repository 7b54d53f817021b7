"""Latent translation models: losses train, outputs have the right shape and space, save/load is exact."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from latent.core.intensity import FULL_CT_MAX_HU, FULL_CT_MIN_HU
from latent.translate.models.base import build_model, load_pretrained
from latent.translate.models.l2sct import AIR_VALUE, START_VALUE, LatentToSCT
from latent.translate.validation import predict

LATENT = 8  # latent edge: divisible by 2 for two-level UNets
BATCH = 2
UNET = {"channels": [8, 8], "norm_num_groups": 4, "num_res_blocks": 1}
CONFIGS = {
    "l2l_ddim": {"family": "l2l_ddim", **UNET, "num_inference_steps": 4, "lr": 3e-3},
    "l2l_ddim_rflow": {"family": "l2l_ddim", **UNET, "sampler": "rflow", "num_inference_steps": 4, "lr": 3e-3},
    "l2l_controlnet": {"family": "l2l_controlnet", **UNET, "num_inference_steps": 4, "lr": 3e-3},
    "l2l_regress": {"family": "l2l_regress", **UNET, "lr": 3e-3, "mask_loss": True},
    "l2sct": {"family": "l2sct", "trunk_channels": 8, "trunk_blocks": 1, "decoder_channels": [4, 8, 8],
              "norm_num_groups": 4, "lr": 3e-3},
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny nets gain nothing from threads; on a busy 2-core machine they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """A learnable MR -> CT mapping: CT latent = 0.5 x MR latent with channels reversed."""
    generator = torch.Generator().manual_seed(seed)
    mr = torch.randn(BATCH, 4, LATENT, LATENT, LATENT, generator=generator)
    pixels = mr[:, :1].repeat_interleave(4, 2).repeat_interleave(4, 3).repeat_interleave(4, 4)
    mask_pixels = (pixels > -1.0).float()
    return {"mr_mu": mr, "ct_mu": 0.5 * mr.flip(1), "mask_latent": (mr[:, :1] > -1.0).float(),
            "ct_pixels": torch.tanh(pixels) * mask_pixels + AIR_VALUE * (1 - mask_pixels), "mask_pixels": mask_pixels}


def make(name: str, **changes):
    torch.manual_seed(0)
    return build_model({**CONFIGS[name], **changes})


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_is_finite_and_decreases_on_a_fixed_batch(name):
    model = make(name)
    batch = toy_batch()
    optimizer = torch.optim.Adam(model.phase_parameters("main"), lr=model.config.lr)
    losses = []
    for _ in range(8):
        torch.manual_seed(1)  # same noise and timesteps every step: one fixed objective
        loss = model(batch)["loss"]
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("name", list(CONFIGS))
def test_translate_shape_space_and_save_load_round_trip(name, tmp_path):
    model = make(name).eval()
    inputs = toy_batch()["mr_mu"]
    output = model.translate(inputs, generator=torch.Generator().manual_seed(3))
    if model.output_space == "ct_full":
        assert output.shape == (BATCH, 1, 4 * LATENT, 4 * LATENT, 4 * LATENT)
        assert output.min() >= -1.0 and output.max() <= 1.0
    else:
        assert model.output_space == "ct_latent"
        assert output.shape == inputs.shape
    assert torch.isfinite(output).all()
    model.save_pretrained(tmp_path / "saved")
    loaded = load_pretrained(tmp_path / "saved")
    assert type(loaded) is type(model) and loaded.config == model.config
    again = loaded.translate(inputs, generator=torch.Generator().manual_seed(3))
    assert torch.equal(output, again)


@pytest.mark.parametrize("name", ["l2l_ddim", "l2l_ddim_rflow", "l2l_controlnet"])
def test_sampling_is_deterministic_given_the_generator(name):
    model = make(name, eta=0.0).eval()
    assert model.stochastic
    inputs = toy_batch()["mr_mu"][:1]
    same = torch.stack([model.translate(inputs, torch.Generator().manual_seed(7)) for _ in range(3)])
    assert same.std(0).max() == 0  # K agreeing samples: zero uncertainty
    different = torch.stack([model.translate(inputs, torch.Generator().manual_seed(s)) for s in range(3)])
    assert different.std(0).mean() > 1e-3
    assert torch.equal(predict(model, inputs, num_samples=2, seed=7),
                       0.5 * (same[0] + model.translate(inputs, torch.Generator().manual_seed(8))))


def test_ddim_with_eta_draws_its_step_noise_from_the_generator():
    model = make("l2l_ddim", eta=1.0).eval()
    inputs = toy_batch()["mr_mu"][:1]
    first = model.translate(inputs, torch.Generator().manual_seed(5))
    assert torch.equal(first, model.translate(inputs, torch.Generator().manual_seed(5)))
    deterministic = make("l2l_ddim", eta=0.0).eval().translate(inputs, torch.Generator().manual_seed(5))
    assert not torch.allclose(first, deterministic)


def test_diffusion_defaults_follow_the_design():
    config = make("l2l_ddim").config
    assert (config.prediction_type, config.schedule, config.beta_start, config.beta_end, config.sampler) == (
        "v_prediction", "scaled_linear_beta", 0.0015, 0.0195, "ddim")


@pytest.mark.parametrize("changes, field", [
    ({"channels": [6, 8]}, "channels"),
    ({"attention_levels": [False]}, "attention_levels"),
    ({"num_res_blocks": [1, 1, 1]}, "num_res_blocks"),
    ({"sampler": "rflow", "prediction_type": "epsilon"}, "prediction_type"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"chanels": [8, 8]}, "chanels"),
])
def test_bad_model_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        build_model({**CONFIGS["l2l_ddim"], **changes})


def test_latent_size_not_divisible_by_the_unet_is_a_clear_error():
    model = make("l2l_regress", channels=[8, 8, 8])
    with pytest.raises(ValueError, match="multiples of 4"):
        model.translate(torch.zeros(1, 4, 6, 8, 8))


def test_controlnet_stage_two_freezes_the_prior_and_trains_only_the_controlnet(tmp_path):
    prior = make("l2l_controlnet")
    prior_optimizer = torch.optim.Adam(prior.phase_parameters("main"), lr=1e-2)
    for _ in range(2):  # an untrained prior's zero output convolution would pass no gradient back
        prior_optimizer.zero_grad()
        prior(toy_batch())["loss"].backward()
        prior_optimizer.step()
    prior.save_pretrained(tmp_path / "prior")
    with pytest.raises(ValueError, match="prior_path"):
        build_model({**CONFIGS["l2l_controlnet"], "stage": "controlnet"})
    with pytest.raises(ValueError, match="channels"):
        build_model({**CONFIGS["l2l_controlnet"], "stage": "controlnet", "prior_path": str(tmp_path / "prior"),
                     "channels": [8, 16]})
    model = build_model({"family": "l2l_controlnet", "stage": "controlnet", "prior_path": str(tmp_path / "prior"),
                         "num_inference_steps": 4, "lr": 1e-2})
    assert model.config.channels == (8, 8) and model.config.prior_source == str(tmp_path / "prior")
    # ControlNet starts as a copy of the prior's encoder.
    assert torch.equal(model.controlnet.conv_in.conv.weight, prior.prior.conv_in.conv.weight)
    trainable = {id(p) for p in model.phase_parameters("main")}
    assert trainable == {id(p) for p in model.controlnet.parameters()}
    assert not any(p.requires_grad for p in model.prior.parameters())
    prior_before = {k: v.clone() for k, v in model.prior.state_dict().items()}
    control_before = {k: v.clone() for k, v in model.controlnet.state_dict().items()}
    optimizer = torch.optim.Adam(model.phase_parameters("main"), lr=model.config.lr)
    model.train()
    assert not model.prior.training
    for _ in range(3):
        loss = model(toy_batch())["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for key, value in model.prior.state_dict().items():
        assert torch.equal(value, prior_before[key]) and torch.equal(value, prior.prior.state_dict()[key])
    assert any(not torch.equal(v, control_before[k]) for k, v in model.controlnet.state_dict().items())
    # The saved stage-2 folder is self-contained: it loads after the prior folder is gone.
    model.save_pretrained(tmp_path / "stage2")
    for path in (tmp_path / "prior").iterdir():
        path.unlink()
    loaded = load_pretrained(tmp_path / "stage2")
    inputs = toy_batch()["mr_mu"][:1]
    assert torch.equal(loaded.translate(inputs, torch.Generator().manual_seed(1)),
                       model.eval().translate(inputs, torch.Generator().manual_seed(1)))


def test_l2sct_starts_near_water_and_learns_the_full_hu_range():
    for activation in ("linear", "tanh"):
        model = make("l2sct", output_activation=activation)
        output = model.translate(toy_batch()["mr_mu"])
        start_hu = (float(output.mean()) + 1) / 2 * (FULL_CT_MAX_HU - FULL_CT_MIN_HU) + FULL_CT_MIN_HU
        assert abs(start_hu) < 200, (activation, start_hu)
    assert START_VALUE == pytest.approx(-1 + 2 * 1024 / 4095)
    losses = make("l2sct")(toy_batch())
    assert set(losses) >= {"loss", "l1_body", "l1_background", "mae_hu_body"}


def test_l2sct_decoder_initialised_from_a_vae_folder(tmp_path):
    from monai.networks.nets import AutoencoderKL

    kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "latent_channels": 4, "channels": [4, 8, 8],
              "num_res_blocks": [1, 1, 1], "norm_num_groups": 4, "attention_levels": [False] * 3,
              "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False}
    torch.manual_seed(5)
    vae = AutoencoderKL(**kwargs)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"class_name": "AutoencoderKL", "kwargs": kwargs,
                                                              "layout": "zyx_lps"}))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(tmp_path / "vae" / "model.safetensors"))
    model = make("l2sct", init_decoder_from=str(tmp_path / "vae"), decoder_res_blocks=1)
    for key, value in model.decoder.state_dict().items():
        assert torch.equal(value, vae.decoder.state_dict()[key]), key
    assert model.config.init_decoder_from is None and model.config.decoder_initialised_from == str(tmp_path / "vae")
    # Decoder output in VAE units is mapped to the full range: VAE 0 -> -1000 HU, 1 -> +1000 HU.
    latent = torch.randn(1, 4, 4, 4, 4)
    raw = vae.decoder(latent)  # (our trunk stands in for post_quant_conv)
    model.save_pretrained(tmp_path / "l2sct")
    assert isinstance(load_pretrained(tmp_path / "l2sct"), LatentToSCT)
    model.trunk = torch.nn.Identity()
    full = model.translate(latent)
    hu = (full + 1) / 2 * (FULL_CT_MAX_HU - FULL_CT_MIN_HU) + FULL_CT_MIN_HU
    assert torch.allclose(hu, (raw * 2000 - 1000).clamp(FULL_CT_MIN_HU, FULL_CT_MAX_HU), atol=1e-2)
