"""`latent encode`: files -> canonical grid -> frozen VAE -> latent cache, end to end on phantoms.

One tiny random VAE encodes three session phantoms (one per region) once (module fixtures,
read-only); tests that change anything copy the data and/or the cache first. The grid is coarse
(8 mm in-plane) so a 32^3 volume still holds every phantom body (at most ~11 % of a body falls
outside) and one encode takes a fraction of a second on a busy CPU.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.networks.nets import AutoencoderKL
from typer.testing import CliRunner

from latent.cache import CacheError, LatentCache, LatentPairDataset, latent_statistics, list_producers, sha256_file
from latent.app.encode_run import encode_dataset
from latent.core.cases import discover_cases, save_splits
from latent.app.cli import app
from latent.core.grid import SHAPE_MULTIPLE, body_extent_mm, parse_grid_spec
from latent.core.io import read_volume, write_volume
from latent.core.prepare import latent_mask, prepare_case, read_native
from latent.core.vae.loading import load_vae, save_vae_dir
from latent.core.vae.inference import encode_mu

GRID = "10x10x6:32x32x32"
LATENT_SHAPE = (4, 8, 8, 8)  # (C, d, h, w) of GRID with the x4 VAE
TINY_VAE = dict(
    spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4, channels=(8, 8, 16),
    num_res_blocks=1, norm_num_groups=4, attention_levels=(False, False, False),
    with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False,
)
#: float16 storage: relative rounding error <= 2**-11; allow twice that, plus a subnormal floor.
F16_RTOL, F16_ATOL = 2.0**-10, 1e-5
ALL_KEYS = ("mr_mu", "ct_mu", "mask_latent", "mr_pixels", "ct_pixels", "mask_pixels")

runner = CliRunner()


class SimulatedCrash(Exception):
    """Stands in for a crash in the middle of writing a case (not an input error)."""


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # The tiny convolutions run several times faster on one thread than on two contended
    # cores. Every encode in this module runs under this one setting, so runs compare exactly.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def vae_dirs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny VAE folders, same architecture, different random weights."""
    root = tmp_path_factory.mktemp("vaes")
    dirs = {}
    for name, seed in (("a", 0), ("b", 1)):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoencoderKL(**TINY_VAE)
        dirs[name] = save_vae_dir(model, {"class_name": "AutoencoderKL", "kwargs": TINY_VAE}, root / f"vae_{name}")
    return dirs


@pytest.fixture(scope="module")
def vae_a(vae_dirs):
    return load_vae(str(vae_dirs["a"]))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, phantom_root) -> Path:
    """The first phantom of each region (three cases). Read-only."""
    firsts = {}
    for case in discover_cases(phantom_root):
        firsts.setdefault(case.region, case.pid)
    return subset_root(phantom_root, tmp_path_factory.mktemp("data"), list(firsts.values()))


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, data_root, vae_a):
    """``data_root`` encoded once, unsharded, with VAE a: (cache path, report). Read-only."""
    path = tmp_path_factory.mktemp("base") / "latents.zarr"
    report = encode_dataset(data_root, path, vae_a, GRID, quiet=True)
    return path, report


def all_pids(root: Path) -> list[str]:
    return [case.pid for case in discover_cases(root)]


def subset_root(source: Path, out: Path, pids: list[str]) -> Path:
    """A writable data set holding copies of some cases of ``source``."""
    for case in discover_cases(source):
        if case.pid in pids:
            shutil.copytree(case.folder, out / "Task1" / case.region / case.pid)
    return out


def copy_cache(path: Path, out: Path) -> Path:
    return Path(shutil.copytree(path, out))


def read_all(cache: LatentCache) -> dict[str, dict[str, np.ndarray]]:
    return {pid: cache.read_case(pid, as_float32=False) for pid in cache.case_ids()}


def write_ids(cache: LatentCache) -> dict[str, str]:
    return {pid: cache.case_attrs(pid)["write_id"] for pid in cache.case_ids()}


