"""Latent cache against re-encoding: epoch time, size on disk and read throughput.

On a phantom set (default 12 small cases) encoded at the demo grid by a small random VAE of the
MAISI family (AutoencoderKL, channels 16/32/64, 4 latent channels, x4), it measures:

- **epoch**: one pass over the train split as a trainer sees it, ``LatentPairDataset`` (keys
  ``mr_mu``, ``ct_mu``, ``mask_latent``; ``preload=False``; standardised) against producing the
  same samples from the source files (read + ``prepare_case`` + ``encode_mu`` of MR and CT +
  latent mask + the same standardisation). Both paths are checked to give the same samples.
  Target: cache >= 50x faster.
- **size**: stored bytes / raw float32 bytes over every array in the cache
  (``LatentCache.compression_ratio(reference="float32")``). Target <= 0.5.
- **read throughput**: ``LatentCache.read_case`` against reading the same chunk files and
  decoding them with numcodecs' Blosc alone (no zarr, no CRC check), MB/s of decoded array bytes,
  median of alternating rounds. Target: ratio >= 0.7 over whole cases (all six arrays); the ratio
  for the three small training arrays is reported beside it.
- **training data path** (``benchmarks/cache_training.py``): loader stall share while training
  ``configs/l2l_regress_demo.yaml`` on the cache (target <= 5 %) and the cold start of
  ``translate/train.py`` on it, launch -> first optimiser step (target <= 15 s).

    .venv/bin/python benchmarks/bench_cache.py [--cases N] [--grid SPEC] [--threads T] [--only-training]

Writes ``benchmarks/results/bench_cache.json`` and ``.md`` (machine load noted) and exits 1 when
a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_training import training_markdown, training_path, training_table  # noqa: E402  (benchmarks/ helper)

RESULTS = Path(__file__).resolve().parent / "results"
#: Targets of the cache (issue): epoch speed-up, stored / raw float32 size, read / raw-decode speed.
TARGET_SPEEDUP = 50.0
TARGET_SIZE_RATIO = 0.5
TARGET_READ_RATIO = 0.7
DEMO_GRID = "3x3x4:32x128x128"
#: A demo-size VAE of the MAISI family: 4 latent channels, x4 downsampling, no attention.
DEMO_VAE = dict(
    spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4, channels=(16, 32, 64),
    num_res_blocks=1, norm_num_groups=16, attention_levels=(False, False, False),
    with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False,
)
TRAIN_KEYS = ("mr_mu", "ct_mu", "mask_latent")
#: Both epoch paths must agree to float16 storage precision (standardised units, |z| of a few).
SAME_SAMPLE_ATOL = 1e-2


def load_note() -> str:
    """The 1/5/15-min load averages."""
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def make_vae(folder: Path, seed: int):
    """Save a fresh random demo VAE with ``save_vae_dir`` and load it like a user's VAE."""
    import torch
    from monai.networks.nets import AutoencoderKL

    from latent.core.vae.loading import load_vae, save_vae_dir

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoencoderKL(**DEMO_VAE)
    save_vae_dir(model, {"class_name": "AutoencoderKL", "kwargs": DEMO_VAE, "name": "bench-cache-demo"}, folder)
    return load_vae(str(folder))


def cache_epoch(dataset) -> tuple[float, list[dict]]:
    """Seconds for one pass over the dataset, and the samples."""
    start = time.perf_counter()
    items = [dataset[index] for index in range(len(dataset))]
    return time.perf_counter() - start, items


def reencode_epoch(cases, grid, vae, stats: dict) -> tuple[float, list[dict]]:
    """The same samples produced from the source files: read, prepare, encode, standardise."""
    import torch

    from latent.cache import standardise
    from latent.core.prepare import latent_mask, prepare_case
    from latent.core.vae.inference import encode_mu

    start = time.perf_counter()
    items = []
    for case in cases:
        prepared = prepare_case(case, grid)
        item = {"pid": case.pid}
        for key, volume in (("mr_mu", prepared.mr_unit), ("ct_mu", prepared.ct_vae)):
            latent = encode_mu(vae, torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None])[0]
            item[key] = standardise(latent, stats[key]["mean"], stats[key]["std"])
        mask = latent_mask(prepared.mask, vae.downsample_factor)
        item["mask_latent"] = torch.from_numpy(mask[None].astype(np.float32))
        items.append(item)
    return time.perf_counter() - start, items


