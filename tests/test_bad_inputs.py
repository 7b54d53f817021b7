"""A corpus of malformed inputs, one per row: each command ends with one line that names the file
and the problem, no traceback, the documented exit status (2: the command cannot run; 1: a case
failed; 0: the bad folder was skipped and named), and nothing already written changes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from latent.app.cli import app
from latent.core.cases import discover_cases

GRID = "10x10x6:32x32x32"
TINY_VAE = {
    "spatial_dims": 3, "in_channels": 1, "out_channels": 1, "latent_channels": 4, "channels": [8, 8, 16],
    "num_res_blocks": 1, "norm_num_groups": 4, "attention_levels": [False, False, False],
    "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False,
}
TINY_L2SCT = {"family": "l2sct", "trunk_channels": 8, "trunk_blocks": 1, "decoder_channels": [4, 8, 8],
              "norm_num_groups": 4}
runner = CliRunner()


@dataclass(frozen=True)
class World:
    """What was written before each bad input: predictions, a cache, a VAE, a run. Read-only."""

    source: Path  # one good case folder (Task1/AB/<pid>)
    written: Path
    pid: str

    @property
    def vae(self) -> Path:
        return self.written / "vae"

    @property
    def cache(self) -> Path:
        return self.written / "cache.zarr"

    @property
    def pred(self) -> Path:
        return self.written / "pred"

    @property
    def run(self) -> Path:
        return self.written / "run"


@pytest.fixture(scope="module")
def world(phantom_root: Path, tmp_path_factory) -> World:
    from latent.core.vae.loading import load_vae, save_vae_dir
    from monai.networks.nets import AutoencoderKL
    from latent.translate.models.base import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bad_inputs")
    case = next(c for c in discover_cases(phantom_root) if c.region == "AB")
    data = root / "data"
    shutil.copytree(case.folder, data / "Task1" / "AB" / case.pid)
    written = root / "written"
    torch.manual_seed(0)
    save_vae_dir(AutoencoderKL(**TINY_VAE), {"class_name": "AutoencoderKL", "kwargs": TINY_VAE}, written / "vae")
    from latent.app.encode_run import encode_dataset

    encode_dataset(data, written / "cache.zarr", load_vae(str(written / "vae")), GRID, quiet=True)
    assert runner.invoke(app, ["predict", "--method", "water", "--data", str(data), "--out", str(written / "pred"),
                               "-q"]).exit_code == 0
    (written / "pred" / "predict_manifest.json").unlink()
    (written / "splits.json").write_text(json.dumps({"train": [case.pid], "val": [], "test": []}))
    build_model(TINY_L2SCT).save_pretrained(written / "run" / "best")
    from latent.cache import list_producers

    producer = next(iter(list_producers(written / "cache.zarr").values()))
    (written / "run" / "producer.json").write_text(json.dumps(producer, default=str))
    torch.set_num_threads(threads)
    return World(data / "Task1" / "AB" / case.pid, written, case.pid)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- ways to break a case


def _image(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(path))


def _write(image: sitk.Image, path: Path) -> None:
    sitk.WriteImage(image, str(path), False)


def _with_array(path: Path, change: Callable[[np.ndarray], np.ndarray], dtype=None) -> None:
    image = _image(path)
    array = change(sitk.GetArrayFromImage(image).astype(dtype or np.float32))
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    _write(out, path)


def truncate(name: str) -> Callable[[Path], None]:
    def apply(case: Path) -> None:
        data = (case / name).read_bytes()
        (case / name).write_bytes(data[: len(data) // 2])
    return apply


def zero_bytes(name: str) -> Callable[[Path], None]:
    return lambda case: (case / name).write_bytes(b"")


def nan_voxels(name: str, value: float) -> Callable[[Path], None]:
    def change(array: np.ndarray) -> np.ndarray:
        array.flat[array.size // 2] = value
        return array
    return lambda case: _with_array(case / name, change)


def two_d(case: Path) -> None:
    image = _image(case / "mr.mha")
    _write(image[:, :, image.GetSize()[2] // 2], case / "mr.mha")


def four_d(case: Path) -> None:
    array = sitk.GetArrayFromImage(_image(case / "mr.mha"))
    _write(sitk.GetImageFromArray(np.stack([array, array]).astype(np.float32), isVector=False), case / "mr.mha")


def rgb(case: Path) -> None:
    image = _image(case / "mr.mha")
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    out = sitk.GetImageFromArray(np.stack([array] * 3, axis=-1), isVector=True)
    out.CopyInformation(image)
    _write(out, case / "mr.mha")


def complex_voxels(case: Path) -> None:
    image = _image(case / "mr.mha")
    array = sitk.GetArrayFromImage(image).astype(np.complex64)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    _write(out, case / "mr.mha")


def shift_origin(name: str) -> Callable[[Path], None]:
    def apply(case: Path) -> None:
        image = _image(case / name)
        image.SetOrigin(tuple(v + 7.5 for v in image.GetOrigin()))
        _write(image, case / name)
    return apply


def header_field(name: str, field: str, value: str) -> Callable[[Path], None]:
    """Rewrite one MetaImage header line (ITK refuses to write such values itself)."""
    def apply(case: Path) -> None:
        data = (case / name).read_bytes()
        head, sep, body = data.partition(b"ElementDataFile = LOCAL\n")
        lines = [f"{field} = {value}".encode() if line.startswith(field.encode()) else line
                 for line in head.split(b"\n")]
        (case / name).write_bytes(b"\n".join(lines) + sep + body)
    return apply


def mask_values(fill: int) -> Callable[[Path], None]:
    return lambda case: _with_array(case / "mask.mha", lambda a: np.full_like(a, fill), dtype=np.int16)


def constant_mr(case: Path) -> None:
    _with_array(case / "mr.mha", lambda a: np.full_like(a, 100.0))


def remove(name: str) -> Callable[[Path], None]:
    return lambda case: (case / name).unlink()


def broken_link(case: Path) -> None:
    (case / "mr.mha").unlink()
    (case / "mr.mha").symlink_to(case / "gone.mha")


def empty_folder_beside(case: Path) -> None:
    (case.parent / "1ABZ099").mkdir()


def same_pid_in_another_region(case: Path) -> None:
    shutil.copytree(case, case.parents[1] / "HN" / case.name)


def nothing(case: Path) -> None:
    return None


# --------------------------------------------------------------------------- the commands


def predict(world: World, data: Path, tmp: Path) -> list[str]:
    return ["predict", "--method", "water", "--data", str(data), "--out", str(world.pred), "-q"]


def evaluate(world: World, data: Path, tmp: Path) -> list[str]:
    return ["evaluate", "--pred", str(world.pred), "--data", str(data), "-q"]


def encode(world: World, data: Path, tmp: Path, grid: str = GRID, vae: str | None = None) -> list[str]:
    return ["encode", "--data", str(data), "--cache", str(world.cache), "--vae", vae or str(world.vae),
            "--grid", grid, "-q"]


def encode_small_grid(world: World, data: Path, tmp: Path) -> list[str]:
    return encode(world, data, tmp, grid="1x1x1:32x32x32")  # a 32 mm field of view


def encode_bad_grid(world: World, data: Path, tmp: Path) -> list[str]:
    return encode(world, data, tmp, grid="8x8:32x32")


def encode_truncated_vae(world: World, data: Path, tmp: Path) -> list[str]:
    copy = Path(shutil.copytree(world.vae, tmp / "vae_copy"))
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return encode(world, data, tmp, vae=str(copy))


def predict_with_split(content: str) -> Callable[[World, Path, Path], list[str]]:
    def command(world: World, data: Path, tmp: Path) -> list[str]:
        (tmp / "splits.json").write_text(content)
        return predict(world, data, tmp) + ["--split-file", str(tmp / "splits.json")]
    return command


def predict_wrong_shape_checkpoint(world: World, data: Path, tmp: Path) -> list[str]:
    from safetensors.torch import load_file, save_file

    run = Path(shutil.copytree(world.run, tmp / "run"))
    weights = run / "best" / "model.safetensors"
    state = load_file(str(weights))
    name = next(key for key, value in state.items() if value.ndim > 1)
    state[name] = torch.zeros(*state[name].shape[:-1], state[name].shape[-1] + 1)
    save_file(state, str(weights))
    return ["predict", "--model", str(run), "--vae", str(world.vae), "--data", str(data), "--out", str(world.pred),
            "-q"]


def predict_on_other_grid(world: World, data: Path, tmp: Path) -> list[str]:
    pred = Path(shutil.copytree(world.pred, tmp / "pred"))
    shift_origin(f"{world.pid}.mha")(pred)
    return ["evaluate", "--pred", str(pred), "--data", str(data), "-q"]


def evaluate_without_prediction(world: World, data: Path, tmp: Path) -> list[str]:
    (tmp / "empty_pred").mkdir()
    return ["evaluate", "--pred", str(tmp / "empty_pred"), "--data", str(data), "-q"]


def train_with(recipe_changes: dict, model: dict = TINY_L2SCT) -> Callable[[World, Path, Path], list[str]]:
    def command(world: World, data: Path, tmp: Path) -> list[str]:
        recipe = {
            "data": {"cache": str(world.cache), "split_file": str(world.written / "splits.json"), "batch_size": 1,
                     "val_split": None},
            "model": dict(model),
            "train": {"max_steps": 1, "mixed_precision": "no", "tensorboard": False},
            "run_dir": str(tmp / "train_run"),
        }
        for dotted, value in recipe_changes.items():
            if "." not in dotted:  # a top-level field (init_from)
                recipe[dotted] = value
                continue
            section, key = dotted.split(".")
            recipe[section].pop(key.lstrip("~"), None) if key.startswith("~") else recipe[section].__setitem__(key, value)
        (tmp / "recipe.json").write_text(json.dumps(recipe))
        return ["TRAIN", "--config", str(tmp / "recipe.json"), "--quiet"]
    return command


def predict_ensemble_of_one(world: World, data: Path, tmp: Path) -> list[str]:
    return ["predict", "--ensemble", str(world.run), "--vae", str(world.vae), "--data", str(data),
            "--out", str(world.pred), "-q"]


# --------------------------------------------------------------------------- issue 32: inputs verified, messages


def flip_bytes(name: str, count: int) -> Callable[[Path], None]:
    """Invert ``count`` bytes in the middle of a compressed file (its header stays intact)."""
    def apply(case: Path) -> None:
        data = bytearray((case / name).read_bytes())
        middle = len(data) // 2
        data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
        (case / name).write_bytes(bytes(data))
    return apply


def as_nii_gz(role: str, then: Callable[[Path], None]) -> Callable[[Path], None]:
    """Give ``<role>.mha`` as ``<role>.nii.gz`` (the readers accept both), then break it with ``then``."""
    def apply(case: Path) -> None:
        sitk.WriteImage(_image(case / f"{role}.mha"), str(case / f"{role}.nii.gz"), True)
        (case / f"{role}.mha").unlink()
        then(case)
    return apply


def detached_header(data_file: str | None) -> Callable[[Path], None]:
    """Give the MR as ``mr.mhd`` + ``mr.raw``; ``data_file`` moves the data there (None: delete it)."""
    def apply(case: Path) -> None:
        sitk.WriteImage(_image(case / "mr.mha"), str(case / "mr.mhd"), False)
        (case / "mr.mha").unlink()
        if data_file is None:
            (case / "mr.raw").unlink()
            return
        target = (case / data_file).resolve()
        (case / "mr.raw").rename(target)
        header = (case / "mr.mhd").read_text().replace("ElementDataFile = mr.raw", f"ElementDataFile = {data_file}")
        (case / "mr.mhd").write_text(header)
    return apply


def ct_of(value: float) -> Callable[[Path], None]:
    return lambda case: _with_array(case / "ct.mha", lambda a: np.full_like(a, value))


def predict_with_model_config(change: Callable[[dict], None]) -> Callable[[World, Path, Path], list[str]]:
    def command(world: World, data: Path, tmp: Path) -> list[str]:
        run = Path(shutil.copytree(world.run, tmp / "run_copy"))
        config = json.loads((run / "best" / "config.json").read_text())
        change(config)
        (run / "best" / "config.json").write_text(json.dumps(config))
        return ["predict", "--model", str(run), "--vae", str(world.vae), "--data", str(data), "--out",
                str(world.pred), "-q"]
    return command


def encode_with_vae(spec: str) -> Callable[[World, Path, Path], list[str]]:
    return lambda world, data, tmp: encode(world, data, tmp, vae=spec)


def predict_with_run(spec: str) -> Callable[[World, Path, Path], list[str]]:
    return lambda world, data, tmp: ["predict", "--model", spec, "--data", str(data), "--out", str(world.pred), "-q"]


def train_into_finished_run(*flags: str) -> Callable[[World, Path, Path], list[str]]:
    """The tiny recipe aimed at the world's finished run (best/ and producer.json, no checkpoints)."""
    def command(world: World, data: Path, tmp: Path) -> list[str]:
        arguments = train_with({})(world, data, tmp)
        recipe = json.loads((tmp / "recipe.json").read_text())
        (tmp / "recipe.json").write_text(json.dumps({**recipe, "run_dir": str(world.run)}))
        return arguments + list(flags)
    return command


