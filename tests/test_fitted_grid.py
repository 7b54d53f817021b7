"""Fitted canonical grids (issue: never cut the body off): whole bodies in, whole bodies out.

A fitted grid fixes spacing and orientation; each case gets the shape that covers its body. A
fixed grid that cuts a body is refused in one line naming the mm missing, unless truncation is
allowed. Latent models trained on crops of fitted cases translate whole cases in sliding windows.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from latent.decode.grid_floor import grid_floor_sct
from latent.core.cases import discover_cases, make_splits, save_splits
from latent.core.errors import BadConfigError
from latent.core.grid import CanonicalGrid, body_extent_mm, parse_grid_spec, plan_mapping
from latent.core.intensity import AIR_HU
from latent.core.io import VolumeProperties, read_volume, write_volume
from latent.core.prepare import TruncationError, prepare_case
from test_predict_run import LATENT_UNET, _save_tiny_vae
from latent.translate.models.base import ModelConfig, TranslationModel, build_model
from latent.translate.train import parse_config, train

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
#: A body 110 slices x 5 mm = 550 mm long: longer than any preset's field of view (<= 288 mm).
LONG_SLICES, LONG_SPACING = 110, (10.0, 10.0, 5.0)


def _write_long_case(root: Path, pid: str = "1ABA001") -> Path:
    """A SynthRAD-layout case whose body (an elliptic cylinder with a bone rod) runs the whole length."""
    z, y, x = np.mgrid[0:LONG_SLICES, 0:24, 0:28]
    mask = ((((y - 11.5) / 9.5) ** 2 + ((x - 13.5) / 11.5) ** 2) <= 1).astype(np.uint8)
    ct = np.where(mask > 0, 40.0 + 3.0 * np.sin(z / 7.0), -1000.0).astype(np.float32)
    ct[((y - 14) ** 2 + (x - 13) ** 2) <= 4] = 900.0  # a bone rod along z
    mr = np.where(mask > 0, 300.0 + 0.2 * ct, 0.0).astype(np.float32)
    properties = VolumeProperties(LONG_SPACING, (-140.0, -120.0, -275.0), IDENTITY, (28, 24, LONG_SLICES), "float32")
    folder = root / "Task1" / "AB" / pid
    for name, array in (("mr", mr), ("ct", ct), ("mask", mask)):
        write_volume(folder / f"{name}.mha", array, properties)
    return root


def test_a_body_longer_than_every_preset_is_encoded_whole_and_restored_whole(tmp_path: Path) -> None:
    from latent.app.encode_run import encode_dataset
    from latent.core.vae.loading import load_vae
    from latent.cache import LatentCache, pick_producer

    data = _write_long_case(tmp_path / "data")
    case = discover_cases(data)[0]
    grid = parse_grid_spec("10x10x6:fit")
    prepared = prepare_case(case, grid)
    assert prepared.mapping.mask_fraction_outside == 0.0
    assert prepared.mapping.canonical.shape[0] * 6.0 >= LONG_SLICES * 5.0  # 550 mm held whole
    vae = load_vae(str(_save_tiny_vae(tmp_path / "vae", seed=0)))
    report = encode_dataset(data, tmp_path / "cache.zarr", vae, "10x10x6:fit", quiet=True)
    assert report.encoded == [case.pid] and not report.truncated
    key, record = pick_producer(tmp_path / "cache.zarr", "auto", option="--producer")
    assert record["grid"]["shape"] is None  # the producer records the rule, the case its own shape
    cache = LatentCache.open(tmp_path / "cache.zarr", key)
    canonical = cache.case_attrs(case.pid)["geometry"]["canonical"]["shape"]
    assert list(cache.read_case(case.pid, ["mr_mu"])["mr_mu"].shape[1:]) == [s // 4 for s in canonical]
    sct, properties = grid_floor_sct(case, grid)  # canonical and back: every body voxel is restored
    ct, _ = read_volume(case.ct)
    body = read_volume(case.mask)[0] > 0
    assert properties.size == (28, 24, LONG_SLICES)
    assert (sct[body] > -500).all() and np.all(sct[~body] == AIR_HU)
    soft = body & (ct < 500)  # z is resampled 5 -> 6 mm: soft tissue survives within a few HU
    assert np.abs(sct[soft] - ct[soft]).mean() < 5.0


def test_a_fixed_grid_that_cuts_the_body_is_refused_in_one_line_or_kept_with_a_warning(tmp_path, caplog) -> None:
    from latent.app.encode_run import encode_dataset
    from latent.core.vae.loading import load_vae

    data = _write_long_case(tmp_path / "data")
    case = discover_cases(data)[0]
    short = parse_grid_spec("10x10x6:32x32x32")  # 192 mm of a 550 mm body
    with pytest.raises(TruncationError) as caught:
        prepare_case(case, short)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{case.pid}: ") and "358 mm missing in z" in message
    with caplog.at_level(logging.WARNING):
        prepared = prepare_case(case, short, allow_truncation=True)
    assert 0.6 < prepared.mapping.mask_fraction_outside < 0.7 and "truncation is allowed" in caplog.text
    vae = load_vae(str(_save_tiny_vae(tmp_path / "vae", seed=0)))
    refused = encode_dataset(data, tmp_path / "a.zarr", vae, short.spec(), quiet=True)
    assert list(refused.failures) == [case.pid] and not refused.encoded
    kept = encode_dataset(data, tmp_path / "b.zarr", vae, short.spec(), allow_truncation=True, quiet=True)
    assert kept.encoded == [case.pid] and kept.truncated[case.pid] == pytest.approx(
        prepared.mapping.mask_fraction_outside)
    manifest = json.loads(kept.manifest.read_text())
    assert manifest["body_outside_fraction"] == {case.pid: kept.truncated[case.pid]}


@pytest.mark.parametrize("seed", range(5))
def test_fitted_shapes_cover_the_body_at_little_more_than_its_box(seed: int) -> None:
    rng = np.random.default_rng(seed)
    size = tuple(int(v) for v in rng.integers([60, 150, 150], [130, 400, 450]))  # (z, y, x) at 1 x 1 x 3 mm
    mask = np.zeros(size, np.uint8)
    low = [int(rng.integers(0, 5)) for _ in size]
    mask[low[0]:size[0] - 2, low[1]:size[1] - 3, low[2]:size[2] - 1] = 1
    properties = VolumeProperties((1.0, 1.0, 3.0), (0.0, 0.0, 0.0), IDENTITY, size[::-1], "float32")
    for spacing in (1.0, 1.5, 2.0):
        mapping = plan_mapping(mask, properties, CanonicalGrid((spacing, spacing, 3.0), None, 4))
        assert mapping.mask_fraction_outside == 0.0
        box = np.prod(body_extent_mm(mask, properties) / np.array([spacing, spacing, 3.0]))
        assert np.prod(mapping.canonical.shape) / box <= 1.1
        assert all(s % 4 == 0 for s in mapping.canonical.shape)


def _tiny(family: str, **window) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "l2sct":
        config = {"family": "l2sct", "trunk_channels": 8, "trunk_blocks": 1, "decoder_channels": [4, 8, 8],
                  "norm_num_groups": 4}
    else:
        config = {"family": "l2l_regress", **LATENT_UNET}
    model = build_model({**config, **window}).eval()
    with torch.no_grad():  # random weights everywhere (output layers start at zero)
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(parameter.numel())))
    return model


class _Pointwise(TranslationModel):
    """A voxel-wise network (1 x 1 x 1 convolutions), optionally followed by 4x nearest upsampling
    like l2sct's latent -> pixel output: windows can then reproduce one pass exactly."""

    def __init__(self, config: ModelConfig, up: int = 1) -> None:
        super().__init__(config)
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv3d(4, 8, 1), torch.nn.Tanh(), torch.nn.Conv3d(8, 2, 1))
        self.up = up

    def translate(self, inputs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        output = self.net(inputs)
        return torch.nn.functional.interpolate(output, scale_factor=self.up) if self.up > 1 else output


@pytest.mark.parametrize("up", [1, 4])
@pytest.mark.parametrize("shape", [(20, 28, 36), (6, 28, 9)])
def test_sliding_windows_are_placed_blended_and_scaled_exactly(up: int, shape: tuple[int, int, int]) -> None:
    """Windows that do not divide the case, overlap, gaussian weights, an output 4x finer, and a
    case thinner than the window (padded with its edge, cropped back): a voxel-wise model gives
    exactly its one pass, so every window sits where it belongs and the weights sum to one."""
    inputs = torch.randn(1, 4, *shape, generator=torch.Generator().manual_seed(1))
    model = _Pointwise(ModelConfig(family="pointwise"), up)
    with torch.no_grad():
        whole = model.translate(inputs)
        model.config = ModelConfig(family="pointwise", window=(8, 16, 12), window_overlap=0.5)
        windowed = model.translate_volume(inputs)
    assert windowed.shape == whole.shape == (1, 2, *(s * up for s in shape))
    torch.testing.assert_close(windowed, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["l2l_regress", "l2sct"])
def test_sliding_window_translation_of_a_family_stays_close_to_one_pass(family: str) -> None:
    """Random weights, a smooth latent-like input of 24 x 32 x 32, windows of 16^3, overlap 0.5.
    A window of the whole case is the one pass exactly. Smaller windows differ through the
    networks' GroupNorm (statistics per window) and their receptive field; the stated tolerance is
    a relative L2 of 0.5 (measured 0.29 for l2sct, 0.40 for l2l_regress). Models trained on crops
    of fitted cases saw window statistics in training, which is why inference uses windows."""
    noise = torch.randn(1, 4, 24, 32, 32, generator=torch.Generator().manual_seed(1))
    inputs = 3 * torch.nn.functional.avg_pool3d(torch.nn.functional.pad(noise, (2,) * 6, mode="replicate"), 5, 1)
    whole = _tiny(family).translate(inputs)
    exact = _tiny(family, window=(24, 32, 32)).translate_volume(inputs)
    torch.testing.assert_close(exact, whole, rtol=1e-5, atol=1e-5)
    windowed = _tiny(family, window=(16, 16, 16), window_overlap=0.5).translate_volume(inputs)
    assert windowed.shape == whole.shape and torch.isfinite(windowed).all()
    relative = float((windowed - whole).norm() / whole.norm())
    assert relative < 0.5, relative


def test_training_on_a_fitted_cache_needs_a_crop_then_predicts_whole_cases(phantom_root: Path, tmp_path: Path) -> None:
    from latent.app.encode_run import encode_dataset
    from latent.app.predict_run import load_run_and_vae, predict_dataset
    from latent.core.vae.loading import load_vae

    data = tmp_path / "data"
    shutil.copytree(phantom_root, data)
    splits = make_splits(discover_cases(data), (0.5, 0.0, 0.5), seed=0)
    split_file = save_splits({"train": splits["train"], "val": splits["test"][:1], "test": splits["test"][1:]},
                             tmp_path / "splits.json")
    vae_dir = _save_tiny_vae(tmp_path / "vae", seed=0)
    report = encode_dataset(data, tmp_path / "cache.zarr", load_vae(str(vae_dir)), "10x10x6:fit",
                            split_file=split_file, quiet=True)
    assert len(report.encoded) == 6 and not report.failures
    shapes = {tuple(report_shape) for report_shape in _cached_shapes(tmp_path / "cache.zarr")}
    assert len(shapes) > 1  # the cases really have shapes of their own

    def config(crop):
        return parse_config({
            "data": {"cache": str(tmp_path / "cache.zarr"), "split_file": str(split_file), "batch_size": 2,
                     "crop": crop, "crop_body_fraction": 0.5, "preload": True},
            "model": {"family": "l2l_regress", **LATENT_UNET},
            "train": {"max_steps": 2, "val_every": 2, "checkpoint_every": 1000, "tensorboard": False},
            "run_dir": str(tmp_path / "runs" / str(crop)),
        })

    with pytest.raises(BadConfigError, match=r"^data\.crop: required on a cache whose grid fits each case"):
        train(config(None), quiet=True)
    run_dir = train(config([4, 4, 4]), quiet=True)
    run, vae = load_run_and_vae(run_dir, str(vae_dir))
    assert run.model.config.window == (4, 4, 4)
    test = splits["test"][1:]
    result = predict_dataset(run, vae, data, tmp_path / "pred", pids=test, quiet=True)
    assert sorted(result.results) == sorted(test) and not result.failures
    for case in (case for case in discover_cases(data) if case.pid in test):
        sct, properties = read_volume(tmp_path / "pred" / f"{case.pid}.mha")
        assert properties.size == read_volume(case.mr)[1].size
        body = read_volume(case.mask)[0] > 0
        assert np.all(sct[~body] == AIR_HU) and np.isfinite(sct).all()


def _cached_shapes(store: Path) -> list[list[int]]:
    from latent.cache import LatentCache, pick_producer

    key, _ = pick_producer(store, "auto", option="--producer")
    cache = LatentCache.open(store, key)
    return [cache.case_attrs(pid)["geometry"]["canonical"]["shape"] for pid in cache.case_ids()]
