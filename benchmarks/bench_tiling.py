"""Tiling without waste: the automatic tiling plan's cost and seam error against one untiled pass.

For each VAE (the shipped stand-in with its trained weights, and the released MAISI architecture
with random weights), each part (encode, decode) and each margin, the activation limit is lowered
until the volume no longer fits one pass, so ``encode_mu`` / ``decode`` tile it with the plan of
``latent.core.vae.tiling.plan_tiles``. Recorded per row: the plan (window, windows per axis), the
voxels it processes over the volume's, the tiled over the untiled network seconds (target <= 1.25),
and the seam error: the relative L2 of the tiled latent (encode) or image (decode) against the
untiled one, and for the stand-in's decode the MAE in HU inside the body. The input is one phantom
CT on a canonical grid (real anatomy for the trained stand-in). Times are medians of ``--repeats``
runs in this process, with ``--threads`` torch threads.

    python benchmarks/bench_tiling.py [--margins 16,32,64] [--repeats 3] [--note "..."]

Writes ``benchmarks/results/bench_tiling.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from latent.core.cases import discover_cases  # noqa: E402
from latent.core.grid import parse_grid_spec  # noqa: E402
from latent.core.intensity import VAE_CT_MAX_HU, VAE_CT_MIN_HU  # noqa: E402
from latent.core.phantom.generate import generate_phantom_dataset  # noqa: E402
from latent.core.prepare import prepare_case  # noqa: E402
from latent.core.provenance import git_revision, machine_description  # noqa: E402
from latent.core.vae.loading import MAISI_CONFIG, LoadedVAE, build_vae, load_vae  # noqa: E402
from latent.core.vae.inference import decode, encode_mu  # noqa: E402
from latent.core.vae.tiling import largest_activation, plan_tiles  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TIME_TARGET = 1.25
#: (VAE, canonical grid of the input): the stand-in at a 2 mm grid of the AB phantom, MAISI at a smaller one (CPU time).
SETUPS = {"standin": "1.5x1.5x3:64x256x256", "maisi-random": "3x3x5:32x128x128"}


def _vae(name: str) -> LoadedVAE:
    if name == "standin":
        return load_vae("standin")
    torch.manual_seed(0)
    network = build_vae("AutoencoderKlMaisi", MAISI_CONFIG)
    return LoadedVAE(network, "maisi-random", "AutoencoderKlMaisi", dict(MAISI_CONFIG), "0" * 64)


def _case(grid: str, work: Path):
    """One AB phantom (the longest region) on ``grid``: CT in the VAE window [0, 1] and the body mask."""
    generate_phantom_dataset(work / grid.replace(":", "_"), 1, ["AB"], seed=5, size="small")
    prepared = prepare_case(discover_cases(work / grid.replace(":", "_"))[0], parse_grid_spec(grid))
    return torch.from_numpy(prepared.ct_vae[None, None].astype(np.float32)), prepared.mask > 0


def _timed(function, repeats: int) -> tuple[float, torch.Tensor]:
    function()  # warm-up (allocator, thread pool)
    runs, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs), result


def _relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _tight_limit(vae: LoadedVAE, shape: tuple[int, ...], part: str) -> int:
    """A limit just below the whole volume's largest convolution tensor: one pass no longer fits."""
    spatial = shape if part == "encode" else tuple(s // vae.downsample_factor for s in shape)
    return largest_activation(vae, spatial, part)[0]


def rows_for(name: str, grid: str, margins: list[int], repeats: int, work: Path) -> list[dict]:
    """Untiled and tiled encode and decode of one phantom CT, one row per (part, margin)."""
    vae = _vae(name)
    ct, mask = _case(grid, work)
    shape = tuple(ct.shape[2:])
    untiled = {"encode": _timed(lambda: encode_mu(vae, ct), repeats)}
    latent = untiled["encode"][1]
    untiled["decode"] = _timed(lambda: decode(vae, latent), repeats)
    rows = []
    for part in ("encode", "decode"):
        limit = _tight_limit(vae, shape, part)
        for margin in margins:
            plan = plan_tiles(vae, shape, part, limit=limit, margin=margin)
            if part == "encode":
                seconds, tiled = _timed(lambda: encode_mu(vae, ct, activation_limit=limit, tile_margin=margin), repeats)
            else:
                seconds, tiled = _timed(lambda: decode(vae, latent, activation_limit=limit, tile_margin=margin), repeats)
            row = {"vae": name, "grid": grid, "part": part, "margin": margin, "window": list(plan.window),
                   "counts": list(plan.counts), "voxel_ratio": round(plan.voxel_ratio(shape), 4),
                   "untiled_s": round(untiled[part][0], 3), "tiled_s": round(seconds, 3),
                   "time_ratio": round(seconds / untiled[part][0], 3),
                   "seam_relative_l2": _relative_l2(tiled, untiled[part][1])}
            if part == "decode":
                scale = VAE_CT_MAX_HU - VAE_CT_MIN_HU
                difference = (tiled - untiled[part][1])[0, 0].numpy() * scale
                row["seam_mae_hu_body"] = float(np.abs(difference[mask]).mean())
                row["seam_max_hu_body"] = float(np.abs(difference[mask]).max())
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def markdown(report: dict) -> str:
    lines = ["# Tiling without waste (CPU)", "", f"Machine: {report['machine']}; torch {report['torch']}, "
             f"{report['threads']} threads; git {report['git_revision'][:12]}; median of {report['repeats']} runs.", ""]
    lines += [f"Note: {note}" for note in report["notes"]] + ([""] if report["notes"] else [])
    lines += ["| VAE | grid | part | margin | window (z, y, x) | windows | voxels / one pass | untiled s | tiled s | "
              f"time / untiled (target <= {TIME_TARGET}) | seam rel. L2 | seam MAE HU (body) | seam max HU |",
              "|" + "---|" * 13]
    for row in report["rows"]:
        lines.append(
            f"| {row['vae']} | {row['grid']} | {row['part']} | {row['margin']} | {'x'.join(map(str, row['window']))} | "
            f"{'x'.join(map(str, row['counts']))} | {row['voxel_ratio']:.3f} | {row['untiled_s']:.2f} | "
            f"{row['tiled_s']:.2f} | {row['time_ratio']:.2f} | {row['seam_relative_l2']:.2e} | "
            f"{row.get('seam_mae_hu_body', math.nan):.2f} | {row.get('seam_max_hu_body', math.nan):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--margins", default="16,32,64", help="image voxels neighbouring windows share")
    parser.add_argument("--vaes", default=",".join(SETUPS), help="standin and/or maisi-random")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--note", action="append", default=[])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    margins = [int(m) for m in args.margins.split(",")]
    report = {"machine": machine_description(), "torch": torch.__version__, "threads": args.threads,
              "git_revision": git_revision(), "repeats": args.repeats, "notes": args.note,
              "load_average_start": list(os.getloadavg()), "platform": platform.platform(), "rows": []}
    with tempfile.TemporaryDirectory() as work:
        for name in args.vaes.split(","):
            report["rows"] += rows_for(name, SETUPS[name], margins, args.repeats, Path(work))
    report["load_average_end"] = list(os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_tiling.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "bench_tiling.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
