"""Latent cache: producer keys, atomic writes, crash safety, statistics, dataset, verify."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import latent.cache.store as store_module
from latent.core.cases import CaseError
from latent.cache import (
    CacheError,
    CaseExistsError,
    CaseNotFoundError,
    LatentCache,
    LatentPairDataset,
    ProducerNotFoundError,
    destandardise,
    list_producers,
    producer_key,
    producer_record,
    sha256_file,
    standardise,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
LATENT = (4, 4, 8, 8)  # (C, d, h, w): tiny, but every rule still applies
PIXELS = (16, 32, 32)  # 4 x latent grid
WEIGHTS_A = "1f8a7a056d0ebc00486edc43c26768bf1c12eaa6df9dd172e34598003be95eb3"
WEIGHTS_B = "b5ed556dc64872cae11ebe67cc33e84fbd05ebdf7e35e40c74d956404e7c1ef0"


def vae(weights=WEIGHTS_A, channels=4, **extra):
    return {"weights_sha256": weights, "config": {"latent_channels": channels}, **extra}


GRID = {"spacing": [1.0, 1.0, 3.0], "shape": list(PIXELS)}
NORM = {"ct": {"clip": [-1000, 1000]}, "mr": {"percentile": 99.5}}


def record(**changes):
    args = {"vae_info": vae(), "grid": GRID, "normalisation": NORM, **changes}
    return producer_record(**args)


def make_case(seed, ct=True, pixels=True, offset=0.0, latent=LATENT):
    """A case whose pixel volumes are the latent's channel 0 repeated 4x per axis."""
    rng = np.random.default_rng(seed)
    mr_mu = (rng.normal(size=latent) + offset).astype(np.float32)
    arrays = {"mr_mu": mr_mu, "mask_latent": (mr_mu[0] > 0).astype(np.uint8)}
    if ct:
        arrays["ct_mu"] = (2.0 * mr_mu + 1.0).astype(np.float32)
    if pixels:
        up = mr_mu[0].repeat(4, 0).repeat(4, 1).repeat(4, 2)
        arrays.update(mr_pixels=up, ct_pixels=-up, mask_pixels=(up > 0).astype(np.uint8))
    return arrays


def attrs(region="AB", centre="A", **more):
    return {"region": region, "centre": centre, "geometry": {"native_size": [30, 40, 50]},
            "source_sha256": {"mr": "0" * 64}, **more}


@pytest.fixture
def store(tmp_path):
    return LatentCache(tmp_path / "data.zarr", record())


def f16(array):
    return np.asarray(array, dtype=np.float16).astype(np.float32)


# ---------------------------------------------------------------------- producer keys


def test_producer_key_is_canonical_and_sensitive_to_every_input():
    key = producer_key(vae(), GRID, NORM)
    assert len(key) == 16 and int(key, 16) >= 0
    same = producer_key(vae(path="/elsewhere/ae.pt"), {"shape": (16, 32, 32), "spacing": (1, 1, 3)},
                        {"mr": {"percentile": 99.5}, "ct": {"clip": (-1000.0, 1000.0)}})
    assert same == key  # tuple/list, 1 vs 1.0, key order and file location do not matter
    different = {
        producer_key(vae(weights=WEIGHTS_B), GRID, NORM),
        producer_key(vae(channels=8), GRID, NORM),
        producer_key(vae(), {**GRID, "shape": [32, 32, 32]}, NORM),
        producer_key(vae(), GRID, {**NORM, "mr": {"percentile": 99.0}}),
        producer_key(vae(), GRID, NORM, schema_version=2),
        producer_key(vae(layout="RAS"), GRID, NORM),  # any non-location vae_info entry counts
    }
    assert len(different) == 6 and key not in different
    assert record(vae_info=vae(path="/x/ae.pt"))["vae_location"] == {"path": "/x/ae.pt"}
    assert record()["grid"]["spacing"] == [1.0, 1.0, 3.0]  # stored as given; only the hash
    assert isinstance(record()["grid"]["spacing"][0], float)  # input is canonicalised
    with pytest.raises(ValueError, match="weights_sha256"):
        producer_key({"weights_sha256": "abc", "config": {}}, GRID, NORM)
    with pytest.raises(ValueError, match="grid.spacing"):
        producer_key(vae(), {"spacing": [float("nan")]}, NORM)


