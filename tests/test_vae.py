"""VAE stage: hub loading offline with SHA-256 checks, tiled posterior-mean encode/decode, fit.

Nothing is downloaded: a tiny random-weight checkpoint of the MAISI layout is planted in a
temporary hub cache laid out exactly as huggingface_hub lays it out, and loaded through the
real ``load_vae("maisi-ct", cache_dir=...)`` path with the registry entry overridden per test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from latent.core.vae.loading import (
    HUB_VAES,
    LAYOUT_CANONICAL,
    LAYOUT_MAISI,
    MAISI_CONFIG,
    LoadedVAE,
    VAEError,
    build_vae,
    load_vae,
    save_vae_dir,
)
from latent.core.training import latest_checkpoint
from latent.core.vae.fit import VAEFitConfig, fit_vae
from latent.core.vae.inference import decode, encode_mu, from_network_layout, to_network_layout

#: MAISI layout, tiny channels: seconds on CPU.
TINY_MAISI = {**MAISI_CONFIG, "num_channels": [8, 8, 16], "num_res_blocks": [1, 1, 1], "norm_num_groups": 4}
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"
TINY_FIT = {"channels": (8, 8, 16), "norm_num_groups": 4, "checkpoint_every": 2, "seed": 3, "final_eval_volumes": 1,
            "crop": None, "warmup_steps": 1}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny nets gain nothing from a second thread, and two OpenMP threads on a 2-core machine
    that runs anything else were ~4x slower than one here (busy-waiting barriers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_maisi(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_vae("AutoencoderKlMaisi", TINY_MAISI)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _plant_in_hub_cache(cache_dir: Path, repo_id: str, filename: str, payload: object) -> Path:
    """Write ``payload`` where hf_hub_download looks offline: snapshots/<commit>/<filename> + refs/main."""
    repo_folder = cache_dir / ("models--" + repo_id.replace("/", "--"))
    target = repo_folder / "snapshots" / FAKE_COMMIT / filename
    target.parent.mkdir(parents=True)
    torch.save(payload, target)
    (repo_folder / "refs").mkdir()
    (repo_folder / "refs" / "main").write_text(FAKE_COMMIT)
    return target


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline mode as a user sets it, plus huggingface_hub's import-time copy of it."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


def _registry_entry(name: str, sha256: str, revision: str | None = None) -> dict:
    entry = HUB_VAES[name]
    return {name: dataclasses.replace(entry, sha256=sha256, config=TINY_MAISI, revision=revision or entry.revision)}


def _assert_same_weights(network: nn.Module, state: dict) -> None:
    loaded = network.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("name", ["maisi-ct", "maisi-mr"])
def test_hub_spec_loads_from_offline_cache(tmp_path: Path, offline: None, name: str) -> None:
    entry = HUB_VAES[name]
    state = _tiny_maisi().state_dict()
    planted = _plant_in_hub_cache(tmp_path, entry.repo_id, entry.filename, state)
    # maisi-ct pins a commit (direct snapshot look-up); maisi-mr pins "main" (resolved via refs/main).
    revision = FAKE_COMMIT if entry.revision != "main" else "main"
    registry = _registry_entry(name, _sha256(planted), revision)

    vae = load_vae(name, cache_dir=str(tmp_path), registry=registry)

    _assert_same_weights(vae.network, state)
    assert not vae.network.training and not any(p.requires_grad for p in vae.network.parameters())
    assert vae.name == name and vae.layout == LAYOUT_MAISI and vae.downsample_factor == 4
    info = vae.producer_info()
    assert info["weights_sha256"] == _sha256(planted)
    assert info["config"]["num_channels"] == [8, 8, 16] and "num_splits" not in info["config"]
    json.dumps(info)
    # the shared registry is untouched by the override
    assert HUB_VAES[name].sha256 == entry.sha256 and HUB_VAES[name].config["num_channels"] == [64, 128, 256]


def test_sha256_mismatch_is_refused_before_loading(tmp_path: Path, offline: None) -> None:
    entry = HUB_VAES["maisi-ct"]
    planted = _plant_in_hub_cache(tmp_path, entry.repo_id, entry.filename, {})
    planted.write_bytes(b"not a torch file at all")  # torch.load would fail differently
    registry = _registry_entry("maisi-ct", "0" * 64, FAKE_COMMIT)
    with pytest.raises(VAEError) as info:
        load_vae("maisi-ct", cache_dir=str(tmp_path), registry=registry)
    message = str(info.value)
    assert "SHA-256 mismatch" in message and "expected " + "0" * 64 in message
    assert f"got {_sha256(planted)}" in message and "--vae" in message and "delete" in message
    assert "\n" not in message


def test_weights_not_in_cache_give_a_helpful_error(tmp_path: Path, offline: None) -> None:
    with pytest.raises(VAEError) as info:
        load_vae("maisi-ct", cache_dir=str(tmp_path / "empty"))
    message = str(info.value)
    assert "nvidia/NV-Generate-CT" in message and "not in" in message
    assert "hf download nvidia/NV-Generate-CT models/autoencoder_v1.pt" in message
    assert "--vae /path/to/autoencoder_v1.pt" in message and "\n" not in message


def test_unknown_spec_and_unreadable_file_are_refused(tmp_path: Path) -> None:
    with pytest.raises(VAEError, match="does not exist.*maisi-ct"):
        load_vae(str(tmp_path / "nowhere.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(VAEError, match="cannot read VAE weights") as info:
        load_vae(str(garbage), config=TINY_MAISI)
    assert "\n" not in str(info.value)


def test_wrapped_legacy_checkpoint_loads_from_local_file(tmp_path: Path) -> None:
    state = _tiny_maisi(seed=1).state_dict()
    legacy = {}
    for key, value in state.items():
        for suffix in (".weight", ".bias"):
            if key.endswith(f"conv.conv{suffix}"):
                key = key[: -len(f".conv{suffix}")] + suffix  # ...conv.conv.weight -> ...conv.weight
        legacy[key] = value
    assert len(set(legacy) - set(state)) > 20  # the fixture really uses the old layout
    path = tmp_path / "autoencoder_old.pt"
    torch.save({"unet_state_dict": legacy}, path)

    vae = load_vae(str(path), config=TINY_MAISI)

    _assert_same_weights(vae.network, state)
    assert vae.weights_sha256 == _sha256(path) and vae.name == f"maisi-local-{_sha256(path)[:12]}"
    # a local copy of a registered file is named after the registry entry
    registered = {"maisi-ct": dataclasses.replace(HUB_VAES["maisi-ct"], sha256=_sha256(path))}
    assert load_vae(str(path), config=TINY_MAISI, registry=registered).name == "maisi-ct"


def test_checkpoint_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(_tiny_maisi().state_dict(), path)
    with pytest.raises(VAEError, match="does not match"):
        load_vae(str(path), config={**TINY_MAISI, "num_channels": [8, 16, 16]})
    with pytest.raises(VAEError, match="does not match.*missing keys"):
        load_vae(str(path), config={**TINY_MAISI, "num_res_blocks": [2, 1, 1]})


def test_released_maisi_architecture_matches_the_published_size() -> None:
    network = build_vae("AutoencoderKlMaisi", MAISI_CONFIG)
    count = sum(p.numel() for p in network.parameters())
    assert abs(count - 20.9e6) / 20.9e6 < 0.02, count
    state = network.state_dict()
    assert state["encoder.blocks.0.conv.conv.weight"].shape == (64, 1, 3, 3, 3)
    assert state["quant_conv_mu.conv.weight"].shape == (4, 4, 1, 1, 1)
    assert "decoder.blocks.0.conv.conv.weight" in state and "post_quant_conv.conv.bias" in state
    assert network.encoder.blocks[0].num_splits == 1  # runtime choice, not part of the config


def test_save_vae_dir_round_trip(tmp_path: Path) -> None:
    from monai.networks.nets import AutoencoderKL

    kwargs = dict(
        spatial_dims=3, channels=[8, 8, 16], latent_channels=4, num_res_blocks=[1, 1, 1], norm_num_groups=4,
        attention_levels=[False] * 3, with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False,
        include_fc=False,
    )  # fmt: skip
    torch.manual_seed(2)
    model = AutoencoderKL(**kwargs)
    out = tmp_path / "vae"
    save_vae_dir(model, {"class_name": "AutoencoderKL", "kwargs": kwargs}, out)
    save_vae_dir(model, {"class_name": "AutoencoderKL", "kwargs": kwargs, "name": "mine"}, out)  # overwrite
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["vae"]

    vae = load_vae(str(out))
    _assert_same_weights(vae.network, model.state_dict())
    assert vae.name == "mine" and vae.layout == LAYOUT_CANONICAL and vae.class_name == "AutoencoderKL"
    assert vae.producer_info()["weights_sha256"] == _sha256(out / "model.safetensors")
    with pytest.raises(VAEError, match="does not match the model class"):
        save_vae_dir(model, {"class_name": "AutoencoderKlMaisi", "kwargs": kwargs}, tmp_path / "other")


# --------------------------------------------------------------------------- inference


class _PoolingVAE(nn.Module):
    """Exactly local stand-in: encode = 4x4x4 mean, decode = nearest x4 (no borders, no norm)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = nn.functional.avg_pool3d(x, 4) * self.scale
        return torch.cat([mu, -mu], dim=1), torch.ones_like(mu)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(z[:, :1], scale_factor=4, mode="nearest")