def assert_same_arrays(left: dict, right: dict) -> None:
    assert sorted(left) == sorted(right)
    for pid in left:
        assert sorted(left[pid]) == sorted(right[pid]), pid
        for key in left[pid]:
            np.testing.assert_array_equal(left[pid][key], right[pid][key], err_msg=f"{pid} {key}")


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------------- (a) cache == direct encode


def test_cached_samples_equal_a_direct_encode_of_the_prepared_case(encoded, data_root, vae_a):
    path, report = encoded
    pids = all_pids(data_root)
    assert report.encoded == pids and not report.skipped and not report.failures
    cache = LatentCache.open(path, report.producer_key)
    assert cache.case_ids() == pids
    # asked out of order: item i must be the i-th case asked for, not the i-th one cached
    dataset = LatentPairDataset(cache, [pids[2], pids[0]], keys=("mr_mu", "ct_mu", "mask_latent"), normalise=False)
    assert len(dataset) == 2 and dataset[0]["pid"] == pids[2]
    item = dataset[1]
    case = discover_cases(data_root)[0]
    assert item["pid"] == case.pid == pids[0]
    prepared = prepare_case(case, parse_grid_spec(GRID))
    direct = {
        "mr_mu": encode_mu(vae_a, torch.from_numpy(prepared.mr_unit)[None, None])[0],
        "ct_mu": encode_mu(vae_a, torch.from_numpy(prepared.ct_vae)[None, None])[0],
    }
    for key, expected in direct.items():
        assert item[key].dtype == torch.float32 and tuple(item[key].shape) == LATENT_SHAPE
        assert expected.std() > 1e-3  # a real latent, not a constant both sides could agree on
        # the posterior mean: a stored sample (mu + sigma * eps, sigma ~ 1 for a random VAE)
        # or another case's latent would be far outside float16 rounding
        np.testing.assert_allclose(item[key].numpy(), expected.numpy(), rtol=F16_RTOL, atol=F16_ATOL)
    assert not torch.allclose(item["mr_mu"], item["ct_mu"], atol=1e-2)
    assert not torch.allclose(item["mr_mu"], dataset[0]["mr_mu"], atol=1e-2)
    mask = latent_mask(prepared.mask, 4)
    assert 0 < mask.mean() < 1
    np.testing.assert_array_equal(item["mask_latent"].numpy(), mask[None].astype(np.float32))

    pixels = cache.read_case(case.pid, ["mr_pixels", "ct_pixels", "mask_pixels"])
    np.testing.assert_allclose(pixels["mr_pixels"], prepared.mr_unit, rtol=F16_RTOL, atol=F16_ATOL)
    np.testing.assert_allclose(pixels["ct_pixels"], prepared.ct_full, rtol=F16_RTOL, atol=F16_ATOL)
    np.testing.assert_array_equal(pixels["mask_pixels"], prepared.mask)
    attrs = cache.case_attrs(case.pid)
    assert attrs["region"] == case.region and attrs["centre"] == case.centre
    assert attrs["source_sha256"] == {role: sha256_file(getattr(case, role)) for role in ("mr", "ct", "mask")}
    assert attrs["geometry"] == json.loads(json.dumps(prepared.mapping.to_dict()))


# ---------------------------------------------------------------------- (b) resume and change detection


