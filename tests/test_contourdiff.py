"""ContourDiff: the contour operator's MR/CT agreement, training on CT alone, sampling, resume,
whole-volume prediction on the native grid, and what training and prediction read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from latent.app.predict_run import PredictOptions, load_run_and_vae, predict_dataset, predict_from_cache
from latent.cache import LatentCache
from latent.core.cases import discover_cases, make_splits, save_splits
from latent.core.errors import BadConfigError
from latent.core.io import read_volume
from latent.translate.models.base import build_model, load_pretrained
from latent.translate.models.contour_map import contour_map, map_dice
from latent.translate.train import parse_config, train

pytestmark = pytest.mark.usefixtures("one_thread")

#: A 2-level 2D UNet of 8 channels, 2 DDIM steps.
TINY = {"family": "contourdiff", "channels": [8, 8], "norm_num_groups": 4, "num_head_channels": 4,
        "attention_levels": [False, False], "num_inference_steps": 2, "slices_per_volume": 2,
        "inference_batch_size": 8}
#: Canonical grid of the cached phantom: 10 x 10 x 6 mm, 32 x 32 x 32 voxels.
GRID = "10x10x6:32x32x32"
#: Measured on the 6 small phantoms of the session fixture (seed 11) on the demo grid: 0.83
#: (edge maps merged, 1-pixel dilation; benchmarks/bench_contour_agreement.py on 30 phantoms).
MIN_AGREEMENT = 0.7


def toy_ct(cases: int = 2, shape: tuple[int, int, int] = (6, 30, 26)) -> torch.Tensor:
    """``(cases, 1, D, H, W)`` CT in [-1, 1]: an ellipse of soft tissue around a bone disc, air outside."""
    depth, height, width = shape
    _, y, x = torch.meshgrid(torch.arange(depth, dtype=torch.float32), torch.linspace(-1, 1, height),
                             torch.linspace(-1, 1, width), indexing="ij")
    body = ((x / 0.8) ** 2 + (y / 0.6) ** 2 < 1).float()
    bone = ((x - 0.2) ** 2 + y ** 2 < 0.08).float() * body
    hu = -1000 + 1040 * body + 1160 * bone
    return ((hu + 1024) / 4095 * 2 - 1)[None, None].repeat(cases, 1, 1, 1, 1)


def cases_of(root: Path) -> dict[str, object]:
    return {case.pid: case for case in discover_cases(root)}


def prepared_slices(case, grid: str = GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """The MR and CT body slices of a case on a canonical grid, ``(N, 1, H, W)`` each."""
    from latent.core.grid import parse_grid_spec
    from latent.core.prepare import prepare_case

    prepared = prepare_case(case, parse_grid_spec(grid))
    body = prepared.mask.reshape(prepared.mask.shape[0], -1).any(axis=1)
    return (torch.from_numpy(prepared.mr_unit[body])[:, None].float(),
            torch.from_numpy(prepared.ct_full[body])[:, None].float())


# ----------------------------------------------------------------------------- the contour operator
def test_mr_and_ct_contour_maps_agree_on_the_phantom(phantom_root: Path) -> None:
    scores, shifted = [], []
    for case in cases_of(phantom_root).values():
        mr, ct = prepared_slices(case, "3x3x5:32x128x128")
        mr_map, ct_map = contour_map(mr), contour_map(ct)
        assert mr_map.shape == (mr.shape[0], 3, *mr.shape[2:]) and set(mr_map.unique().tolist()) <= {0.0, 1.0}
        scores.append(map_dice(mr_map, ct_map))
        shifted.append(map_dice(mr_map, ct_map.roll(4, dims=-1)))  # 12 mm off: the Dice must notice
    assert np.mean(scores) > MIN_AGREEMENT, scores
    assert np.mean(shifted) < np.mean(scores) - 0.1, (shifted, scores)


def test_contour_map_ignores_the_intensity_scale() -> None:
    ct = toy_ct(1)[0, 0, :2, :, :, None].movedim(-1, 1)  # (2, 1, H, W)
    maps = contour_map(ct)
    torch.testing.assert_close(contour_map(3.0 * ct + 7.0), maps)
    assert maps[:, 0].sum() > 0 and maps[:, 1:].sum() > 0  # an outline and edges
    assert map_dice(maps, maps) == 1.0 and map_dice(maps * 0, maps * 0) == 1.0


# ----------------------------------------------------------------------------- the model
def test_translate_keeps_the_shape_and_the_range_and_samples_differ() -> None:
    torch.manual_seed(0)
    model = build_model({**TINY, "mode": "2.5d"}).eval()
    assert model.input_key == "mr_pixels" and model.output_space == "ct_full" and model.stochastic
    assert model.batch_keys == ("ct_pixels",)
    mr = (toy_ct(1) + 1) / 2  # any MR-like volume; odd in-plane sizes are padded and cropped back
    first = model.translate(mr, generator=torch.Generator().manual_seed(0))
    again = model.translate(mr, generator=torch.Generator().manual_seed(0))
    other = model.translate(mr, generator=torch.Generator().manual_seed(1))
    assert first.shape == mr.shape and first.min() >= -1 and first.max() <= 1
    torch.testing.assert_close(first, again)
    assert (first - other).abs().max() > 0


def test_a_few_steps_lower_the_training_loss() -> None:
    torch.manual_seed(0)
    model = build_model({**TINY, "mode": "2d", "lr": 3e-3})
    batch = {"ct_pixels": toy_ct(2)}
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_at_fixed_noise() -> float:
        torch.manual_seed(123)  # the same slices, timesteps and noise before and after training
        with torch.no_grad():
            return float(model(batch)["loss"])

    before = loss_at_fixed_noise()
    for _ in range(25):
        optimizer.zero_grad()
        model(batch)["loss"].backward()
        optimizer.step()
    after = loss_at_fixed_noise()
    assert after < 0.7 * before, (before, after)


def test_bad_configs_fail_naming_the_field() -> None:
    for changes, field in (({"context_slices": 2}, "context_slices"), ({"edge_scales": []}, "edge_scales"),
                           ({"edge_quantile": 1.5}, "edge_quantile"), ({"sampler": "rflow"}, "sampler"),
                           ({"channels": [8, 10]}, "channels")):
        with pytest.raises(ValidationError, match=field):
            build_model({**TINY, **changes})


def test_recipes_load_and_build() -> None:
    from latent.translate.train import load_config

    for size in ("demo", "full"):
        config = load_config(f"contourdiff_{size}")
        assert config.model.family == "contourdiff" and "mr_pixels" in config.data.extra_val_keys
        assert build_model(config.model).config.num_inference_steps == config.model.num_inference_steps


class CTOnly(torch.utils.data.Dataset):
    """Batch-contract items holding a CT and nothing else."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> dict:
        return {"pid": f"toy{index}", "ct_pixels": toy_ct(1, (4, 16, 16))[0] * (1 - 0.05 * index)}


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    def config(run_dir: Path, max_steps: int, resume: bool = False):
        return parse_config({"model": {**TINY, "mode": "2d"}, "data": {"batch_size": 2}, "run_dir": str(run_dir),
                             "train": {"max_steps": max_steps, "checkpoint_every": 3, "log_every": 1,
                                       "val_every": None, "tensorboard": False, "resume": resume}})

    full = train(config(tmp_path / "full", 5), train_dataset=CTOnly(), quiet=True)
    train(config(tmp_path / "cut", 3), train_dataset=CTOnly(), quiet=True)
    resumed = train(config(tmp_path / "cut", 5, resume=True), train_dataset=CTOnly(), quiet=True)
    losses = [{r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if "loss" in r} for run in (full, resumed)]
    assert sorted(losses[1]) == [1, 2, 3, 4, 5]
    for step in (4, 5):
        assert losses[1][step] == pytest.approx(losses[0][step], rel=1e-6), step
    for key, value in load_pretrained(full / "final").state_dict().items():
        torch.testing.assert_close(load_pretrained(resumed / "final").state_dict()[key], value)