def max_sample_difference(left: list[dict], right: list[dict]) -> float:
    """Largest |difference| over every key of every sample (the pids must match in order)."""
    if [item["pid"] for item in left] != [item["pid"] for item in right]:
        raise RuntimeError("the two epochs produced different cases")
    worst = 0.0
    for a, b in zip(left, right):
        for key in TRAIN_KEYS:
            if tuple(a[key].shape) != tuple(b[key].shape):
                raise RuntimeError(f"{a['pid']} {key}: shape {tuple(a[key].shape)} != {tuple(b[key].shape)}")
            worst = max(worst, float((a[key] - b[key]).abs().max()))
    return worst


def chunk_file(cache, pid: str, key: str) -> Path:
    """The single chunk file of one array (layout ``cases/<pid>/<key>/c/...``, one chunk per array)."""
    files = [path for path in (cache.group_dir / "cases" / pid / key / "c").rglob("*") if path.is_file()]
    if len(files) != 1:
        raise RuntimeError(f"{pid}/{key}: expected one chunk file, found {len(files)}")
    return files[0]


def read_throughput(cache, pids: list[str], keys: tuple[str, ...], rounds: int) -> dict:
    """MB/s of decoded bytes: ``read_case`` against raw file read + Blosc decode of the same chunks.

    The raw path knows every file, shape and dtype in advance (no metadata work) and skips the
    CRC32C that zarr checks. ``zarr.open_array(...)[...]`` per array is timed too (informative:
    it separates zarr's own per-call cost from the cache's). Rounds rotate which path runs first.
    """
    import zarr
    from numcodecs import Blosc

    from latent.cache.store import CODECS

    blosc_config = CODECS[0].to_dict()["configuration"]
    codec = Blosc(cname=blosc_config["cname"], clevel=blosc_config["clevel"], shuffle=Blosc.SHUFFLE)
    crc_bytes = 4  # the Crc32cCodec appends a 4-byte checksum after the Blosc frame
    reference = {pid: cache.read_case(pid, keys, as_float32=False) for pid in pids}
    plan = [(pid, key, chunk_file(cache, pid, key), reference[pid][key].dtype, reference[pid][key].shape)
            for pid in pids for key in keys]
    decoded_bytes = sum(array.nbytes for arrays in reference.values() for array in arrays.values())
    stored_bytes = sum(path.stat().st_size for _, _, path, _, _ in plan)

    def read_case() -> None:
        for pid in pids:
            cache.read_case(pid, keys, as_float32=False)

    def raw_blosc() -> None:
        for _, _, path, dtype, shape in plan:
            np.frombuffer(codec.decode(path.read_bytes()[:-crc_bytes]), dtype=dtype).reshape(shape)

    def zarr_direct() -> None:
        for pid, key, _, _, _ in plan:
            zarr.open_array(cache.group_dir / "cases" / pid / key, mode="r")[...]

    # the raw decode must reproduce what the cache returns, or the comparison means nothing
    for pid, key, path, dtype, shape in plan:
        decoded = np.frombuffer(codec.decode(path.read_bytes()[:-crc_bytes]), dtype=dtype).reshape(shape)
        if not np.array_equal(decoded, reference[pid][key]):
            raise RuntimeError(f"raw Blosc decode of {path} differs from read_case")
    paths = (read_case, raw_blosc, zarr_direct)
    rates: dict[str, list[float]] = {function.__name__: [] for function in paths}
    for round_index in range(rounds):
        for function in paths[round_index % 3:] + paths[:round_index % 3]:
            start = time.perf_counter()
            function()
            rates[function.__name__].append(decoded_bytes / (time.perf_counter() - start) / 1e6)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    return {
        "keys": list(keys), "cases": len(pids), "arrays": len(plan), "decoded_bytes": decoded_bytes,
        "stored_bytes": stored_bytes, "rounds": rounds,
        "read_case_MBps": medians["read_case"], "raw_blosc_MBps": medians["raw_blosc"],
        "zarr_open_array_MBps": medians["zarr_direct"],
        "ratio": medians["read_case"] / medians["raw_blosc"],
        "MBps_rounds": rates,
    }