def test_producer_groups_never_mix(tmp_path):
    path = tmp_path / "data.zarr"
    cache_a = LatentCache(path, record())
    cache_b = LatentCache(path, record(grid={**GRID, "shape": [32, 32, 32]}))
    cache_a.write_case("1ABA001", make_case(0), attrs())
    assert cache_a.key != cache_b.key
    assert cache_b.case_ids() == [] and not cache_b.has_case("1ABA001")
    assert set(list_producers(path)) == {cache_a.key, cache_b.key}
    reopened = LatentCache.open(path, cache_a.key)
    assert reopened.record == cache_a.record and reopened.case_ids() == ["1ABA001"]
    with pytest.raises(ProducerNotFoundError) as err:
        LatentCache.open(path, "0123456789abcdef")
    assert cache_a.key in str(err.value) and cache_b.key in str(err.value)
    with pytest.raises(ProducerNotFoundError, match=cache_a.key):
        LatentCache.open(path, record(vae_info=vae(weights=WEIGHTS_B)))  # read-only: no create


# ---------------------------------------------------------------------- round trip


def test_write_read_round_trip(store):
    arrays = make_case(1)
    assert store.downsample is None
    store.write_case("1ABA001", arrays, attrs(extra_note="x", spacing=[1.0, 1.0, 3.0]))
    assert store.downsample == 4  # fixed by the first case with pixel volumes
    store.write_case("1HNC002", make_case(2, ct=False, pixels=False), attrs(region="HN", centre="C"))
    out = store.read_case("1ABA001")
    assert list(out) == ["mr_mu", "ct_mu", "mask_latent", "mr_pixels", "ct_pixels", "mask_pixels"]
    for key in ("mr_mu", "ct_mu", "mr_pixels", "ct_pixels"):
        assert out[key].dtype == np.float32
        np.testing.assert_array_equal(out[key], f16(arrays[key]))  # exact after float16 rounding
    for key in ("mask_latent", "mask_pixels"):
        assert out[key].dtype == np.uint8
        np.testing.assert_array_equal(out[key], arrays[key])
    assert store.read_case("1ABA001", ["ct_mu"], as_float32=False)["ct_mu"].dtype == np.float16
    got = store.case_attrs("1ABA001")
    assert (got["region"], got["centre"], got["extra_note"], got["status"]) == ("AB", "A", "x", "complete")
    assert got["spacing"] == [1.0, 1.0, 3.0] and isinstance(got["spacing"][0], float)
    assert got["geometry"] == {"native_size": [30, 40, 50]}
    assert store.source_hashes("1ABA001") == {"mr": "0" * 64}
    assert store.case_ids() == ["1ABA001", "1HNC002"] and store.case_ids(region="HN") == ["1HNC002"]
    assert store.has_case("1HNC002") and not store.has_case("1HNC002", need=("mr_mu", "ct_mu"))
    with pytest.raises(KeyError, match="1HNC002 has no \\['ct_mu'\\]"):
        store.read_case("1HNC002", ["ct_mu"])
    with pytest.raises(CaseNotFoundError, match="1XXX999"):
        store.read_case("1XXX999")


def test_float32_storage_is_exact_and_empty_arrays_are_stored(tmp_path):
    cache = LatentCache(tmp_path / "f32.zarr", record(), float_dtype="float32")
    arrays = make_case(3)
    cache.write_case("1ABA001", arrays, attrs())
    np.testing.assert_array_equal(cache.read_case("1ABA001", ["mr_mu"])["mr_mu"], arrays["mr_mu"])
    # all-zero arrays still get their chunk file, so a missing chunk always means damage
    cache.write_case("1ABA002", {**arrays, "mask_latent": np.zeros(LATENT[1:], np.uint8)}, attrs())
    assert (cache.group_dir / "cases" / "1ABA002" / "mask_latent" / "c" / "0" / "0" / "0").is_file()
    assert cache.verify() == []
    # preloaded float32 arrays are handed out as copies, never as views a caller could edit
    preloaded = LatentPairDataset(cache, ["1ABA001"], keys=("mr_pixels",), preload=True, normalise=False)
    preloaded[0]["mr_pixels"].fill_(123.0)
    assert torch.equal(preloaded[0]["mr_pixels"][0], torch.from_numpy(arrays["mr_pixels"]))