def test_rerun_skips_complete_cases_and_a_changed_source_reencodes_only_its_case(tmp_path, encoded, data_root, vae_a):
    _, base_report = encoded
    pids = all_pids(data_root)[:2]
    root = subset_root(data_root, tmp_path / "data", pids)
    path = tmp_path / "latents.zarr"
    assert encode_dataset(root, path, vae_a, GRID, quiet=True).encoded == pids

    rerun = encode_dataset(root, path, vae_a, GRID, quiet=True)
    assert rerun.producer_key == base_report.producer_key
    assert rerun.skipped == pids and rerun.encoded == [] and rerun.failures == {}

    cache = LatentCache.open(path, rerun.producer_key)
    before_ids, before = write_ids(cache), read_all(cache)
    changed = pids[1]
    mr_path = next(case.mr for case in discover_cases(root) if case.pid == changed)
    mr, properties = read_volume(mr_path)
    ramp = np.linspace(0.4, 1.6, mr.shape[2], dtype=np.float32)  # a bias field: survives per-volume scaling
    write_volume(mr_path, mr.astype(np.float32) * ramp, properties)

    stale = invoke("cache", "verify", path, "--sources")
    assert stale.exit_code == 1
    assert f"{changed}: source mr" in stale.output and "changed since it was cached" in stale.output

    update = encode_dataset(root, path, vae_a, GRID, quiet=True)
    assert update.encoded == [changed]
    assert update.skipped == [pid for pid in pids if pid != changed]
    cache = LatentCache.open(path, update.producer_key)
    after_ids, after = write_ids(cache), read_all(cache)
    assert [pid for pid in pids if after_ids[pid] != before_ids[pid]] == [changed]
    assert cache.source_hashes(changed)["mr"] == sha256_file(mr_path)
    assert np.abs(after[changed]["mr_mu"].astype(np.float32) - before[changed]["mr_mu"]).max() > 1e-2
    np.testing.assert_array_equal(after[changed]["ct_mu"], before[changed]["ct_mu"])  # CT untouched
    assert_same_arrays({p: after[p] for p in pids if p != changed}, {p: before[p] for p in pids if p != changed})
    sources = {pid: cache.case_attrs(pid)["source_paths"] for pid in pids}
    # the statistics are frozen: re-encoding one of their cases makes them stale, never silently new
    assert cache.verify(sources) == ["latent_stats are stale: their cases were rewritten or removed"]
    encode_dataset(root, path, vae_a, GRID, recompute_stats=True, quiet=True)
    assert cache.verify(sources) == []
    assert invoke("cache", "verify", path, "--sources").exit_code == 0


# ---------------------------------------------------------------------- (c) interruption


def test_case_interrupted_mid_write_is_invisible_and_encoded_next_run(tmp_path, encoded, data_root, vae_a, monkeypatch):
    base_path, base_report = encoded
    pids = all_pids(data_root)[:2]
    root = subset_root(data_root, tmp_path / "data", pids)
    path = tmp_path / "latents.zarr"
    victim = pids[1]
    writing: dict[str, str] = {}
    seen_mid_write: dict[str, object] = {}
    real_write_case, real_write_array = LatentCache.write_case, LatentCache._write_array

    def write_case(self, pid, *args, **kwargs):
        writing["pid"] = pid
        return real_write_case(self, pid, *args, **kwargs)

    def write_array(self, group, name, data):
        if writing["pid"] == victim and name == "mr_pixels":  # latents and latent mask already on disk
            reader = LatentCache.open(path, self.key)
            seen_mid_write.update(ids=reader.case_ids(), has=reader.has_case(victim, need=()),
                                  staging=[p.name for p in (reader.group_dir / "staging").iterdir() if p.is_dir()])
            raise SimulatedCrash(f"crash while writing {victim}/{name}")
        return real_write_array(self, group, name, data)

    monkeypatch.setattr(LatentCache, "write_case", write_case)
    monkeypatch.setattr(LatentCache, "_write_array", write_array)
    with pytest.raises(SimulatedCrash):
        encode_dataset(root, path, vae_a, GRID, quiet=True)
    monkeypatch.undo()

    # a reader during the write saw only the finished case; the partial one sat in staging
    assert seen_mid_write["ids"] == [pids[0]] and seen_mid_write["has"] is False
    victim_digest = hashlib.sha256(victim.encode()).hexdigest()[:12]  # staging names carry the pid's digest
    assert [name.split(".")[0] for name in seen_mid_write["staging"]] == [victim_digest]
    cache = LatentCache.open(path, base_report.producer_key)
    assert cache.case_ids() == [pids[0]]
    assert not cache.has_case(victim, need=())
    assert [p for p in (cache.group_dir / "staging").iterdir() if p.is_dir()] == []  # partial write removed
    assert cache.latent_stats() is None  # the run never finished: no statistics from a partial set

    resumed = encode_dataset(root, path, vae_a, GRID, quiet=True)
    assert resumed.skipped == [pids[0]] and resumed.encoded == pids[1:] and not resumed.failures
    cache = LatentCache.open(path, resumed.producer_key)
    assert cache.case_ids() == pids and cache.verify() == []
    base = LatentCache.open(base_path, base_report.producer_key)
    assert_same_arrays(read_all(cache), {pid: base.read_case(pid, as_float32=False) for pid in pids})