def build_cache(args: argparse.Namespace, work: Path, result: dict):
    """Phantom data, splits, a random demo VAE and the encoded cache; timings go into ``result``."""
    from latent.app.encode_run import encode_dataset
    from latent.core.cases import discover_cases, make_splits, save_splits
    from latent.core.phantom.generate import generate_phantom_dataset

    data, cache_path = work / "data", work / "latents.zarr"
    started = time.perf_counter()
    generate_phantom_dataset(data, args.cases, ["AB", "HN", "TH"], seed=args.seed, size="small")
    cases = discover_cases(data)
    splits = make_splits(cases, seed=args.seed)
    split_file = save_splits(splits, work / "splits.json")
    result["phantom_seconds"] = time.perf_counter() - started
    vae = make_vae(work / "vae", args.seed)

    print(f"encoding {len(cases)} cases at {args.grid} (load {load_note()}) ...", flush=True)
    report = encode_dataset(data, cache_path, vae, args.grid, split_file=split_file, quiet=True)
    if report.failures:
        raise RuntimeError(f"encode failed: {report.failures}")
    result["encode_seconds_per_case"] = report.seconds / len(report.encoded)
    return cases, splits, split_file, vae, report, cache_path


def run(args: argparse.Namespace, work: Path) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from latent.cache import LatentCache, LatentPairDataset
    from latent.core.grid import parse_grid_spec

    result: dict = {
        "benchmark": "bench_cache", "cases": args.cases, "grid": args.grid,
        "vae": {**DEMO_VAE, "weights": "random"},
        "torch_threads": args.threads, "cpus": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "load_average_start": load_note(),
    }
    if args.only_training and args.keep is not None and (work / "latents.zarr").is_dir():
        cases, split_file, cache_path = None, work / "splits.json", work / "latents.zarr"  # reuse a kept cache
    else:
        cases, splits, split_file, vae, report, cache_path = build_cache(args, work, result)
    if args.only_training:
        torch.set_num_threads(os.cpu_count() or 1)  # training as the recipe runs it
        return {"load_average_start": result["load_average_start"],
                **training_path(cache_path, split_file, work, args.steps, args.cold_runs),
                "load_average_end": load_note()}
    cache = LatentCache.open(cache_path, report.producer_key)
    stats = cache.latent_stats()

    train = splits["train"]
    dataset = LatentPairDataset(cache, train, keys=TRAIN_KEYS, preload=False)
    cache_seconds, cache_items = [], None
    for _ in range(args.epochs):
        seconds, cache_items = cache_epoch(dataset)
        cache_seconds.append(seconds)
    print(f"re-encoding the {len(train)} train cases (load {load_note()}) ...", flush=True)
    by_pid = {case.pid: case for case in cases}
    reencode_seconds, reencode_items = reencode_epoch([by_pid[pid] for pid in train], parse_grid_spec(args.grid),
                                                      vae, stats)
    difference = max_sample_difference(cache_items, reencode_items)
    if difference > SAME_SAMPLE_ATOL:
        raise RuntimeError(f"cache and re-encode samples differ by {difference:.3g} (> {SAME_SAMPLE_ATOL})")
    cache_median = statistics.median(cache_seconds)
    result["epoch"] = {
        "train_cases": len(train), "keys": list(TRAIN_KEYS), "preload": False, "standardised": True,
        "cache_seconds_median": cache_median, "cache_seconds_epochs": cache_seconds,
        "reencode_seconds": reencode_seconds, "speedup": reencode_seconds / cache_median,
        "cache_ms_per_sample": 1e3 * cache_median / len(train),
        "reencode_s_per_sample": reencode_seconds / len(train),
        "max_sample_difference": difference,
    }

    sizes = cache.size_report()
    result["size"] = {
        "ratio_vs_float32": cache.compression_ratio(reference="float32"),
        "ratio_vs_stored_dtype": cache.compression_ratio(reference="stored"),
        "latent_ratio_vs_float32": cache.compression_ratio(keys=("mr_mu", "ct_mu"), reference="float32"),
        "per_key": sizes,
    }
    all_keys = tuple(cache.array_keys(cache.case_ids()[0]))
    result["read"] = {
        "all_arrays": read_throughput(cache, cache.case_ids(), all_keys, args.rounds),
        "training_arrays": read_throughput(cache, cache.case_ids(), TRAIN_KEYS, args.rounds),
    }
    result["targets"] = {
        "speedup": {"target": f">= {TARGET_SPEEDUP:g}", "value": result["epoch"]["speedup"],
                    "met": result["epoch"]["speedup"] >= TARGET_SPEEDUP},
        "size_ratio": {"target": f"<= {TARGET_SIZE_RATIO:g}", "value": result["size"]["ratio_vs_float32"],
                       "met": result["size"]["ratio_vs_float32"] <= TARGET_SIZE_RATIO},
        "read_ratio": {"target": f">= {TARGET_READ_RATIO:g} (whole cases)",
                       "value": result["read"]["all_arrays"]["ratio"],
                       "met": result["read"]["all_arrays"]["ratio"] >= TARGET_READ_RATIO},
    }
    result["load_average_end"] = load_note()
    torch.set_num_threads(os.cpu_count() or 1)  # training as the recipe runs it
    result["training"] = {"load_average_start": load_note(),
                          **training_path(cache_path, split_file, work, args.steps, args.cold_runs),
                          "load_average_end": load_note()}
    result["targets"].update({f"training_{k}": v for k, v in result["training"]["targets"].items()})
    return result