def vae_fit_over_finished_vae(world: World, data: Path, tmp: Path) -> list[str]:
    return ["vae", "fit", "--data", str(data), "--out", str(world.vae), "--grid", GRID, "--max-steps", "1", "-q"]

# -- issue 32, items 5 and 7 (environment failures, tidy): helpers


def predict_into_a_file(world: World, data: Path, tmp: Path) -> list[str]:
    (tmp / "pred_file").write_text("a file, not a folder")
    return ["predict", "--method", "water", "--data", str(data), "--out", str(tmp / "pred_file"), "-q"]


def encode_into_a_file(world: World, data: Path, tmp: Path) -> list[str]:
    (tmp / "cache_file").write_text("a file, not a cache")
    return encode(world, data, tmp)[:4] + [str(tmp / "cache_file")] + encode(world, data, tmp)[5:]


def encode_fit_to_tmp(world: World, data: Path, tmp: Path) -> list[str]:
    command = encode(world, data, tmp, grid="10x10x6:fit")
    return command[:4] + [str(tmp / "cache.zarr")] + command[5:]


def encode_huge_grid(world: World, data: Path, tmp: Path) -> list[str]:
    return encode(world, data, tmp, grid="1x1x1:32000x32000x32000")


def tiny_volumes(case: Path) -> None:
    """MR, CT and mask of 2 x 2 x 2 voxels (the body: two of them)."""
    for name, values in (("mr.mha", np.arange(8.0) * 10 + 5), ("ct.mha", np.full(8, 40.0)),
                         ("mask.mha", np.array([0, 0, 0, 1, 0, 0, 0, 1.0]))):
        image = sitk.GetImageFromArray(values.reshape(2, 2, 2).astype(np.uint8 if name == "mask.mha" else np.float32))
        image.SetSpacing((10.0, 10.0, 6.0))
        _write(image, case / name)

