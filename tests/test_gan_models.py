"""Pixel-space GAN baselines (Pix2Pix, CycleGAN, CUT): training steps, inference, persistence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from latent.translate.models.base import build_model, load_pretrained
from latent.translate.models.gan_common import (
    WATER_SIGNED,
    gather_stacks,
    make_inferer,
    sliding_window_translate,
    slicewise_translate,
)

#: Tiny networks: 2-level UNets with 4/8 channels, 2-scale discriminators of 1 and 2 layers.
TINY = {"channels": [4, 8], "disc_channels": 4, "disc_layers": 1, "disc_num_d": 2, "patch_size": [8, 16, 16],
        "slices_per_volume": 4, "patches_per_volume": 1, "inference_batch_size": 8}
CUT_TINY = {"nce_layers": [0, 1, 2], "nce_patches": 16, "nce_dim": 8}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny convolutions are dominated by thread hand-over: one thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(family: str, **overrides) -> dict:
    config = {"family": family, **TINY, **(CUT_TINY if family == "cut" else {})}
    return {**config, **overrides}


def phantom_batch(cases: int = 2, shape: tuple[int, int, int] = (8, 32, 32)) -> dict[str, torch.Tensor]:
    """A learnable MR/CT pair: ellipse body (MR 0.4, ~40 HU) around a dark-on-MR, bright-on-CT bone."""
    depth, height, width = shape
    z, y, x = torch.meshgrid(torch.arange(depth, dtype=torch.float32), torch.linspace(-1, 1, height), torch.linspace(-1, 1, width),
                             indexing="ij")
    body = ((x / 0.8) ** 2 + (y / 0.6) ** 2 < 1).float()
    bone = ((x - 0.2) ** 2 + y ** 2 < 0.06 + 0.005 * z).float() * body
    mr = 0.4 * body - 0.37 * bone + 0.6 * body * (x > 0.5).float()  # fat stripe bright on MR
    ct_hu = -1000 + 1040 * body - 140 * body * (x > 0.5).float() + 1160 * bone
    ct = (ct_hu + 1024) / 4095 * 2 - 1
    stack = lambda volume: volume[None, None].repeat(cases, 1, 1, 1, 1).float()  # noqa: E731
    return {"mr_pixels": stack(mr), "ct_pixels": stack(ct), "mask_pixels": stack(body)}


def train_steps(model, batch, steps: int, lr: float = 2e-3) -> list[dict[str, float]]:
    """The training loop's contract: per phase zero, forward, backward, step that phase's optimizer."""
    optimizers = {phase: torch.optim.Adam(model.phase_parameters(phase), lr=lr, betas=(0.5, 0.999))
                  for phase in model.phases}
    logs = []
    model.train()
    for _ in range(steps):
        for phase in model.phases:
            optimizers[phase].zero_grad()
            losses = model(batch, phase=phase)
            losses["loss"].backward()
            optimizers[phase].step()
            logs.append({f"{phase}/{k}": float(v.detach()) for k, v in losses.items()})
    return logs


@pytest.mark.parametrize("family,mode", [("pix2pix", "2d"), ("pix2pix", "2.5d"), ("pix2pix", "3d"),
                                         ("cyclegan", "2.5d"), ("cyclegan", "3d"), ("cut", "2d"), ("cut", "2.5d")])
def test_one_train_step_and_whole_volume_translate(family, mode):
    torch.manual_seed(0)
    model = build_model(tiny(family, mode=mode))
    assert model.input_key == "mr_pixels" and model.output_space == "ct_full"
    batch = phantom_batch()
    logs = train_steps(model, batch, steps=1)
    assert all(torch.isfinite(torch.tensor(value)) for log in logs for value in log.values())
    assert logs[0]["generator/loss"] > 0 and logs[1]["discriminator/loss"] > 0
    assert int(model.generator_steps) == 1
    model.eval()
    odd = batch["mr_pixels"][:1, :, :7, :30, :27]  # sizes not divisible by the UNet factor
    output = model.translate(odd)
    assert output.shape == odd.shape
    assert output.abs().max() <= 1.0 and torch.isfinite(output).all()


def test_phases_optimise_disjoint_complete_parameter_sets():
    for family in ("pix2pix", "cyclegan", "cut"):
        model = build_model(tiny(family, mode="2d"))
        generator = {id(p) for p in model.phase_parameters("generator")}
        discriminator = {id(p) for p in model.phase_parameters("discriminator")}
        assert model.phases == ("generator", "discriminator")
        assert not generator & discriminator
        assert generator | discriminator == {id(p) for p in model.parameters()}
        with pytest.raises(ValueError, match="unknown phase"):
            model(phantom_batch(1), phase="main")


def test_each_phase_backpropagates_only_into_its_own_parameters():
    torch.manual_seed(0)
    model = build_model(tiny("pix2pix", mode="2d"))
    batch = phantom_batch()
    model(batch, phase="generator")["loss"].backward()
    assert all(p.grad is None for p in model.discriminator.parameters())  # frozen during the G phase
    assert all(p.requires_grad for p in model.discriminator.parameters())  # and unfrozen after
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.generator.parameters())
    model.zero_grad(set_to_none=True)
    model(batch, phase="discriminator")["loss"].backward()
    assert all(p.grad is None for p in model.generator.parameters())  # fakes are detached
    assert any(p.grad is not None for p in model.discriminator.parameters())


def test_pix2pix_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    # slices_per_volume = all slices: every step sees the same views, so the trend is not noise.
    # Seeds 0-2 end at 0.45-0.56 of the first L1 with the full default loss (NGF, GAN, background).
    model = build_model(tiny("pix2pix", mode="2d", slices_per_volume=8))
    logs = train_steps(model, phantom_batch(1), steps=20, lr=1e-2)
    l1 = [log["generator/l1"] for log in logs if "generator/l1" in log]
    assert sum(l1[-3:]) / 3 < 0.75 * l1[0]


def test_fresh_generator_starts_at_water():
    torch.manual_seed(0)
    model = build_model(tiny("pix2pix", mode="2d")).eval()
    hu = (model.translate(phantom_batch(1)["mr_pixels"]) + 1) / 2 * 4095 - 1024
    assert hu.abs().max().item() < 1e-3  # a zero-centred tanh would start at +1023 HU
    assert WATER_SIGNED == pytest.approx(-0.5, abs=1e-3)


def test_pix2pix_warmup_learns_identity_and_counter_survives_state_dict():
    torch.manual_seed(0)
    config = tiny("pix2pix", mode="2d", warmup_steps=2, lambda_ngf=0.0)
    model = build_model(config)
    batch = phantom_batch()
    discriminator_before = [p.detach().clone() for p in model.discriminator.parameters()]
    logs = train_steps(model, batch, steps=2)
    # No GAN in warm-up: the discriminator's loss is 0 and Adam leaves it exactly unchanged.
    assert all(torch.equal(a, b) for a, b in zip(discriminator_before, model.discriminator.parameters()))
    logs += train_steps(model, batch, steps=1)
    assert [log.get("generator/warmup") for log in logs[::2]] == [1.0, 1.0, 0.0]
    assert [log["discriminator/loss"] for log in logs[1:4:2]] == [0.0, 0.0]
    assert logs[5]["discriminator/loss"] > 0
    assert "generator/gan" not in logs[0] and "generator/gan" in logs[4]
    assert int(model.generator_steps) == 3
    assert int(model.state_dict()["generator_steps"]) == 3
    resumed = build_model(config)
    resumed.load_state_dict(model.state_dict())
    assert int(resumed.generator_steps) == 3 and not resumed.in_warmup(int(resumed.generator_steps))
    # Warm-up target is the MR: the identity L1 of a network that copies its input is 0.
    copier = build_model(config)
    copier.generator.forward = lambda x: x.clamp(-1, 1)  # the MR itself, as the warm-up target
    assert copier(batch, phase="generator")["l1"].item() == 0.0


def test_save_and_load_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    for family, mode in [("pix2pix", "2.5d"), ("cut", "3d")]:
        model = build_model(tiny(family, mode=mode, context_slices=3))
        train_steps(model, phantom_batch(), steps=1)
        model.eval()
        inputs = phantom_batch(1)["mr_pixels"]
        folder = model.save_pretrained(tmp_path / family)
        loaded = load_pretrained(folder)
        assert type(loaded) is type(model) and loaded.config == model.config
        assert int(loaded.generator_steps) == 1
        assert torch.equal(loaded.translate(inputs), model.translate(inputs))


def test_2p5d_translate_keeps_the_exact_input_shape_and_pads_stacks_at_the_edges():
    torch.manual_seed(0)
    model = build_model(tiny("pix2pix", mode="2.5d", context_slices=5, channels=[4, 8, 8])).eval()
    inputs = torch.rand(2, 1, 5, 23, 37)
    assert model.translate(inputs).shape == inputs.shape
    volume = torch.arange(4.0).reshape(1, 1, 4, 1, 1).expand(1, 1, 4, 2, 2)
    stacks = gather_stacks(volume, torch.zeros(4, dtype=torch.long), torch.arange(4), depth=5)
    assert stacks[:, :, 0, 0].tolist() == [[0, 0, 0, 1, 2], [0, 0, 1, 2, 3], [0, 1, 2, 3, 3], [1, 2, 3, 3, 3]]
    # Slice-wise inference hands each slice's own stack to the network and keeps the chosen channel.
    centre = slicewise_translate(volume, lambda s: s, depth=5, batch_size=3, multiple=4, output_channel=2)
    assert torch.equal(centre, volume)


@pytest.mark.parametrize("overlap", [0.25, 0.5, 0.75])
def test_sliding_window_blend_of_a_constant_network_is_exactly_constant(overlap):
    volume = torch.randn(2, 1, 21, 37, 50)
    inferer = make_inferer((8, 16, 16), overlap=overlap, sw_batch_size=3)
    output = sliding_window_translate(volume, lambda patch: torch.full_like(patch, 0.3141), inferer)
    assert output.shape == volume.shape
    assert (output - 0.3141).abs().max().item() < 1e-6
    # And the windows really tile: an identity network reproduces the input.
    assert torch.allclose(sliding_window_translate(volume, lambda patch: patch, inferer), volume, atol=1e-5)


def test_unpaired_views_never_pair_a_case_with_its_own_aligned_ct():
    torch.manual_seed(0)
    model = build_model(tiny("cyclegan", mode="2d", slices_per_volume=6))
    cases, depth = 3, 8
    batch = phantom_batch(cases, (depth, 32, 32))
    # Encode (case, slice) in the intensities: MR = case * 10 + z, CT = -(case * 10 + z) / 100.
    code = (torch.arange(cases)[:, None] * 10 + torch.arange(depth)).float()[:, None, :, None, None]
    batch["mr_pixels"] = (code / 100).expand(-1, -1, -1, 32, 32).clone()
    batch["ct_pixels"] = (-code / 100).expand(-1, -1, -1, 32, 32).clone()
    views = model.sample_views(batch, paired=False)
    mr_code = torch.round((views["mr"][:, 0, 0, 0] + 1) / 2 * 100)
    ct_code = torch.round(-views["ct"][:, 0, 0, 0] * 100)
    assert torch.equal(ct_code // 10, (mr_code // 10 - 1) % cases)  # torch.roll by one case

    # One case per batch: different slices of that case.
    single = {key: value[:1] for key, value in batch.items()}
    for _ in range(5):
        views = model.sample_views(single, paired=False)
        mr_code = torch.round((views["mr"][:, 0, 0, 0] + 1) / 2 * 100)
        ct_code = torch.round(-views["ct"][:, 0, 0, 0] * 100)
        assert not (mr_code == ct_code).any()
    paired = model.sample_views(batch, paired=True)
    assert torch.equal(torch.round((paired["mr"][:, 0, 0, 0] + 1) / 2 * 100), torch.round(-paired["ct"][:, 0, 0, 0] * 100))


def test_cut_encoder_features_are_the_unet_down_path_activations():
    torch.manual_seed(0)
    model = build_model(tiny("cut", mode="2d", channels=[4, 8, 8], nce_layers=[0, 1, 2, 3]))
    captured = []
    blocks = model.generator.encoder_blocks()
    assert len(blocks) == 3
    hooks = [block.register_forward_hook(lambda _m, _i, out: captured.append(out)) for block in blocks]
    x = torch.randn(2, 1, 32, 32)
    model.generator(x)
    for hook in hooks:
        hook.remove()
    features = model.generator.encode(x, (0, 1, 2, 3))
    assert [f.shape[1] for f in features] == model.generator.encoder_channels == [1, 4, 8, 8]
    assert torch.equal(features[0], x)
    for feature, hooked in zip(features[1:], captured):
        assert torch.allclose(feature, hooked)


def test_bad_configs_fail_naming_the_field():
    with pytest.raises(ValidationError, match="context_slices"):
        build_model(tiny("pix2pix", mode="2.5d", context_slices=4))
    with pytest.raises(ValidationError, match="patch_size"):
        build_model(tiny("pix2pix", mode="3d", patch_size=[8, 17, 16]))
    with pytest.raises(ValidationError, match="nce_layers"):
        build_model(tiny("cut", nce_layers=[0, 5]))
    with pytest.raises(ValidationError, match="num_res_units"):
        build_model(tiny("cyclegan", num_res_units=0))
    with pytest.raises(ValidationError, match="disc_norm"):
        build_model(tiny("cut", disc_norm="LAYERNORM"))
    with pytest.raises(ValidationError, match="lambda_typo"):
        build_model(tiny("pix2pix", lambda_typo=1.0))
    model = build_model(tiny("pix2pix", mode="2d", disc_layers=3, disc_num_d=2))
    with pytest.raises(ValueError, match="disc_layers=3, disc_num_d=2"):
        model(phantom_batch(1), phase="generator")


@pytest.mark.parametrize("family", ["pix2pix", "cyclegan", "cut"])
def test_recipes_load_and_demo_models_build(family):
    from latent.translate.train import load_config  # here: the rest of this module needs no training stack

    configs = Path(__file__).resolve().parents[1] / "configs"
    for size in ("demo", "full"):
        config = load_config(configs / f"{family}_{size}.yaml")
        assert config.model.family == family and config.model.mode == "2.5d"
        assert not Path(config.run_dir).is_absolute()
    demo = build_model(load_config(configs / f"{family}_demo.yaml").model)
    assert demo.phases == ("generator", "discriminator") and demo.input_key == "mr_pixels"


def test_instance_normalised_discriminator_cannot_see_the_intensity_scale_an_unnormalised_one_can():
    """Why the unpaired recipes use disc_norm "none" (docs/models.md, "Unpaired baselines"): with
    instance norm, a view and the same view at 30 % contrast get nearly the same logits."""
    from latent.translate.models.gan_losses import build_discriminator, discriminator_logits

    torch.manual_seed(0)
    views = torch.rand(2, 3, 64, 64) * 2 - 1
    changes = {}
    for norm in ("INSTANCE", "none"):
        discriminator = build_discriminator(2, 3, channels=8, layers=2, num_d=2, norm=norm)
        with torch.no_grad():
            full, faint = (discriminator_logits(discriminator(x)) for x in (views, 0.3 * views))
        changes[norm] = max(float((a - b).abs().mean() / a.abs().mean()) for a, b in zip(full, faint))
    # A fresh unnormalised PatchGAN is positively homogeneous here: its logits change by 1 - 0.3 = 0.7.
    assert changes["INSTANCE"] < 0.1 < 0.5 < changes["none"]


def test_intensity_drift_reports_body_means_in_hu_and_the_copy_of_the_mr():
    from latent.translate.models.gan_losses import intensity_drift

    batch = phantom_batch(1, (4, 16, 16))
    mr, ct, mask = (batch[key][:, 0] for key in ("mr_pixels", "ct_pixels", "mask_pixels"))
    copy = intensity_drift(2 * mr - 1, 2 * mr - 1, mask, ct, mask)
    assert copy["fake_mr_corr"] == pytest.approx(1.0, abs=1e-5)
    real_hu = (ct[mask > 0] + 1) / 2 * 4095 - 1024
    assert copy["real_body_hu"] == pytest.approx(float(real_hu.mean()), rel=1e-5)
    water = intensity_drift(torch.full_like(ct, WATER_SIGNED), 2 * mr - 1, mask, ct, mask)
    assert water["fake_body_hu"] == pytest.approx(0.0, abs=0.5)
    assert float(water["fake_mr_corr"]) == 0.0  # a constant sCT: no linear relation
    truth = intensity_drift(ct, 2 * mr - 1, mask, ct, mask)
    assert -0.9 < float(truth["fake_mr_corr"]) < 0.9


@pytest.mark.parametrize("family", ["cyclegan", "cut"])
def test_unpaired_generators_log_their_intensity_drift(family):
    model = build_model(tiny(family, mode="2d", disc_norm="none"))
    logs = train_steps(model, phantom_batch(2, (4, 32, 32)), steps=1)
    generator_logs = logs[0]
    assert {"generator/fake_body_hu", "generator/real_body_hu", "generator/fake_mr_corr"} <= set(generator_logs)
    assert abs(generator_logs["generator/fake_body_hu"]) < 5.0  # a fresh generator outputs water