def table(result: dict) -> list[str]:
    epoch, size, read = result["epoch"], result["size"], result["read"]
    targets = result["targets"]
    mark = {name: ("met" if row["met"] else "MISSED") for name, row in targets.items()}
    return [
        "| measure | cache | baseline | ratio | target |",
        "| --- | --- | --- | --- | --- |",
        f"| epoch over {epoch['train_cases']} train cases (s) | {epoch['cache_seconds_median']:.3f} | "
        f"{epoch['reencode_seconds']:.1f} (re-encode) | {epoch['speedup']:.0f}x faster | "
        f">= {TARGET_SPEEDUP:g}x: {mark['speedup']} |",
        f"| per sample | {epoch['cache_ms_per_sample']:.1f} ms | {epoch['reencode_s_per_sample']:.2f} s | | |",
        f"| size, all arrays (MiB) | {size['per_key']['total']['stored_bytes'] / 2**20:.2f} stored | "
        f"{size['per_key']['total']['raw_float32_bytes'] / 2**20:.2f} raw float32 | {size['ratio_vs_float32']:.3f} | "
        f"<= {TARGET_SIZE_RATIO:g}: {mark['size_ratio']} |",
        f"| size, latents only | | | {size['latent_ratio_vs_float32']:.3f} | |",
        f"| read, whole cases (MB/s) | {read['all_arrays']['read_case_MBps']:.0f} read_case | "
        f"{read['all_arrays']['raw_blosc_MBps']:.0f} raw Blosc | {read['all_arrays']['ratio']:.2f} | "
        f">= {TARGET_READ_RATIO:g}: {mark['read_ratio']} |",
        f"| read, training arrays (MB/s) | {read['training_arrays']['read_case_MBps']:.0f} read_case | "
        f"{read['training_arrays']['raw_blosc_MBps']:.0f} raw Blosc | {read['training_arrays']['ratio']:.2f} | "
        "(reported) |",
        f"| read via plain `zarr.open_array`, whole cases / training arrays (MB/s) | "
        f"{read['all_arrays']['zarr_open_array_MBps']:.0f} / {read['training_arrays']['zarr_open_array_MBps']:.0f} "
        "| | | (reference) |",
    ]