def _loaded(network: nn.Module, layout: str, channels=(8, 8, 16), latent_channels=4) -> LoadedVAE:
    config = {"num_channels": list(channels), "latent_channels": latent_channels}
    return LoadedVAE(network, "test", type(network).__name__, config, "0" * 64, layout)


def _smooth_volume(shape, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, *(s // 4 for s in shape), generator=generator)
    return nn.functional.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=False)


@pytest.mark.parametrize("layout", [LAYOUT_CANONICAL, LAYOUT_MAISI])
def test_tiling_lands_windows_on_whole_latent_voxels(layout: str) -> None:
    vae = _loaded(_PoolingVAE(), layout, latent_channels=2)
    volume = torch.rand(2, 1, 40, 72, 56, generator=torch.Generator().manual_seed(0))
    whole = encode_mu(vae, volume)
    assert whole.shape == (2, 2, 10, 18, 14)
    for tile, overlap in [((16, 32, 24), 0.3), ((32, 32, 32), 0.5), ((8, 64, 16), 0.25)]:
        # a misplaced window would average the wrong voxels: exact agreement proves alignment
        torch.testing.assert_close(encode_mu(vae, volume, tile, overlap), whole, rtol=0, atol=1e-6)
        torch.testing.assert_close(decode(vae, whole, tile, overlap), decode(vae, whole), rtol=0, atol=1e-6)
    torch.testing.assert_close(whole[:, 0], nn.functional.avg_pool3d(volume, 4)[:, 0], rtol=0, atol=1e-6)


def test_layout_conversion_is_exact_and_reaches_the_network() -> None:
    volume = torch.rand(1, 1, 8, 12, 16)
    converted = to_network_layout(volume, LAYOUT_MAISI)
    assert converted.shape == (1, 1, 16, 12, 8)
    # canonical index (z, y, x) -> network (nx-1-x, ny-1-y, z)
    assert converted[0, 0, 16 - 1 - 3, 12 - 1 - 5, 2] == volume[0, 0, 2, 5, 3]
    torch.testing.assert_close(from_network_layout(converted, LAYOUT_MAISI), volume, rtol=0, atol=0)

    network = _tiny_maisi()
    volume = _smooth_volume((16, 32, 24))
    z_mu = encode_mu(_loaded(network, LAYOUT_MAISI), volume)
    with torch.no_grad():
        direct = network.encode(to_network_layout(volume, LAYOUT_MAISI))[0]
    assert z_mu.shape == (1, 4, 4, 8, 6)
    torch.testing.assert_close(z_mu, from_network_layout(direct, LAYOUT_MAISI))


def test_encode_is_the_deterministic_posterior_mean_and_decode_inverts_shapes() -> None:
    network = _tiny_maisi()
    vae = _loaded(network, LAYOUT_CANONICAL)
    volume = _smooth_volume((32, 32, 32))
    z_mu = encode_mu(vae, volume)
    with torch.no_grad():
        expected = network.encode(volume)[0]
    torch.testing.assert_close(z_mu, expected, rtol=0, atol=0)
    torch.testing.assert_close(encode_mu(vae, volume), z_mu, rtol=0, atol=0)
    image = decode(vae, z_mu)
    assert image.shape == (1, 1, 32, 32, 32) and image.dtype == torch.float32
    # a window at least as large as the volume is one untiled pass
    torch.testing.assert_close(encode_mu(vae, volume, (64, 64, 64)), z_mu, rtol=0, atol=0)
    z_bf16 = encode_mu(vae, volume, bf16=True)
    assert z_bf16.dtype == torch.float32 and float((z_bf16 - z_mu).norm() / z_mu.norm()) < 0.05
    with pytest.raises(ValueError, match="multiples of 4"):
        encode_mu(vae, volume[..., :30])
    with pytest.raises(ValueError, match="tile"):
        encode_mu(vae, volume, (30, 32, 32))


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_seam_error_against_an_untiled_pass() -> None:
    """32x64x64 volume, 32^3 windows at overlap 0.5: blending is near-exact, GroupNorm dominates.

    Measured here (random tiny MAISI): encode ~0.3 relative L2 error with GroupNorm and ~0.02
    with the norms removed; decode ~0.5 (8^3 latent windows). A random network is a worst case:
    its GroupNorm statistics differ more between windows than a trained one's.
    """
    network = _tiny_maisi()
    vae = _loaded(network, LAYOUT_CANONICAL)
    volume = _smooth_volume((32, 64, 64), seed=1)
    z_whole = encode_mu(vae, volume)
    encode_error = _relative_error(encode_mu(vae, volume, (32, 32, 32), 0.5), z_whole)
    decode_error = _relative_error(decode(vae, z_whole, (32, 32, 32), 0.5), decode(vae, z_whole))
    assert 0 < encode_error < 0.5 and 0 < decode_error < 0.8, (encode_error, decode_error)

    for parent in list(network.modules()):  # same weights, no per-window statistics
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(parent, child_name, nn.Identity())
    z_whole = encode_mu(vae, volume)
    assert _relative_error(encode_mu(vae, volume, (32, 32, 32), 0.5), z_whole) < 0.05


# --------------------------------------------------------------------------- fit


def test_fit_config_errors_name_the_field() -> None:
    with pytest.raises(ValidationError, match="learning_rate"):
        VAEFitConfig(learning_rate=1e-3)
    with pytest.raises(ValidationError, match="norm_num_groups"):
        VAEFitConfig(channels=(16, 32, 48), norm_num_groups=32, norm="group")
    VAEFitConfig(channels=(16, 32, 48), norm_num_groups=32, norm="none")  # no GroupNorm, nothing to divide
    with pytest.raises(ValidationError, match="max_steps and time_budget_s"):
        VAEFitConfig(max_steps=None)
    with pytest.raises(ValidationError, match="kl_weight"):
        VAEFitConfig.model_validate({"kl_weight": -1})


def _fit_volumes() -> list[np.ndarray]:
    shapes = [(16, 32, 32), (16, 32, 32), (8, 32, 24)]
    return [_smooth_volume(shape, seed=i)[0, 0].numpy() for i, shape in enumerate(shapes)]


def test_fit_resume_matches_an_uninterrupted_run_and_loads(tmp_path: Path) -> None:
    volumes = _fit_volumes()
    straight = fit_vae(volumes, tmp_path / "straight", VAEFitConfig(max_steps=4, **TINY_FIT), quiet=True)
    fit_vae(volumes, tmp_path / "split", VAEFitConfig(max_steps=2, **TINY_FIT), quiet=True)
    with pytest.raises(FileExistsError, match="resume"):
        fit_vae(volumes, tmp_path / "split", VAEFitConfig(max_steps=4, **TINY_FIT), quiet=True)
    split = fit_vae(volumes, tmp_path / "split", VAEFitConfig(max_steps=4, **TINY_FIT), resume=True, quiet=True)

    a, b = load_vae(str(straight)), load_vae(str(split))
    _assert_same_weights(b.network, a.network.state_dict())
    report = json.loads((split / "fit_config.json").read_text())
    assert report["steps"] == 4 and len(report["loss_history"]) == 4 and report["final_l1_mean"] > 0
    state = json.loads((latest_checkpoint(split) / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["extra"]["history"] == report["loss_history"]
    # the shared loop's log: a loss record every log_every (10) steps and at the end of each call
    records = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "l1" in r] == [2, 4]
    # quant_conv_log_sigma starts near -6 (small posterior variance) and four steps barely move it
    assert float(a.network.quant_conv_log_sigma.conv.bias.max()) < -5.9
    z_mu = encode_mu(a, torch.from_numpy(volumes[2])[None, None])
    assert z_mu.shape == (1, 4, 2, 8, 6)
    assert decode(a, z_mu).shape == (1, 1, 8, 32, 24)
    with pytest.raises(ValueError, match="another architecture"):
        fit_vae(volumes, split, VAEFitConfig(max_steps=5, **{**TINY_FIT, "channels": (8, 16, 16)}), resume=True)


def test_fit_with_time_budget_and_adversarial_loss(tmp_path: Path) -> None:
    volumes = _fit_volumes()[:2]  # 16 x 32 x 32
    with pytest.raises(ValueError, match="discriminator_layers=3 needs every volume side >= 32"):
        fit_vae(volumes, tmp_path / "deep", VAEFitConfig(max_steps=1, adversarial=True, **TINY_FIT))
    settings = {**TINY_FIT, "final_eval_volumes": 0}
    config = VAEFitConfig(max_steps=None, time_budget_s=2.0, adversarial=True, discriminator_layers=2, **settings)
    out = fit_vae(volumes, tmp_path / "adv", config, quiet=True)
    report = json.loads((out / "fit_config.json").read_text())
    assert report["steps"] >= 1 and report["final_l1_mean"] is None
    assert load_vae(str(out)).class_name == "AutoencoderKL"
    with pytest.raises(ValueError, match="multiple of 4"):
        fit_vae([np.zeros((10, 32, 32), np.float32)], tmp_path / "bad", VAEFitConfig(max_steps=1, **TINY_FIT))


def test_crop_trained_vae_always_runs_with_its_training_window(tmp_path: Path) -> None:
    volumes = [_smooth_volume((8, 32, 24), seed=i)[0, 0].numpy() for i in range(2)]
    config = VAEFitConfig(max_steps=2, **{**TINY_FIT, "crop": (8, 16, 16), "norm": "group"})
    out = fit_vae(volumes, tmp_path / "crop", config, quiet=True)
    vae = load_vae(str(out))
    assert vae.inference_tile == (8, 16, 16) and vae.producer_info()["inference_tile"] == [8, 16, 16]
    x = torch.from_numpy(volumes[0])[None, None]
    default = encode_mu(vae, x)
    torch.testing.assert_close(default, encode_mu(vae, x, (8, 16, 16)), rtol=0, atol=0)
    assert _relative_error(encode_mu(vae, x, (8, 32, 24)), default) > 1e-3  # one pass differs
    torch.testing.assert_close(decode(vae, default), decode(vae, default, (8, 16, 16)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="crop .* is larger than volume"):
        fit_vae(volumes, tmp_path / "big", VAEFitConfig(max_steps=1, **{**TINY_FIT, "crop": (32, 32, 32)}))
    with pytest.raises(ValidationError, match="crop"):
        VAEFitConfig(crop=(8, 18, 16))


def test_norm_free_vae_is_fully_convolutional_and_needs_no_window(tmp_path: Path) -> None:
    """Without GroupNorm the encoding of a voxel does not depend on the volume around it (away from
    the borders), so the VAE runs on any shape and a crop's latent is the whole volume's latent."""
    volumes = [_smooth_volume((16, 32, 32), seed=i)[0, 0].numpy() for i in range(2)]
    out = fit_vae(volumes, tmp_path / "free", VAEFitConfig(max_steps=2, **{**TINY_FIT, "crop": (8, 16, 16)}), quiet=True)
    vae = load_vae(str(out))
    assert vae.norm == "none" and vae.inference_tile is None and vae.producer_info()["norm"] == "none"
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in vae.network.modules())
    x = torch.from_numpy(_smooth_volume((8, 16, 128), seed=5)[0, 0].numpy())[None, None]
    whole = encode_mu(vae, x)
    part = encode_mu(vae, x[..., :64])  # the left half in x
    # latent voxels farther from the cut than the encoder's receptive field agree
    torch.testing.assert_close(part[..., :2], whole[..., :2], rtol=1e-4, atol=1e-5)
    assert _relative_error(part[..., -1:], whole[..., 15:16]) > 1e-3  # at the cut they do not


def test_fit_keeps_the_ema_weights_with_the_lowest_validation_hu_error(tmp_path: Path) -> None:
    volumes = _fit_volumes()[:2]
    masks = [np.ones(v.shape, np.uint8) for v in volumes]
    config = VAEFitConfig(max_steps=4, val_every=2, **TINY_FIT)
    out = fit_vae(volumes, tmp_path / "val", config, masks=masks, val_ct=volumes[:1], val_masks=masks[:1], quiet=True)
    report = json.loads((out / "fit_config.json").read_text())
    history = dict((step, mae) for step, mae in report["val_history"])
    assert sorted(history) == [2, 4]
    best_step = min(history, key=history.get)
    assert report["selected_step"] == best_step and report["selected_by"].startswith("validation CT MAE in HU")
    from latent.core.vae.fit import validation_mae_hu

    kept = load_vae(str(out))
    assert validation_mae_hu(kept, volumes[:1], [m > 0 for m in masks[:1]]) == pytest.approx(history[best_step], abs=1e-2)
    state = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    assert state["best_step"] == best_step
    logged = [(r["step"], r["val/mae"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "val/mae" in r]
    assert [step for step, _ in logged] == [2, 4]


def test_hub_weights_come_from_the_local_cache_without_any_request(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("the hub was contacted although the file is in the local cache")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    entry = HUB_VAES["maisi-ct"]
    planted = _plant_in_hub_cache(tmp_path, entry.repo_id, entry.filename, {})
    registry = _registry_entry("maisi-ct", _sha256(planted), FAKE_COMMIT)
    with pytest.raises(VAEError, match="does not match|cannot|missing"):  # found and read (an empty state)
        load_vae("maisi-ct", cache_dir=str(tmp_path), registry=registry)


def test_without_network_the_hub_is_tried_once_then_one_line(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub

    calls = {"metadata": 0, "download": 0}

    def unreachable(*args, **kwargs):
        calls["metadata"] += 1
        raise OSError("[Errno 101] Network is unreachable")

    def download(*args, **kwargs):
        calls["download"] += 1
        raise AssertionError("downloaded although the metadata request failed")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with pytest.raises(VAEError) as info:
        load_vae("maisi-ct", cache_dir=str(tmp_path / "empty"))
    assert calls == {"metadata": 1, "download": 0}
    message = str(info.value)
    assert "could not be downloaded (OSError)" in message and "hf download" in message and "\n" not in message