def test_write_rejects_bad_input(store):
    good = make_case(4)
    bad_inputs = [
        ({**good, "extra": good["mr_mu"]}, attrs(), "unknown array keys"),
        ({"ct_mu": good["ct_mu"]}, attrs(), "required"),
        ({**good, "mr_pixels": good["mr_pixels"][:-1]}, attrs(), "mr_pixels shape"),
        ({**good, "ct_mu": good["ct_mu"][:3]}, attrs(), "ct_mu shape"),
        ({**good, "mask_latent": good["mask_latent"] * 2}, attrs(), "only 0 and 1"),
        ({**good, "mr_mu": np.full(LATENT, np.nan)}, attrs(), "NaN"),
        ({**good, "mr_mu": np.full(LATENT, 1e6)}, attrs(), "float16 range"),
        (make_case(4, latent=(3, 4, 8, 8)), attrs(), "3 channels"),
        (good, {"centre": "A"}, "region"),
        (good, attrs(source_sha256={"mr": "xyz"}), "source_sha256"),
        (good, attrs(status="complete"), "set by the cache"),
    ]
    for arrays, case_attrs, message in bad_inputs:
        with pytest.raises(ValueError, match=message):
            store.write_case("1ABA001", arrays, case_attrs)
    with pytest.raises(ValueError, match="case id"):
        store.write_case("../escape", good, attrs())
    assert store.case_ids() == [] and staged(store) == []
    store.write_case("1ABA001", good, attrs())
    with pytest.raises(CaseExistsError, match="overwrite=True"):
        store.write_case("1ABA001", good, attrs())
    half = {key: value[::2, ::2, ::2] for key, value in good.items() if key.endswith("pixels")}
    with pytest.raises(ValueError, match=r"mr_pixels shape \(8, 16, 16\) != 4 x latent grid"):
        store.write_case("1ABA002", {**good, **half}, attrs())  # factor 2 after factor 4


# ---------------------------------------------------------------------- atomicity


def staged(cache):
    return [p for p in (cache.group_dir / "staging").iterdir() if p.is_dir()]


def test_exception_during_write_leaves_case_invisible(store, monkeypatch):
    store.write_case("1ABA001", make_case(5), attrs())
    original = LatentCache._write_array
    calls = []

    def failing(self, group, name, data):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        original(self, group, name, data)

    monkeypatch.setattr(LatentCache, "_write_array", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        store.write_case("1ABA002", make_case(6), attrs())
    with pytest.raises(RuntimeError, match="disk full"):
        calls.clear()
        store.write_case("1ABA001", make_case(7), attrs(), overwrite=True)
    assert not store.has_case("1ABA002") and store.case_ids() == ["1ABA001"]
    assert staged(store) == []
    np.testing.assert_array_equal(store.read_case("1ABA001")["mr_mu"], f16(make_case(5)["mr_mu"]))
    monkeypatch.setattr(LatentCache, "_write_array", original)
    store.write_case("1ABA002", make_case(6), attrs())
    assert store.case_ids() == ["1ABA001", "1ABA002"] and store.verify() == []


CHILD = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from latent.cache.store import LatentCache

    class StallsAfterFirstArray(LatentCache):
        def _write_array(self, group, name, data):
            super()._write_array(group, name, data)
            with open(sys.argv[3] + ".tmp", "w") as handle:
                handle.write(name)
            os.replace(sys.argv[3] + ".tmp", sys.argv[3])  # the parent never sees an empty sentinel
            time.sleep(120)  # the parent kills us here

    cache = StallsAfterFirstArray(sys.argv[2], json.loads(sys.argv[4]))
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(4, 16, 32, 32)).astype(np.float32)
    pixels = rng.random((64, 128, 128)).astype(np.float32)
    cache.write_case("1ABA009", {"mr_mu": latent, "ct_mu": latent, "mr_pixels": pixels,
                                 "ct_pixels": pixels}, {"region": "AB"})