# ----------------------------------------------------------------------------- on a cache: what is read
@pytest.fixture(scope="module")
def cached(phantom_root: Path, tmp_path_factory) -> dict:
    """The phantom on a tiny grid, encoded with the shipped stand-in VAE: 3 train, 1 val, 2 test cases."""
    from latent.app.encode_run import encode_dataset
    from latent.core.vae.loading import load_vae

    root = tmp_path_factory.mktemp("contourdiff")
    data = root / "data"
    shutil.copytree(phantom_root, data)
    halves = make_splits(discover_cases(data), (0.5, 0.0, 0.5), seed=0)
    splits = {"train": halves["train"], "val": halves["test"][:1], "test": halves["test"][1:]}
    split_file = save_splits(splits, root / "splits.json")
    report = encode_dataset(data, root / "cache.zarr", load_vae("standin"), GRID, split_file=split_file, quiet=True)
    assert not report.failures
    return {"root": root, "data": data, "cache": root / "cache.zarr", "split_file": split_file, "splits": splits}


@pytest.fixture
def reads(monkeypatch) -> list[tuple[str, str]]:
    """Every ``(case, array)`` read from a cache and every ``("file", path)`` read of a case's volumes."""
    import latent.core.prepare as prepare

    record: list[tuple[str, str]] = []
    read_case, read_volume_of_case = LatentCache.read_case, prepare.read_volume

    def recording_read_case(self, pid, keys=None, **kwargs):
        out = read_case(self, pid, keys, **kwargs)
        record.extend((pid, key) for key in out)
        return out

    def recording_read_volume(path, *args, **kwargs):
        record.append(("file", str(path)))
        return read_volume_of_case(path, *args, **kwargs)

    monkeypatch.setattr(LatentCache, "read_case", recording_read_case)
    monkeypatch.setattr(prepare, "read_volume", recording_read_volume)
    return record