# --------------------------------------------------------------------------- issue 32 item 4: leaks and mix-ups
SECOND = "1ABZ998"  # a second case folder; sorts after the World's case


def train_with_producer(changes: dict) -> Callable[[World, Path, Path], list[str]]:
    """``train`` with ``changes`` on the World run's producer (other rows add producers to the cache)."""
    def command(world: World, data: Path, tmp: Path) -> list[str]:
        producer = json.loads((world.run / "producer.json").read_text())["producer_key"]
        return train_with({**changes, "data.producer": producer})(world, data, tmp)
    return command


def train_with_split(splits: Callable[[str], dict]) -> Callable[[World, Path, Path], list[str]]:
    """``train`` on a split file made from the World's case id."""
    def command(world: World, data: Path, tmp: Path) -> list[str]:
        (tmp / "leaky_splits.json").write_text(json.dumps(splits(world.pid)))
        return train_with_producer({"data.split_file": str(tmp / "leaky_splits.json")})(world, data, tmp)
    return command


def encode_with_unknown_id(world: World, data: Path, tmp: Path) -> list[str]:
    (tmp / "leaky_splits.json").write_text(json.dumps({"train": [world.pid, "1ABA777"], "val": [], "test": []}))
    return encode(world, data, tmp) + ["--split-file", str(tmp / "leaky_splits.json")]