""")


def test_sigkill_during_write_leaves_store_readable(tmp_path):
    path, sentinel = tmp_path / "data.zarr", tmp_path / "first_array_written"
    cache = LatentCache(path, record(vae_info=vae()))
    cache.write_case("1ABA001", make_case(8), attrs())
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(REPO_ROOT), str(path), str(sentinel),
                              json.dumps(cache.record)])
    try:
        deadline = time.monotonic() + 60
        while not sentinel.exists():
            assert child.poll() is None, "writer exited before the first array was written"
            assert time.monotonic() < deadline, "writer never wrote its first array"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL and sentinel.read_text() == "mr_mu"
    (leftover,) = staged(cache)  # the half-written case: first array on disk, nothing else
    digest = hashlib.sha256(b"1ABA009").hexdigest()[:12]  # the pid's digest: a long pid fits a file name
    assert leftover.name.startswith(f"{digest}.{child.pid}.")
    assert (leftover / "mr_mu" / "c" / "0" / "0" / "0" / "0").is_file()
    assert not (leftover / "ct_mu").exists()

    reader = LatentCache.open(path, cache.key)  # read-only: sees the store as it was
    assert reader.case_ids() == ["1ABA001"] and not reader.has_case("1ABA009")
    assert reader.read_case("1ABA001")["mr_mu"].shape == LATENT
    writer = LatentCache(path, cache.record)  # opening for writing removes the dead leftover
    assert staged(writer) == []
    writer.write_case("1ABA009", make_case(9), attrs())
    assert writer.case_ids() == ["1ABA001", "1ABA009"] and writer.verify() == []


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_overwrite_swaps_whole_case(store, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(store_module, "_exchange_dirs", lambda a, b: False)
    store.write_case("1ABA001", make_case(10), attrs(centre="A"))
    store.write_case("1ABA001", make_case(11, ct=False, pixels=False), attrs(centre="B"),
                     overwrite=True)
    assert store.array_keys("1ABA001") == ["mr_mu", "mask_latent"]
    assert store.case_attrs("1ABA001")["centre"] == "B"
    np.testing.assert_array_equal(store.read_case("1ABA001")["mr_mu"], f16(make_case(11)["mr_mu"]))
    leftovers = [p for sub in ("staging", "trash") for p in (store.group_dir / sub).iterdir()
                 if p.is_dir()]
    assert leftovers == []


def test_read_overlapping_an_overwrite_never_mixes_versions(store, monkeypatch):
    old, new = make_case(50), make_case(51, offset=5.0)
    store.write_case("1ABA001", old, attrs())
    original_read = LatentCache._read_array
    reads = []

    def read_then_overwrite(cache, pid, write_id, array_dir):
        value = original_read(cache, pid, write_id, array_dir)
        reads.append(os.path.basename(array_dir))
        if len(reads) == 1:  # another writer replaces the case between our two arrays
            store.write_case("1ABA001", new, attrs(), overwrite=True)
        return value

    monkeypatch.setattr(LatentCache, "_read_array", read_then_overwrite)
    out = store.read_case("1ABA001", ["mr_mu", "ct_mu"])
    assert reads == ["mr_mu", "ct_mu", "mr_mu", "ct_mu"]  # the mixed first read was retried
    np.testing.assert_array_equal(out["mr_mu"], f16(new["mr_mu"]))
    np.testing.assert_array_equal(out["ct_mu"], f16(new["ct_mu"]))


def test_delete_case(store):
    store.write_case("1ABA001", make_case(52), attrs())
    store.delete_case("1ABA001")
    assert store.case_ids() == [] and not store.has_case("1ABA001")
    assert staged(store) == [] and [p for p in (store.group_dir / "trash").iterdir() if p.is_dir()] == []
    with pytest.raises(CaseNotFoundError):
        store.delete_case("1ABA001")
    store.write_case("1ABA001", make_case(53), attrs())
    assert store.case_ids() == ["1ABA001"]


def test_crash_between_fallback_renames_restores_old_case(store):
    store.write_case("1ABA001", make_case(12), attrs())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    moved = store.group_dir / "trash" / f"1ABA001.{dead.pid}.abc.{store_module._HOST}"
    os.rename(store.group_dir / "cases" / "1ABA001", moved)  # as if killed between renames
    live = store.group_dir / "staging" / f"1ABA002.{os.getpid()}.def.{store_module._HOST}"
    live.mkdir()  # a writer that is still running: must be left alone
    assert store.case_ids() == []
    reopened = LatentCache(store.path, store.record)
    assert reopened.case_ids() == ["1ABA001"] and live.is_dir()
    np.testing.assert_array_equal(reopened.read_case("1ABA001")["mr_mu"], f16(make_case(12)["mr_mu"]))


# ---------------------------------------------------------------------- statistics


def test_latent_stats_match_numpy(store):
    cases = {"1ABA001": make_case(13, offset=0.5), "1ABA002": make_case(14, offset=-1.0),
             "1ABA003": make_case(15, ct=False, offset=3.0)}
    for pid, arrays in cases.items():
        store.write_case(pid, arrays, attrs())
    assert store.latent_stats() is None
    stats = store.update_latent_stats(cases)
    for key, pids in (("mr_mu", list(cases)), ("ct_mu", ["1ABA001", "1ABA002"])):
        values = np.concatenate([f16(cases[p][key]).reshape(4, -1) for p in pids], axis=1)
        values = values.astype(np.float64)
        np.testing.assert_allclose(stats[key]["mean"], values.mean(axis=1), rtol=1e-12)
        np.testing.assert_allclose(stats[key]["std"], values.std(axis=1), rtol=1e-12)
        np.testing.assert_allclose(stats[key]["scale_factor"], 1.0 / values.std(), rtol=1e-12)
        assert stats[key]["pids"] == pids
    assert store.latent_stats() == json.loads(json.dumps(stats))
    assert store.info()["scale_factor"]["ct_mu"] == pytest.approx(stats["ct_mu"]["scale_factor"])


# ---------------------------------------------------------------------- dataset
# (torch.testing.assert_close is avoided on purpose: in torch 2.13 its first call imports
# torch.distributed.tensor and sympy, several seconds on this CPU.)


@pytest.fixture
def filled(store):
    for i, region in enumerate(["AB", "AB", "HN"]):
        store.write_case(f"1{region}A00{i}", make_case(20 + i, offset=i), attrs(region=region))
    store.update_latent_stats(store.case_ids())
    return store


def test_dataset_crops_are_aligned_between_latent_and_pixel_keys(filled):
    keys = ("mr_mu", "mask_latent", "mr_pixels", "mask_pixels")
    data = LatentPairDataset(filled, filled.case_ids(), keys=keys, crop=(2, 4, 3), normalise=False)
    item = data[1]
    assert item["pid"] == "1ABA001"
    assert item["mr_mu"].shape == (4, 2, 4, 3) and item["mask_latent"].shape == (1, 2, 4, 3)
    assert item["mr_pixels"].shape == (1, 8, 16, 12) and item["mr_pixels"].dtype == torch.float32
    upsampled = item["mr_mu"][0].repeat_interleave(4, 0).repeat_interleave(4, 1).repeat_interleave(4, 2)
    assert torch.equal(item["mr_pixels"][0], upsampled)
    assert torch.equal(item["mask_pixels"][0], (upsampled > 0).float())
    assert torch.equal(item["mask_latent"][0], (item["mr_mu"][0] > 0).float())
    assert torch.equal(data[1]["mr_mu"], item["mr_mu"])  # same (seed, epoch, index)
    epoch0 = [data[i]["mr_mu"] for i in range(len(data))]
    data.set_epoch(1)
    assert any(not torch.equal(a, data[i]["mr_mu"]) for i, a in enumerate(epoch0))



def test_a_case_smaller_than_the_crop_is_padded_with_its_edge_and_empty_mask(filled):
    keys = ("mr_mu", "mask_latent", "mr_pixels", "mask_pixels")
    item = LatentPairDataset(filled, filled.case_ids(), keys=keys, crop=(6, 8, 8), normalise=False)[0]
    stored = filled.read_case(filled.case_ids()[0], ["mr_mu", "mr_pixels"])
    assert item["mr_mu"].shape == (4, 6, 8, 8) and item["mr_pixels"].shape == (1, 24, 32, 32)
    assert torch.equal(item["mr_mu"][:, :4], torch.from_numpy(stored["mr_mu"]))
    # the two added slices repeat the last stored one; the masks there are empty
    assert torch.equal(item["mr_mu"][:, 5], torch.from_numpy(stored["mr_mu"][:, 3]))
    assert torch.equal(item["mr_pixels"][0, 16:], torch.from_numpy(stored["mr_pixels"][15:16]).expand(8, 32, 32))
    assert not item["mask_latent"][:, 4:].any() and not item["mask_pixels"][:, 16:].any()


def test_body_biased_crops_are_centred_on_the_body(store):
    arrays = make_case(5)
    arrays["mask_latent"] = np.zeros(LATENT[1:], np.uint8)
    arrays["mask_latent"][3, 7, 7] = 1  # one body voxel in a corner
    store.write_case("1ABA009", arrays, attrs())
    store.update_latent_stats(store.case_ids())
    biased = LatentPairDataset(store, ["1ABA009"], crop=(1, 1, 1), body_fraction=1.0, normalise=False)
    uniform = LatentPairDataset(store, ["1ABA009"], crop=(1, 1, 1), normalise=False)
    corner = torch.from_numpy(f16(arrays["mr_mu"][:, 3:4, 7:8, 7:8]))  # stored as float16
    hits = [torch.equal(biased[0]["mr_mu"], corner) for biased.epoch in range(5)]
    assert all(hits) and "mask_latent" not in biased[0]
    assert not all(torch.equal(uniform[0]["mr_mu"], corner) for uniform.epoch in range(5))


def test_dataset_preload_standardise_and_split(filled, tmp_path):
    pids = filled.case_ids()
    lazy = LatentPairDataset(filled, pids, keys=("mr_mu", "ct_mu", "ct_pixels"), crop=2)
    loaded = LatentPairDataset(filled, pids, keys=("mr_mu", "ct_mu", "ct_pixels"), crop=2, preload=True)
    for i in range(len(pids)):
        for key in ("mr_mu", "ct_mu", "ct_pixels"):
            assert torch.equal(lazy[i][key], loaded[i][key])
    full = LatentPairDataset(filled, pids)
    standardised = torch.cat([full[i]["ct_mu"].reshape(4, -1) for i in range(len(full))], dim=1)
    np.testing.assert_allclose(standardised.mean(1).numpy(), np.zeros(4), atol=1e-5)
    np.testing.assert_allclose(standardised.std(1, unbiased=False).numpy(), np.ones(4), atol=1e-5)
    stats = filled.latent_stats()["ct_mu"]
    batch = torch.stack([full[i]["ct_mu"] for i in range(len(full))])  # (B, C, d, h, w)
    raw = torch.stack([torch.from_numpy(filled.read_case(p, ["ct_mu"])["ct_mu"]) for p in pids])
    np.testing.assert_allclose(destandardise(batch, stats["mean"], stats["std"]).numpy(), raw.numpy(),
                               atol=1e-5)
    as_numpy = standardise(raw.numpy(), stats["mean"], stats["std"])
    np.testing.assert_allclose(as_numpy, batch.numpy(), atol=1e-5)

    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": pids[:2], "val": pids[2:], "test": []}))
    val = LatentPairDataset.from_split(filled, split, "val", keys=("mr_mu",))
    assert len(val) == 1 and val[0]["pid"] == pids[2]
    with pytest.raises(CaseError, match=r"no split 'holdout' \(has test, train, val\)"):
        LatentPairDataset.from_split(filled, split, "holdout")
    filled.write_case("1THA009", make_case(30, ct=False), attrs(region="TH"))
    with pytest.raises(CacheError, match="1THA009"):
        LatentPairDataset(filled, ["1THA009"], keys=("mr_mu", "ct_mu"))
    loader = torch.utils.data.DataLoader(lazy, batch_size=3, num_workers=1)
    (batch,) = list(loader)
    assert batch["mr_mu"].shape == (3, 4, 2, 2, 2) and batch["pid"] == pids


# ---------------------------------------------------------------------- info and verify


def test_info_and_size_report(filled):
    info = filled.info()
    assert info["producer_key"] == filled.key and info["producer"]["vae_weights_sha256"] == WEIGHTS_A
    assert info["cases"] == 3 and info["cases_per_region"] == {"AB": 2, "HN": 1}
    assert info["arrays"]["mr_mu"] == 3 and info["arrays"]["ct_pixels"] == 3
    assert info["latent_downsample"] == 4 and info["writes_in_flight"] == 0
    per_key, sizes = info["sizes"]["per_key"], info["sizes"]
    assert per_key["mr_mu"]["raw_float32_bytes"] == 3 * 4 * int(np.prod(LATENT))
    assert per_key["ct_mu"]["raw_bytes"] == 3 * 2 * int(np.prod(LATENT))  # float16
    assert per_key["mask_pixels"]["raw_bytes"] == 3 * int(np.prod(PIXELS))  # uint8
    assert sizes["raw_float32_bytes"] == sum(row["raw_float32_bytes"] for row in per_key.values())
    assert 0 < sizes["stored_bytes"] < sizes["raw_bytes"] < sizes["raw_float32_bytes"]
    chunk_files = [f for f in filled.group_dir.joinpath("cases").rglob("*")
                   if f.is_file() and f.parent.name == "0" and f.name == "0"]
    assert sizes["stored_bytes"] == sum(f.stat().st_size for f in chunk_files)
    # pixel volumes are latents repeated 4x per axis: highly compressible
    assert filled.compression_ratio(keys=["mr_pixels"]) < 0.2
    assert filled.compression_ratio(reference="float32") == pytest.approx(
        sizes["stored_bytes"] / sizes["raw_float32_bytes"])
    assert sizes["ratio"] == filled.compression_ratio(reference="float32")


def test_verify_flags_damage(filled, tmp_path):
    assert filled.verify() == []
    case_dir = filled.group_dir / "cases"
    # 1) a ct_mu whose shape no longer matches mr_mu (written around the cache's checks)
    group = zarr.open_group(case_dir / "1ABA000", mode="a")
    group.create_array("ct_mu", shape=(4, 4, 8, 7), dtype="float16", overwrite=True)[...] = 1
    # 2) a flipped byte in a chunk (caught by the CRC32C codec)
    chunk = case_dir / "1ABA001" / "mr_mu" / "c" / "0" / "0" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    # 3) a deleted chunk (zarr would read it as zeros) and 4) a malformed stored hash
    (case_dir / "1HNA002" / "ct_pixels" / "c" / "0" / "0" / "0").unlink()
    meta_path = case_dir / "1HNA002" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["source_sha256"] = {"mr": "not-a-hash"}
    meta_path.write_text(json.dumps(meta))
    problems = filled.verify()
    assert any(p.startswith("1ABA000: ct_mu shape (4, 4, 8, 7) != mr_mu shape") for p in problems)
    assert any(p.startswith("1ABA001: mr_mu: unreadable") and "checksum" in p for p in problems)
    assert "1HNA002: ct_pixels: chunk file missing (would read as zeros)" in problems
    assert any(p.startswith("1HNA002: malformed source_sha256") for p in problems)
    assert "latent_stats are stale: their cases were rewritten or removed" not in problems


def test_verify_rehashes_sources(store, tmp_path):
    source = tmp_path / "mr.mha"
    source.write_bytes(b"original")
    store.write_case("1ABA001", make_case(40), attrs(source_sha256={"mr": sha256_file(source)}))
    store.update_latent_stats(["1ABA001"])
    assert store.verify({"1ABA001": {"mr": source}}) == []
    source.write_bytes(b"edited")
    problems = store.verify({"1ABA001": {"mr": source, "ct": tmp_path / "ct.mha"}, "1ABA404": {}})
    assert problems == [
        f"1ABA001: source mr ({source}) changed since it was cached",
        "1ABA001: no stored hash for source 'ct'",
        "1ABA404: source paths given but the case is not in the cache",
    ]
    store.write_case("1ABA001", make_case(41), attrs(source_sha256={"mr": sha256_file(source)}),
                     overwrite=True)
    assert store.verify({"1ABA001": {"mr": source}}) == [
        "latent_stats are stale: their cases were rewritten or removed"]


# ---------------------------------------------------------------------- fast chunk read


def test_fast_chunk_read_equals_zarr_and_falls_back_for_other_layouts(filled, tmp_path):
    from latent.cache.chunk_read import read_single_chunk

    case_dir = filled.group_dir / "cases" / "1ABA001"
    for key in filled.array_keys("1ABA001"):
        fast = read_single_chunk(case_dir / key)
        reference = zarr.open_array(case_dir / key, mode="r")[...]
        assert fast is not None and fast.dtype == reference.dtype and fast.flags.writeable
        np.testing.assert_array_equal(fast, reference)
    # several chunks, or another codec chain: not the cache's layout -> None, read_case uses zarr
    chunked = zarr.create_array(tmp_path / "chunked", shape=(4, 6), chunks=(2, 6), dtype="float32")
    chunked[...] = np.arange(24, dtype=np.float32).reshape(4, 6)
    assert read_single_chunk(tmp_path / "chunked") is None
    plain = zarr.create_array(tmp_path / "plain", shape=(4, 6), chunks=(4, 6), dtype="float32", compressors=None)
    plain[...] = 1.0
    assert read_single_chunk(tmp_path / "plain") is None
    # an array rewritten in several chunks (around the cache) is still read, through zarr
    expected = filled.read_case("1ABA001", ["mr_mu"])["mr_mu"]
    group = zarr.open_group(case_dir, mode="a")
    group.create_array("mr_mu", shape=expected.shape, chunks=(2, 2, 4, 4), dtype="float32", overwrite=True)[...] = expected
    assert read_single_chunk(case_dir / "mr_mu") is None
    reopened = LatentCache.open(filled.path, filled.key)
    np.testing.assert_array_equal(reopened.read_case("1ABA001", ["mr_mu"])["mr_mu"], expected)


def test_fast_chunk_read_refuses_damaged_chunks_naming_the_file(filled):
    from latent.cache.chunk_read import ChunkError

    chunk = filled.group_dir / "cases" / "1ABA001" / "mr_mu" / "c" / "0" / "0" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(ChunkError, match=f"{chunk}: CRC32C checksum mismatch"):
        filled.read_case("1ABA001", ["mr_mu"])
    chunk.unlink()
    with pytest.raises(ChunkError, match="chunk file missing"):
        filled.read_case("1ABA001", ["mr_mu"])
    np.testing.assert_array_equal(filled.read_case("1ABA000", ["mr_mu"])["mr_mu"], f16(make_case(20)["mr_mu"]))


def test_one_producer_pick_for_every_caller(tmp_path: Path) -> None:
    from latent.cache import ProducerNotFoundError, pick_producer

    with pytest.raises(ProducerNotFoundError, match="cache not found"):
        pick_producer(tmp_path / "none.zarr", None)
    first = LatentCache(tmp_path / "c.zarr", record())
    assert pick_producer(tmp_path / "c.zarr", "auto") == (first.key, list_producers(tmp_path / "c.zarr")[first.key])
    with pytest.raises(ProducerNotFoundError, match=r"data\.producer: 'f+' is not in .*present: " + first.key):
        pick_producer(tmp_path / "c.zarr", "f" * 16, option="data.producer")
    second = LatentCache(tmp_path / "c.zarr", record(vae_info=vae(weights="1" * 64)))
    with pytest.raises(ProducerNotFoundError, match=r"--producer: .* holds 2 producers"):
        pick_producer(tmp_path / "c.zarr", None)
    assert pick_producer(tmp_path / "c.zarr", second.key)[0] == second.key


@pytest.mark.parametrize("preload", [False, True])
def test_excluded_slices_are_kept_out_of_crops_and_masks(filled, preload: bool):
    """``latent qa``'s flagged slices (canonical pixel z): crops avoid them, body masks are empty there."""
    keys = ("mr_mu", "mask_latent", "mr_pixels", "mask_pixels")
    pid = filled.case_ids()[0]  # latent depth 4 = pixel depth 16
    excluded = [5, 6]  # inside latent slice 1
    data = LatentPairDataset(filled, [pid], keys=keys, crop=(1, 4, 4), normalise=False, preload=preload,
                             exclude_z={pid: excluded})
    stored = filled.read_case(pid, ["mr_mu"])["mr_mu"]
    for data.epoch in range(12):  # a 1-slice latent crop: never latent slice 1
        item = data[0]
        assert not any(torch.equal(item["mr_mu"], torch.from_numpy(f16(stored[:, 1:2, y:y + 4, x:x + 4])))
                       for y in range(5) for x in range(5))
    whole = LatentPairDataset(filled, [pid], keys=keys, normalise=False, preload=preload, exclude_z={pid: excluded})[0]
    assert not whole["mask_pixels"][0, 5:7].any() and not whole["mask_latent"][0, 1].any()
    plain = LatentPairDataset(filled, [pid], keys=keys, normalise=False, preload=preload)[0]
    assert plain["mask_pixels"][0, :5].equal(whole["mask_pixels"][0, :5])  # elsewhere unchanged
    assert plain["mask_pixels"][0, 5:7].any()  # and the stored data is untouched