def test_training_reads_the_training_cts_and_nothing_else(cached: dict, reads: list, tmp_path: Path) -> None:
    config = parse_config({
        "data": {"cache": str(cached["cache"]), "split_file": str(cached["split_file"]), "batch_size": 2,
                 "val_split": None},
        "model": TINY, "run_dir": str(tmp_path / "run"),
        "train": {"max_steps": 2, "log_every": 1, "checkpoint_every": 100, "val_every": None, "tensorboard": False},
    })
    train(config, quiet=True)
    train_pids = set(cached["splits"]["train"])
    assert reads and set(reads) == {(pid, "ct_pixels") for pid in train_pids}  # no MR, no mask, no other case


def test_validation_reads_mr_only_of_validation_cases(cached: dict, reads: list, tmp_path: Path) -> None:
    config = parse_config({
        "data": {"cache": str(cached["cache"]), "split_file": str(cached["split_file"]), "batch_size": 2,
                 "extra_val_keys": ["mr_pixels", "mask_pixels"]},
        "model": TINY, "run_dir": str(tmp_path / "run"),
        "train": {"max_steps": 2, "log_every": 1, "checkpoint_every": 100, "val_every": 2, "tensorboard": False},
    })
    run_dir = train(config, quiet=True)
    assert (run_dir / "best" / "validation.json").is_file()
    read_by = {}
    for pid, key in reads:
        read_by.setdefault(pid, set()).add(key)
    assert all(read_by[pid] == {"ct_pixels"} for pid in cached["splits"]["train"])
    assert read_by[cached["splits"]["val"][0]] == {"ct_pixels", "mr_pixels", "mask_pixels"}  # scored, never trained on
    without = parse_config({**config.model_dump(mode="json"), "run_dir": str(tmp_path / "bad"),
                            "data": {**config.data.model_dump(mode="json"), "extra_val_keys": []}})
    with pytest.raises(BadConfigError, match="extra_val_keys"):
        train(without, quiet=True)


def test_prediction_reads_no_ct_and_writes_native_volumes_with_a_std_map(cached: dict, reads: list,
                                                                        tmp_path: Path) -> None:
    config = parse_config({
        "data": {"cache": str(cached["cache"]), "split_file": str(cached["split_file"]), "batch_size": 2,
                 "val_split": None},
        "model": TINY, "run_dir": str(tmp_path / "run"),
        "train": {"max_steps": 1, "log_every": 1, "checkpoint_every": 100, "val_every": None, "tensorboard": False},
    })
    run, vae = load_run_and_vae(train(config, quiet=True), None)
    assert vae is None
    test = cached["splits"]["test"]
    cases = cases_of(cached["data"])
    reads.clear()
    from_files = predict_dataset(run, vae, cached["data"], tmp_path / "files", pids=test,
                                 options=PredictOptions(samples=2), quiet=True)
    from_cache = predict_from_cache(run, vae, cached["cache"], tmp_path / "cache", pids=test,
                                    options=PredictOptions(samples=2, tta="flip"), quiet=True)
    assert not from_files.failures and not from_cache.failures
    ct_files = {str(case.ct) for case in cases.values()}
    assert reads and not any(path in ct_files for source, path in reads if source == "file")
    assert {key for source, key in reads if source != "file"} == {"mr_pixels"}
    for pid in test:
        for folder in ("files", "cache"):
            sct, properties = read_volume(tmp_path / folder / f"{pid}.mha")
            std, _ = read_volume(tmp_path / folder / f"{pid}_std.mha", dtype=np.float32)
            mr_properties = read_volume(cases[pid].mr)[1]
            assert properties.size == mr_properties.size and properties.spacing == mr_properties.spacing
            mask = read_volume(cases[pid].mask)[0] > 0
            assert std[mask].max() > 0 and np.all(std[~mask] == 0)


def test_the_bench_trains_it_and_samples_it_k_times() -> None:
    from latent.app.bench.config import BenchConfig, learned_methods, parse_methods, samples_per_case
    from latent.translate.models.base import model_families

    assert "contourdiff" in learned_methods() and "contour_map" not in model_families()  # the operator is no family
    assert parse_methods("water,cyclegan,cut,contourdiff+tta") == ("water", "cyclegan", "cut", "contourdiff+tta")
    assert samples_per_case("contourdiff", 3) == 3
    assert BenchConfig(data=Path("."), cache=Path("c"), out=Path("o"), methods=("contourdiff",)).recipe(
        "contourdiff") == "contourdiff_demo"