def folder_linked_to_case(case: Path) -> None:
    (case.parent / SECOND).symlink_to(case, target_is_directory=True)


def copy_of_case(case: Path) -> None:
    shutil.copytree(case, case.parent / SECOND)


def mr_hard_linked(case: Path) -> None:
    copy_of_case(case)
    (case.parent / SECOND / "mr.mha").unlink()
    os.link(case / "mr.mha", case.parent / SECOND / "mr.mha")


def second_distinct_case(case: Path) -> None:
    """Another patient: a copy whose MR differs in one voxel (so not a duplicate)."""
    copy_of_case(case)
    nan_voxels("mr.mha", 12345.0)(case.parent / SECOND)


def prediction_folder(world: World, tmp: Path, manifest: list[str] | None) -> Path:
    """A copy of the World's predictions, with a manifest listing ``manifest`` (None: no manifest)."""
    pred = Path(shutil.copytree(world.pred, tmp / "pred_copy"))
    if manifest is not None:
        (pred / "predict_manifest.json").write_text(json.dumps({"processed": manifest, "skipped": {}, "failures": {}}))
    return pred


def evaluate_stale_predictions(world: World, data: Path, tmp: Path) -> list[str]:
    """An earlier method's prediction of the second case is still there; the manifest lists only the first."""
    pred = prediction_folder(world, tmp, [world.pid])
    shutil.copy(pred / f"{world.pid}.mha", pred / f"{SECOND}.mha")
    return ["evaluate", "--pred", str(pred), "--data", str(data), "--out", str(tmp / "scores.csv"), "-q"]


def evaluate_two_formats(world: World, data: Path, tmp: Path) -> list[str]:
    pred = prediction_folder(world, tmp, None)
    sitk.WriteImage(_image(pred / f"{world.pid}.mha"), str(pred / f"{world.pid}.nii.gz"))
    return ["evaluate", "--pred", str(pred), "--data", str(data), "-q"]


def evaluate_structb_grid(grid: str) -> Callable[[World, Path, Path], list[str]]:
    """``latent evaluate`` with a StructB common grid (issue 36 item 3)."""
    def command(world: World, data: Path, tmp: Path) -> list[str]:
        return evaluate(world, data, tmp) + ["--structb-grid", grid]
    return command


def phantom_with(*options: str) -> Callable[[World, Path, Path], list[str]]:
    """``latent phantom`` into the test's folder with the given options (issue 33 item 4)."""
    def command(world: World, data: Path, tmp: Path) -> list[str]:
        return ["phantom", "--out", str(tmp / "phantom"), "--cases", "2", *options]
    return command


# --------------------------------------------------------------------------- issue 33: latent qa


def qa(world: World, data: Path, tmp: Path) -> list[str]:
    return ["qa", "--data", str(data), "--out", str(tmp / "qa"), "-q"]


def qa_with_config(world: World, data: Path, tmp: Path) -> list[str]:
    (tmp / "qa.yaml").write_text("metal_treshold: 5\n")
    return qa(world, data, tmp) + ["--config", str(tmp / "qa.yaml")]


# --------------------------------------------------------------------------- issue 34: latent register


def register(world: World, data: Path, tmp: Path) -> list[str]:
    return ["register", "--data", str(data), "--out", str(tmp / "registered"), "-q"]


def register_feature_vae(world: World, data: Path, tmp: Path) -> list[str]:
    return register(world, data, tmp) + ["--method", "feature", "--feature-vae", str(tmp / "no_such_vae")]


# --------------------------------------------------------------------------- issue 36: latent tune


def tune_with(space: str, *extra: str) -> Callable[[World, Path, Path], list[str]]:
    """`latent tune` of a tiny l2sct recipe on the written cache (no trial runs: the input is refused first)."""
    def command(world: World, data: Path, tmp: Path) -> list[str]:
        (tmp / "space.yaml").write_text(space)
        arguments = train_with({"train.validator": "native"})(world, data, tmp)
        return ["tune", *arguments[1:3], "--space", str(tmp / "space.yaml"), "--trials", "1",
                "--out", str(tmp / "tune"), *extra, "-q"]
    return command


@dataclass(frozen=True)
class Bad:
    """One malformed input: how the case is broken, the command run on it, what it must say."""

    breaks: Callable[[Path], None]
    command: Callable[[World, Path, Path], list[str]]
    message: str  # regex matched against the error line; {case} and {data} are substituted
    exit_code: int