# ---------------------------------------------------------------------- (d) shards


def test_two_shards_together_equal_one_unsharded_run(tmp_path, encoded, data_root, vae_a):
    base_path, base_report = encoded
    pids = all_pids(data_root)
    path = tmp_path / "latents.zarr"
    first = encode_dataset(data_root, path, vae_a, GRID, shard=(0, 2), quiet=True)
    cache = LatentCache.open(path, first.producer_key)
    assert first.encoded == pids[0::2] and cache.case_ids() == pids[0::2]
    assert cache.latent_stats() is None  # half the cases are missing: no statistics yet
    second = encode_dataset(data_root, path, vae_a, GRID, shard=(1, 2), quiet=True)
    assert second.encoded == pids[1::2] and not second.skipped
    assert first.producer_key == second.producer_key == base_report.producer_key
    manifests = sorted(p.name for p in path.with_name(path.name + ".manifests").iterdir())
    assert manifests == [f"encode_{first.producer_key}_shard0of2.json", f"encode_{first.producer_key}_shard1of2.json"]

    cache = LatentCache.open(path, first.producer_key)
    base = LatentCache.open(base_path, base_report.producer_key)
    assert cache.case_ids() == base.case_ids() == pids
    assert_same_arrays(read_all(cache), read_all(base))
    stats, base_stats = cache.latent_stats(), base.latent_stats()
    for key in ("mr_mu", "ct_mu"):
        assert stats[key]["pids"] == base_stats[key]["pids"] == pids
        np.testing.assert_allclose(stats[key]["mean"], base_stats[key]["mean"], rtol=1e-12)
        np.testing.assert_allclose(stats[key]["std"], base_stats[key]["std"], rtol=1e-12)
    with pytest.raises(ValueError, match="shard 2/2"):
        encode_dataset(data_root, path, vae_a, GRID, shard=(2, 2), quiet=True)


# ---------------------------------------------------------------------- (e) producers


def test_a_different_vae_writes_its_own_producer_group(tmp_path, encoded, data_root, vae_dirs):
    base_path, base_report = encoded
    pids = all_pids(data_root)[:1]
    root = subset_root(data_root, tmp_path / "data", pids)
    path = copy_cache(base_path, tmp_path / "latents.zarr")
    base_before = LatentCache.open(path, base_report.producer_key)
    ids_a, arrays_a = write_ids(base_before), read_all(base_before)

    vae_b = load_vae(str(vae_dirs["b"]))
    report_b = encode_dataset(root, path, vae_b, GRID, quiet=True)
    assert report_b.producer_key != base_report.producer_key
    assert report_b.encoded == pids and report_b.skipped == []  # group a's copies are not reused

    producers = list_producers(path)
    assert sorted(producers) == sorted([base_report.producer_key, report_b.producer_key])
    record_a, record_b = producers[base_report.producer_key], producers[report_b.producer_key]
    assert record_a["vae_weights_sha256"] != record_b["vae_weights_sha256"]
    assert record_b["vae_weights_sha256"] == sha256_file(vae_dirs["b"] / "model.safetensors")
    assert record_a["grid"] == record_b["grid"]

    cache_a = LatentCache.open(path, base_report.producer_key)
    cache_b = LatentCache.open(path, report_b.producer_key)
    assert cache_b.case_ids() == pids
    assert write_ids(cache_a) == ids_a
    assert_same_arrays(read_all(cache_a), arrays_a)
    for pid in pids:
        b = cache_b.read_case(pid, ["mr_mu"])["mr_mu"]
        assert np.abs(b - arrays_a[pid]["mr_mu"].astype(np.float32)).max() > 1e-2
    with pytest.raises(CacheError, match="not cached"):
        LatentPairDataset(cache_b, [all_pids(data_root)[2]], keys=("mr_mu",), normalise=False)

    ambiguous = invoke("cache", "info", path)
    assert ambiguous.exit_code == 2 and "holds 2 producers" in ambiguous.output
    chosen = invoke("cache", "info", path, "--producer", report_b.producer_key, "--json")
    assert chosen.exit_code == 0, chosen.output
    assert json.loads(chosen.stdout)["cases"] == 1