def write_results(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_cache.json").write_text(json.dumps(result, indent=2) + "\n")
    epoch = result["epoch"]
    lines = [
        "# Latent cache benchmark",
        "",
        f"{result['cases']} phantom cases (size small), grid {result['grid']}, random AutoencoderKL "
        f"channels {list(DEMO_VAE['channels'])}, 4 latent channels; {result['torch_threads']} torch thread(s), "
        f"{result['cpus']} CPUs, torch {result['torch']}, {result['platform']}.",
        f"Machine load average (1/5/15 min): {result['load_average_start']} at the start, "
        f"{result['load_average_end']} at the end (shared machine: absolute times are inflated, "
        "ratios are measured side by side).",
        "",
        *table(result),
        "",
        f"- Epoch: `LatentPairDataset` (keys {', '.join(epoch['keys'])}, preload=False, standardised), "
        f"median of {len(epoch['cache_seconds_epochs'])} epochs, against read + `prepare_case` + `encode_mu` "
        f"(MR and CT) + latent mask + standardisation of the same cases, once. Both give the same samples "
        f"(max |difference| {epoch['max_sample_difference']:.2g}, float16 storage).",
        f"- Initial encode into the cache: {result['encode_seconds_per_case']:.1f} s per case.",
        "- Size: stored chunk bytes / raw float32 bytes over every array of every case "
        "(`LatentCache.compression_ratio(reference='float32')`): float16 storage + Blosc zstd 5 byte-shuffle.",
        f"- Read: `LatentCache.read_case` vs reading the same chunk files and `numcodecs.Blosc.decode` alone "
        f"(no zarr metadata, no CRC32C), MB/s of decoded bytes, median of {result['read']['all_arrays']['rounds']} "
        "alternating rounds, files in the page cache.",
        "",
    ]
    if "training" in result:
        lines += training_markdown(result["training"], result.get("note", ""))
    (out / "bench_cache.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=12, help="phantom cases (default 12)")
    parser.add_argument("--grid", default=DEMO_GRID, help=f"canonical grid (default {DEMO_GRID})")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for encoding (default 1: fastest on a shared 2-core machine)")
    parser.add_argument("--epochs", type=int, default=5, help="cache epochs to time (median)")
    parser.add_argument("--rounds", type=int, default=7, help="read-throughput rounds (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--keep", type=Path, default=None, help="keep the data and cache in this folder")
    parser.add_argument("--steps", type=int, default=40, help="training steps of the stall measurement")
    parser.add_argument("--cold-runs", type=int, default=3, help="cold starts to time (median)")
    parser.add_argument("--only-training", action="store_true",
                        help="measure only the training data path (stall, cold start) and update that part of the "
                             "results, keeping the others")
    parser.add_argument("--note", default="", help="a remark about the machine (load, other jobs)")
    args = parser.parse_args(argv)

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_cache_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = run(args, work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.only_training:
        previous = json.loads((args.results / "bench_cache.json").read_text())
        previous["training"] = result
        previous["targets"].update({f"training_{k}": v for k, v in result["targets"].items()})
        result = previous
    result["note"] = args.note
    write_results(result, args.results)
    print("\n".join(table(result) + training_table(result["training"])))
    load = result["training"] if args.only_training else result
    print(f"load average {load['load_average_start']} -> {load['load_average_end']}; "
          f"wrote {args.results / 'bench_cache.json'} and .md")
    missed = [name for name, row in result["targets"].items() if not row["met"]]
    if missed:
        print(f"targets missed: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