CORPUS: dict[str, Bad] = {
    "truncated mr": Bad(truncate("mr.mha"), predict, r"{case}/mr\.mha: cannot be read as an image", 1),
    "zero-byte mr": Bad(zero_bytes("mr.mha"), predict, r"{case}/mr\.mha: cannot be read as an image", 1),
    "truncated ct": Bad(truncate("ct.mha"), evaluate, r"{case}/ct\.mha: cannot be read as an image", 1),
    "NaN voxels in mr": Bad(nan_voxels("mr.mha", np.nan), predict, r"{case}/mr\.mha: 1 NaN/inf voxels", 1),
    "inf voxels in ct": Bad(nan_voxels("ct.mha", np.inf), evaluate, r"{case}/ct\.mha: 1 NaN/inf voxels", 1),
    "2D mr": Bad(two_d, predict, r"{case}/mr\.mha: 2D image; a 3D volume is needed", 1),
    "4D mr": Bad(four_d, predict, r"{case}/mr\.mha: 4D image; a 3D volume is needed", 1),
    "RGB mr": Bad(rgb, predict, r"{case}/mr\.mha: vector image with 3 components per voxel", 1),
    "complex mr": Bad(complex_voxels, predict, r"{case}/mr\.mha: (vector image with 2 components|complex64 voxels)", 1),
    "ct on another grid": Bad(shift_origin("ct.mha"), encode, r"ct {case}/ct\.mha is on another grid than the MR: origin", 1),
    "mask on another grid": Bad(shift_origin("mask.mha"), predict, r"mask {case}/mask\.mha is on another grid than the MR", 1),
    "direction not orthonormal": Bad(header_field("mr.mha", "TransformMatrix", "1 0 0 0.5 1 0 0 0 1"), predict,
                                     r"{case}/mr\.mha: direction matrix .* is not orthonormal", 1),
    "spacing 0": Bad(header_field("mr.mha", "ElementSpacing", "0 2 3"), predict,
                     r"{case}/mr\.mha: (spacing .* every voxel size must be positive|cannot be read as an image)", 1),
    "spacing 50 mm": Bad(header_field("mr.mha", "ElementSpacing", "50 50 50"), predict,
                         r"{case}/mr\.mha: spacing \(x, y, z\) \(50\.0, 50\.0, 50\.0\) mm exceeds 20 mm", 1),
    "empty mask": Bad(mask_values(0), predict, r"empty mask {case}/mask\.mha", 1),
    "all-ones mask": Bad(mask_values(1), predict, r"mask {case}/mask\.mha covers every voxel", 1),
    "constant mr": Bad(constant_mr, predict, r"MR {case}/mr\.mha is constant \(100\) inside the mask", 1),
    "missing mr": Bad(remove("mr.mha"), predict, r"no cases found .*{case}: no mr volume \(holds ct\.mha, mask\.mha\)", 2),
    "missing mask": Bad(remove("mask.mha"), predict, r"no mask file in {case}", 1),
    "missing ct to score": Bad(remove("ct.mha"), evaluate, r"no case with a CT to score .*no ct file in {case}", 2),
    "empty case folder": Bad(empty_folder_beside, predict, r"skipped: .*1ABZ099: no mr volume; folder is empty", 0),
    "duplicate pid across regions": Bad(same_pid_in_another_region, predict,
                                        r"the same patient id in {case} and .*HN/.*; ids must be unique", 2),
    "broken link": Bad(broken_link, predict, r"{case}/mr\.mha: broken symbolic link", 1),
    "split names an absent case": Bad(nothing, predict_with_split('{"test": ["1ABA777"]}'),
                                      r"1ABA777: asked for, but not in {data}", 1),
    "split not JSON": Bad(nothing, predict_with_split("{test: [}"), r"splits\.json: not valid JSON", 2),
    "body outside the grid": Bad(nothing, encode_small_grid, r"of the body falls outside the canonical grid", 1),
    "malformed grid": Bad(nothing, encode_bad_grid, r"8x8:32x32", 2),
    "truncated VAE weights": Bad(nothing, encode_truncated_vae, r"vae_copy/model\.safetensors", 2),
    "checkpoint of another shape": Bad(nothing, predict_wrong_shape_checkpoint,
                                       r"model\.safetensors: does not fit the model of .*config\.json: 1 tensor\(s\) of another shape", 2),
    "prediction on another grid": Bad(nothing, predict_on_other_grid, r"prediction .* is on another grid than the CT", 1),
    "no prediction": Bad(nothing, evaluate_without_prediction, r"no prediction .*empty_pred", 1),
    "recipe with a misspelt key": Bad(nothing, train_with({"model.trunk_chanels": 8}),
                                      r"invalid training config: model\.trunk_chanels: Extra inputs are not permitted", 2),
    "cache of another producer": Bad(nothing, train_with({"data.producer": "0123456789abcdef"}),
                                     r"data\.producer: '0123456789abcdef' is not in .*cache\.zarr", 2),
    "fold out of range": Bad(nothing, train_with({"data.fold": "6/5"}),
                             r"invalid training config: data\.fold: expected k/K .* got '6/5'", 2),
    "resvit transformer in a block it lacks": Bad(nothing, train_with({"model.vit_blocks": [1, 12]}, {"family": "resvit"}),
                                                  r"invalid training config: model\.vit_blocks: distinct ART block "
                                                  r"numbers in 1\.\.art_blocks=9, got \[1, 12\]", 2),
    "ensemble of one run": Bad(nothing, predict_ensemble_of_one, r"--ensemble: .* names one run", 2),
    "unknown region": Bad(nothing, train_with({"data.regions": ["AB", "XX"]}),
                          r"invalid training config: data\.regions: .*unknown region 'XX'; known: AB, HN, TH", 2),
    "region without training cases": Bad(nothing, train_with_producer({"data.regions": ["brain"]}),
                                         r"data\.regions: none of the 1 cases is of brain \(their regions: AB\)", 2),
    "init_from not a run": Bad(nothing, train_with_producer({"init_from": "/nonexistent/run"}),
                               r"init_from: /nonexistent/run is neither a training run", 2),
    # issue 32, inputs are verified, not trusted; messages for people
    "corrupted .nii.gz mr": Bad(as_nii_gz("mr", flip_bytes("mr.nii.gz", 64)), predict,
                                r"{case}/mr\.nii\.gz: corrupted compressed data \(gzip (CRC check failed|stream is damaged)\)",
                                1),
    "truncated .nii.gz mr": Bad(as_nii_gz("mr", truncate("mr.nii.gz")), predict,
                                r"{case}/mr\.nii\.gz: cannot be read as an image: truncated", 1),
    "corrupted compressed .mha ct": Bad(flip_bytes("ct.mha", 16), evaluate,
                                        r"{case}/ct\.mha: corrupted compressed data \(the zlib stream", 1),
    ".mhd data file outside the case": Bad(detached_header("../../outside.raw"), predict,
                                           r"{case}/mr\.mhd: ElementDataFile \.\./\.\./outside\.raw lies outside {case}", 1),
    ".mhd data file missing": Bad(detached_header(None), predict,
                                  r"{case}/mr\.mhd: its data file {case}/mr\.raw is missing", 1),
    "origin nan": Bad(header_field("mr.mha", "Offset", "nan nan nan"), predict,
                      r"{case}/mr\.mha: Offset = nan nan nan: non-finite geometry", 1),
    "spacing inf": Bad(header_field("mr.mha", "ElementSpacing", "inf 2 3"), predict,
                       r"{case}/mr\.mha: ElementSpacing = inf 2 3: non-finite geometry", 1),
    "direction nan": Bad(header_field("ct.mha", "TransformMatrix", "1 0 0 0 nan 0 0 0 1"), evaluate,
                         r"{case}/ct\.mha: TransformMatrix = 1 0 0 0 nan 0 0 0 1: non-finite geometry", 1),
    "ct of 1e9 HU scored": Bad(ct_of(1e9), evaluate,
                               r"{case}/ct\.mha: CT values from 1e\+09 to 1e\+09 HU, \d+ voxel\(s\) outside the "
                               r"plausible range \[-2000, 4000\] HU", 1),
    "ct of -5000 HU encoded": Bad(ct_of(-5000), encode, r"{case}/ct\.mha: CT values from -5000 to -5000 HU", 1),
    "impossible allocation": Bad(header_field("mr.mha", "DimSize", "100000 100000 100000"), predict,
                                 r"{case}/mr\.mha: header asks for 1000000000000000 voxels", 1),
    "mask of -1": Bad(mask_values(-1), predict, r"mask {case}/mask\.mha: values other than 0 and 1 \(-1\)", 1),
    "mask of -1 scored": Bad(mask_values(-1), evaluate, r"mask {case}/mask\.mha: values other than 0 and 1 \(-1\)", 1),
    "grid mismatch in plain numbers": Bad(shift_origin("mask.mha"), predict,
                                          r"mask {case}/mask\.mha is on another grid than the MR: origin "
                                          r"\(-?[\d.]+, -?[\d.]+, -?[\d.]+\) vs \(-?[\d.]+, -?[\d.]+, -?[\d.]+\)$", 1),
    "zero-byte mr, no ITK lines": Bad(zero_bytes("mr.mha"), predict,
                                      r"{case}/mr\.mha: cannot be read as an image \(truncated or not an image\)$", 1),
    "run config.json of an unknown family": Bad(nothing, predict_with_model_config(lambda c: c.update(family="nosuch")),
                                                r"run_copy/best/config\.json: unknown model family 'nosuch'", 2),
    "run config.json with an extra key": Bad(nothing, predict_with_model_config(lambda c: c.update(trunk_chanels=8)),
                                             r"run_copy/best/config\.json: .*trunk_chanels: Extra inputs are not "
                                             r"permitted", 2),
    "--vae hf:// alone": Bad(nothing, encode_with_vae("hf://"), r"hf://: empty hub name; expected hf://owner/name", 2),
    "--model hf:// alone": Bad(nothing, predict_with_run("hf://"), r"hf://: empty hub name; expected hf://owner/name", 2),
    # -- issue 32, item 2: finished work is never overwritten (more in tests/test_finished_runs.py)
    "train over a finished run": Bad(nothing, train_into_finished_run(),
                                     r"written/run: already holds a run \(best/, producer\.json\): resume it "
                                     r"\(--resume\), choose another folder, or pass --overwrite to replace it", 2),
    "resume a run without checkpoints": Bad(nothing, train_into_finished_run("--resume"),
                                            r"written/run: --resume: no complete checkpoint to continue from, but the "
                                            r"folder holds a run \(best/, producer\.json\)", 2),
    "resume and overwrite together": Bad(nothing, train_into_finished_run("--resume", "--overwrite"),
                                         r"--resume and --overwrite exclude each other", 2),
    "vae fit over a finished VAE": Bad(nothing, vae_fit_over_finished_vae,
                                       r"written/vae: already holds a run \(model\.safetensors, config\.json\)", 2),
    # -- issue 32, items 5 and 7: environment failures and invalid numbers are input errors
    "lr nan": Bad(nothing, train_with({"model.lr": "nan"}), r"invalid training config: model\.lr: Input should be a finite number", 2),
    "lr inf": Bad(nothing, train_with({"model.lr": "inf"}), r"invalid training config: model\.lr: Input should be a finite number", 2),
    "lr negative": Bad(nothing, train_with({"model.lr": -1e-4}), r"model\.lr: Input should be greater than 0", 2),
    "crop of zeros": Bad(nothing, train_with({"data.crop": [0, 0, 0]}),
                         r"data\.crop: every size must be at least 1 voxel, got \[0, 0, 0\]", 2),
    "negative crop": Bad(nothing, train_with({"data.crop": -8}), r"data\.crop: every size must be at least 1 voxel, got -8", 2),
    "weight decay nan": Bad(nothing, train_with({"train.weight_decay": "nan"}),
                            r"train\.weight_decay: Input should be a finite number", 2),
    "--out names a file": Bad(nothing, predict_into_a_file, r"--out .*pred_file: exists and is a file, not a folder", 2),
    "--cache names a file": Bad(nothing, encode_into_a_file, r"--cache .*cache_file: exists and is a file, not a cache folder", 2),
    "2x2x2 volume on a fitted grid": Bad(tiny_volumes, encode_fit_to_tmp,
                                         r"{case}/mr\.mha: a 2x2x2-voxel volume gets a 4x4x4 box on grid 10x10x6:fit", 1),
    "grid larger than memory": Bad(nothing, encode_huge_grid,
                                   r"grid 1x1x1:32000x32000x32000: one 32000x32000x32000 float32 volume needs 122070\.3 GiB", 2),
    # -- issue 32 item 4: leaks and mix-ups (split files, one patient twice, stale predictions)
    "split with a case in train and test": Bad(
        nothing, train_with_split(lambda pid: {"train": [pid], "val": [], "test": [pid]}),
        r"leaky_splits\.json: 1 case\(s\) in more than one split: \w+ \(train/test\)", 2),
    "split with a duplicate id": Bad(
        nothing, train_with_split(lambda pid: {"train": [pid, pid], "val": [], "test": []}),
        r"leaky_splits\.json: 1 id\(s\) listed more than once in 'train': \w+$", 2),
    "split with an unknown id (train)": Bad(
        nothing, train_with_split(lambda pid: {"train": [pid, "1ABA777"], "test": []}),
        r"leaky_splits\.json: 1 id\(s\) of 'train' not in .*cache\.zarr: 1ABA777$", 2),
    "split with an unknown id (encode)": Bad(
        nothing, encode_with_unknown_id,
        r"leaky_splits\.json: 1 id\(s\) of 'train' not in {data} or .*cache\.zarr: 1ABA777$", 2),
    "case folder linked to another": Bad(
        folder_linked_to_case, predict, r"{case} and .*/1ABZ998: the same mr volume, one folder is a link to the other", 2),
    "two case folders with identical volumes": Bad(
        copy_of_case, predict, r"{case} and .*/1ABZ998: the same mr volume, their mr files are identical", 2),
    "mr hard-linked into another case": Bad(
        mr_hard_linked, evaluate, r"{case} and .*/1ABZ998: the same mr volume, their mr files are one file", 2),
    "stale predictions beyond the manifest": Bad(
        second_distinct_case, evaluate_stale_predictions, r"^skipped 1 file\(s\) not in the manifest: 1ABZ998\.mha$", 0),
    "one case predicted in two formats": Bad(
        nothing, evaluate_two_formats,
        r"\w+: 2 predictions, .*pred_copy/\w+\.mha and .*pred_copy/\w+\.nii\.gz; remove all but one", 1),
    # -- issue 36 item 3: StructB needs one common grid
    "evaluate with a fitted StructB grid": Bad(
        nothing, evaluate_structb_grid("2x2x3:fit"),
        r"^error: --structb-grid 2x2x3:fit: StructB needs one shape for every case; give a fixed shape", 2),
    "evaluate with a malformed StructB grid": Bad(
        nothing, evaluate_structb_grid("3x3"), r"^error: --structb-grid: grid spec '3x3': expected a preset", 2),
    # -- issue 33 item 4: phantom defects for QA tests
    "phantom with an unknown defect": Bad(
        nothing, phantom_with("--defects", "banding,streaks"),
        r"^error: defects: unknown defect 'streaks'; expected some of banding, fov_cut, extra_object, signal_void, "
        r"ct_offset, metal, misregistration, deformation$", 2),
    "phantom with a defect fraction above 1": Bad(
        nothing, phantom_with("--defects", "banding", "--defect-fraction", "1.5"),
        r"^error: defect_fraction must be between 0 and 1, got 1\.5$", 2),
    # -- issue 33: latent qa reports a bad case in one line and goes on (exit 1), a bad config exit 2
    "qa of a case without CT": Bad(remove("ct.mha"), qa, r"no CT file in {case}; QA needs the CT", 1),
    "qa of a mask on another grid": Bad(shift_origin("mask.mha"), qa, r"mask {case}/mask\.mha is on another grid", 1),
    "qa of an empty mask": Bad(mask_values(0), qa, r"empty mask {case}/mask\.mha", 1),
    "qa config with a misspelt field": Bad(nothing, qa_with_config,
                                           r"qa\.yaml: metal_treshold: Extra inputs are not permitted", 2),
    # -- issue 34: latent register reports a bad case in one line and goes on (exit 1)
    "register a case without CT": Bad(remove("ct.mha"), register, r"no CT file in {case}; registration needs the CT", 1),
    "register a mask on another grid": Bad(shift_origin("mask.mha"), register,
                                           r"mask {case}/mask\.mha is on another grid than the MR", 1),
    "register --feature-vae that does not exist": Bad(nothing, register_feature_vae,
                                                      r"^error: VAE spec '.*no_such_vae' does not exist", 2),
    # -- issue 36: latent tune refuses a bad space, an unknown field and a storage it cannot open
    "tune space with an unknown type": Bad(nothing, tune_with("model.lr: {type: gaussian, low: 1, high: 2}\n"),
                                           r"space\.yaml: model\.lr\.type: Input should be 'loguniform'", 2),
    "tune space with an unknown field": Bad(nothing, tune_with("model.lrr: {type: uniform, low: 0, high: 1}\n"),
                                            r"space\.yaml: model\.lrr: not a field of the recipe's config", 2),
    "tune storage that cannot be opened": Bad(nothing, tune_with("model.lr: {type: uniform, low: 0.001, high: 0.01}\n",
                                                                 "--storage", "nosuchdb://host/x"),
                                              r"^error: --storage nosuchdb://host/x: cannot be opened", 2),
}