# ---------------------------------------------------------------------- (f) one bad input


def test_a_corrupt_case_is_reported_and_does_not_stop_the_others(tmp_path, data_root, vae_a, vae_dirs):
    pids = all_pids(data_root)[:2]
    root = subset_root(data_root, tmp_path / "data", pids)
    bad = pids[0]  # first, so the good case after it shows that the run went on
    ct_path = next(case.ct for case in discover_cases(root) if case.pid == bad)
    ct_path.write_bytes(ct_path.read_bytes()[: ct_path.stat().st_size // 2])
    path = tmp_path / "latents.zarr"

    report = encode_dataset(root, path, vae_a, GRID, quiet=True)
    assert report.encoded == [pids[1]]
    assert list(report.failures) == [bad] and bad in report.failures[bad] and "ct.mha" in report.failures[bad]
    manifest = json.loads(report.manifest.read_text())
    assert manifest["failures"] == report.failures
    assert manifest["encoded"] == [pids[1]] and manifest["producer_key"] == report.producer_key
    cache = LatentCache.open(path, report.producer_key)
    assert cache.case_ids() == [pids[1]]
    assert cache.latent_stats()["ct_mu"]["pids"] == [pids[1]]  # the usable cases

    # sharded, the bad case's shard first: the good shard still completes the statistics
    sharded = tmp_path / "sharded.zarr"
    assert list(encode_dataset(root, sharded, vae_a, GRID, shard=(0, 2), quiet=True).failures) == [bad]
    assert LatentCache.open(sharded, report.producer_key).latent_stats() is None  # pids[1] not encoded yet
    assert encode_dataset(root, sharded, vae_a, GRID, shard=(1, 2), quiet=True).encoded == [pids[1]]
    assert LatentCache.open(sharded, report.producer_key).latent_stats()["ct_mu"]["pids"] == [pids[1]]

    command = ("encode", "--data", root, "--cache", path, "--vae", vae_dirs["a"], "--grid", GRID, "--quiet")
    strict = invoke(*command)
    assert strict.exit_code == 1, strict.output
    assert "encoded 0, already cached 1, failed 1" in strict.stdout
    assert bad in strict.stderr and "1 case(s) failed" in strict.stderr
    assert f"failure manifest: {report.manifest}" in strict.stderr
    lenient = invoke(*command, "--keep-going")
    assert lenient.exit_code == 0, lenient.output
    assert bad in lenient.stderr


# ---------------------------------------------------------------------- (g) cache info / verify


def test_cache_info_and_verify_cli(tmp_path, encoded, data_root):
    path, report = encoded
    info = invoke("cache", "info", path)
    assert info.exit_code == 0, info.output
    assert report.producer_key in info.stdout
    assert "shape [32, 32, 32]" in info.stdout and "cases        3 {'AB': 1, 'HN': 1, 'TH': 1}" in info.stdout

    as_json = json.loads(invoke("cache", "info", path, "--json").stdout)
    assert as_json["producer_key"] == report.producer_key and as_json["cases"] == 3
    assert as_json["arrays"] == dict.fromkeys(ALL_KEYS, 3)
    assert as_json["latent_downsample"] == 4
    assert 0 < as_json["sizes"]["ratio"] <= 0.5  # float16 plus Blosc against raw float32
    stats = LatentCache.open(path, report.producer_key).latent_stats()
    assert as_json["scale_factor"] == {key: stats[key]["scale_factor"] for key in ("mr_mu", "ct_mu")}
    assert as_json["writes_in_flight"] == 0

    ok = invoke("cache", "verify", path, "--sources")
    assert ok.exit_code == 0 and "ok: 3 cases verified" in ok.stdout

    damaged = copy_cache(path, tmp_path / "damaged.zarr")
    victim = all_pids(data_root)[1]
    chunk = next((damaged / "producers" / report.producer_key / "cases" / victim / "ct_mu" / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    broken = invoke("cache", "verify", damaged)
    assert broken.exit_code == 1
    assert f"problem: {victim}: ct_mu: unreadable" in broken.stderr

    empty = tmp_path / "empty.zarr"
    LatentCache(empty, LatentCache.open(path, report.producer_key).record)  # group, no cases yet
    none_yet = invoke("cache", "info", empty)
    assert none_yet.exit_code == 0, none_yet.output
    assert "cases        0" in none_yet.stdout and "ratio n/a" in none_yet.stdout


# ---------------------------------------------------------------------- (h) automatic grid


def coarsen_case(case, out: Path, spacing: tuple[float, float, float]) -> None:
    """Resample a phantom case to a coarser spacing (x, y, z), same origin and direction."""
    out.mkdir(parents=True)
    for role, interpolator, outside in (("mr", sitk.sitkLinear, 0), ("ct", sitk.sitkLinear, -1000),
                                        ("mask", sitk.sitkNearestNeighbor, 0)):
        image = sitk.ReadImage(str(getattr(case, role)))
        size = [int(round(n * old / new)) for n, old, new in zip(image.GetSize(), image.GetSpacing(), spacing)]
        coarse = sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), spacing,
                               image.GetDirection(), outside, image.GetPixelID())
        sitk.WriteImage(coarse, str(out / f"{role}.mha"), True)


def test_auto_grid_is_the_smallest_multiple_of_32_covering_every_body(tmp_path, phantom_root, vae_a):
    # Coarse copies of the two head-and-neck phantoms keep the automatic grid at 32^3-64^3.
    spacings = {"1HNA001": (7.5, 7.5, 6.0), "1HNB001": (8.5, 8.5, 6.5)}
    cases = {case.pid: case for case in discover_cases(phantom_root)}
    root = tmp_path / "data"
    for pid, spacing in spacings.items():
        coarsen_case(cases[pid], root / "Task1" / "HN" / pid, spacing)
    extents = [body_extent_mm(mask, properties) for _, mask, _, properties in map(read_native, discover_cases(root))]
    path = tmp_path / "latents.zarr"

    report = encode_dataset(root, path, vae_a, "auto", quiet=True)
    assert report.encoded == sorted(spacings) and not report.failures
    grid = report.grid
    assert all(n % SHAPE_MULTIPLE == 0 for n in grid.shape)
    np.testing.assert_allclose(grid.spacing, np.median(list(spacings.values()), axis=0), rtol=1e-6)
    field_of_view = np.asarray(grid.shape[::-1]) * grid.spacing  # (x, y, z) mm
    largest = np.max(extents, axis=0)
    assert np.all(field_of_view >= largest) and report.coverage == 1.0
    one_step_smaller = field_of_view - SHAPE_MULTIPLE * np.asarray(grid.spacing)
    minimal = (one_step_smaller < largest) | (np.asarray(grid.shape[::-1]) == SHAPE_MULTIPLE)
    assert minimal.all(), (grid, largest)

    cache = LatentCache.open(path, report.producer_key)
    assert cache.record["grid"]["shape"] == list(grid.shape)
    np.testing.assert_allclose(cache.record["grid"]["spacing"], grid.spacing)
    arrays = cache.read_case(report.encoded[0], ["mr_mu", "mr_pixels"])
    assert arrays["mr_pixels"].shape == grid.shape
    assert arrays["mr_mu"].shape == (4, *(n // 4 for n in grid.shape))
    assert json.loads(report.manifest.read_text())["grid"]["shape"] == list(grid.shape)


# ---------------------------------------------------------------------- (i) latent statistics


def test_latent_statistics_cover_the_split_train_cases(tmp_path, encoded, data_root, vae_a):
    base_path, base_report = encoded
    pids = all_pids(data_root)
    base_stats = LatentCache.open(base_path, base_report.producer_key).latent_stats()
    assert base_stats["ct_mu"]["pids"] == pids and base_stats["mr_mu"]["n_cases"] == 3  # no split: all

    path = copy_cache(base_path, tmp_path / "latents.zarr")
    train = [pids[0], pids[2]]
    split = save_splits({"train": train, "val": [], "test": [pids[1]]}, tmp_path / "split.json")
    report = encode_dataset(data_root, path, vae_a, GRID, split_file=split, quiet=True)
    cache = LatentCache.open(path, report.producer_key)
    assert cache.latent_stats() == base_stats  # frozen: another split alone changes nothing
    report = encode_dataset(data_root, path, vae_a, GRID, split_file=split, recompute_stats=True, quiet=True)
    assert report.skipped == pids  # nothing re-encoded; only the statistics change

    stats = cache.latent_stats()
    for key in ("mr_mu", "ct_mu"):
        assert stats[key]["pids"] == train and stats[key]["n_cases"] == 2
        blocks = np.stack([cache.read_case(pid, [key])[key].astype(np.float64) for pid in train], axis=1)
        flat = blocks.reshape(blocks.shape[0], -1)  # (C, cases * voxels)
        np.testing.assert_allclose(stats[key]["mean"], flat.mean(axis=1), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(stats[key]["std"], flat.std(axis=1), rtol=1e-9)
        assert stats[key]["scale_factor"] == pytest.approx(1 / flat.std())
        assert not np.allclose(stats[key]["mean"], base_stats[key]["mean"])
        expected = latent_statistics(cache.read_case(pid, [key])[key] for pid in train)
        np.testing.assert_allclose(stats[key]["std"], expected["std"])
    assert cache.verify() == []
    dataset = LatentPairDataset(cache, train, keys=("ct_mu",))
    standardised = torch.cat([dataset[i]["ct_mu"].flatten(1) for i in range(len(dataset))], dim=1)
    np.testing.assert_allclose(standardised.mean(dim=1).numpy(), np.zeros(4), atol=1e-4)
    np.testing.assert_allclose(standardised.std(dim=1, unbiased=False).numpy(), np.ones(4), atol=1e-4)


def test_without_a_split_file_the_statistics_leave_the_default_test_cases_out(tmp_path, data_root, vae_a):
    from latent.core.cases import make_splits

    root = tmp_path / "nine"
    for case in discover_cases(data_root):  # three cases per region: the default split then has a test case
        for number in range(1, 4):
            pid = f"{case.pid[:4]}{number:03d}"
            copy = Path(shutil.copytree(case.folder, root / "Task1" / case.region / pid))
            mr, properties = read_volume(copy / "mr.mha")
            mr.flat[0] += number  # not byte-identical copies: those are refused as one patient twice
            write_volume(copy / "mr.mha", mr, properties)
    cases = discover_cases(root)
    splits = make_splits(cases)
    assert splits["test"], "the default split must hold test cases for this check"
    report = encode_dataset(root, tmp_path / "latents.zarr", vae_a, GRID, quiet=True)
    stats = LatentCache.open(tmp_path / "latents.zarr", report.producer_key).latent_stats()
    assert stats["ct_mu"]["pids"] == splits["train"]
    assert not set(stats["ct_mu"]["pids"]) & set(splits["test"] + splits["val"])