def run_command(arguments: list[str], capsys) -> tuple[int, str]:
    if arguments[0] == "TRAIN":
        arguments = ["train", *arguments[1:]]
    result = runner.invoke(app, arguments)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a bug: show its traceback
    return result.exit_code, result.output


def test_the_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 25


@pytest.mark.parametrize("name", list(CORPUS))
def test_a_bad_input_gets_one_line_and_changes_nothing_written(name: str, world: World, tmp_path: Path,
                                                               capsys) -> None:
    bad = CORPUS[name]
    data = tmp_path / "data"
    case = data / "Task1" / "AB" / world.pid
    shutil.copytree(world.source, case)
    bad.breaks(case)
    before = snapshot(world.written)
    code, output = run_command(bad.command(world, data, tmp_path), capsys)
    assert "Traceback" not in output, output
    pattern = bad.message.format(case=re.escape(str(case)), data=re.escape(str(data)))
    lines = [line for line in output.splitlines() if re.search(pattern, line)]
    assert lines, f"{name}: expected /{pattern}/ in:\n{output}"
    if code != 0:
        error_lines = [line for line in output.splitlines() if line.startswith("error: ")]
        assert error_lines and all(re.search(pattern, line) for line in error_lines[:1]), output
    assert code == bad.exit_code, f"{name}: exit {code}\n{output}"
    after = snapshot(world.written)
    kept = {key: value for key, value in before.items() if not is_manifest(key)}
    assert {key: after.get(key) for key in kept} == kept, f"{name}: changed what was already written"
    (world.pred / "predict_manifest.json").unlink(missing_ok=True)


def is_manifest(relative: str) -> bool:
    """Run manifests record the latest run's outcome: they are meant to be rewritten."""
    return relative.endswith("predict_manifest.json") or ".manifests/" in relative


def test_evaluate_scores_only_what_the_manifest_lists(world: World, tmp_path: Path) -> None:
    """Issue 32 item 4: a stale prediction of another case is named and not scored; without the
    manifest it would be; a case the manifest records as failed is a failure, not a stale score."""
    data = tmp_path / "data"
    shutil.copytree(world.source, data / "Task1" / "AB" / world.pid)
    second_distinct_case(data / "Task1" / "AB" / world.pid)
    arguments = evaluate_stale_predictions(world, data, tmp_path)
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "scores.json").read_text())
    assert [row["pid"] for row in report["cases"]] == [world.pid] and report["unlisted_files"] == [f"{SECOND}.mha"]
    assert "1 case(s): 1 processed, 0 skipped, 0 failed" in result.output

    manifest = tmp_path / "pred_copy" / "predict_manifest.json"
    manifest.write_text(json.dumps({"processed": [world.pid], "failures": {SECOND: f"{SECOND}: broken mr"}}))
    result = runner.invoke(app, arguments)
    assert result.exit_code == 1 and f"error: {SECOND}: no prediction listed in {manifest} (predict failed" in result.output

    manifest.unlink()
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0 and "not in the manifest" not in result.output
    assert sorted(row["pid"] for row in json.loads((tmp_path / "scores.json").read_text())["cases"]) == [world.pid, SECOND]
