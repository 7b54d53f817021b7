"""Choose the full-size default grid by measurement: the grid floor and the cost of each canonical spacing.

On SynthRAD-size phantoms (1 x 1 x 3 mm, every region; the default seed gives abdomens longer
than the 288 mm a 96-slice grid holds) it tabulates, per grid and per case:

- the grid floor (``latent.decode.grid_floor.grid_floor_sct``: the true CT to the canonical grid and
  straight back, no model), full HU window: MAE, PSNR, MS-SSIM, bone Dice; and the MAE of the
  VAE-window floor (CT clipped to [-1000, 1000] HU on the way);
- the cost: canonical voxels, canonical / body-bounding-box voxels at that spacing (target
  <= 1.1), latent shape, the MAISI encode tiling plan (``plan_tiles``; architecture on the meta
  device), the largest convolution activation (the memory driver), the body share a fixed grid
  cuts, and encode seconds and peak RSS *estimated* from one measured MAISI fp32 encode of one
  window (random weights, ``--threads`` torch threads, median of ``--repeats``; own process).

Grids: fitted in-plane spacings (``--spacings``, z 3 mm), ``native`` (fitted at each case's own
spacing: ~0 HU), and the old fixed presets (``--fixed``, run with truncation allowed).
The choice: among the fitted spacings, the cheapest (voxels) whose mean floor MAE is <= 10 HU,
worst case <= 20 HU, and that loses no body voxel on any case; no spacing passing says so.

    python benchmarks/bench_grid_spacing.py [--cases-per-region 2] [--seed 4] [--note "..."]

Writes ``benchmarks/results/bench_grid_spacing.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from latent.decode.grid_floor import grid_floor_sct  # noqa: E402
from latent.core.cases import Case, discover_cases  # noqa: E402
from latent.core.grid import FIT_PRESETS, CanonicalGrid, body_extent_mm, parse_grid_spec, plan_mapping  # noqa: E402
from latent.evaluation.metrics import bone_dice, image_metrics  # noqa: E402
from latent.core.phantom.generate import generate_phantom_dataset  # noqa: E402
from latent.core.prepare import read_native  # noqa: E402
from latent.core.provenance import git_revision, machine_description  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MEAN_MAE_LIMIT_HU = 10.0
WORST_MAE_LIMIT_HU = 20.0
VOXEL_RATIO_TARGET = 1.1
#: z extent of the old fixed presets (96 slices x 3 mm): the default seed must exceed it in AB.
FIXED_Z_MM = 288.0
FP32_BYTES = 4
GIB = 2**30


@dataclass(frozen=True)
class GridChoice:
    """One row of the comparison: ``kind`` is ``fit`` (fitted spacing), ``native`` or ``fixed``."""

    label: str
    kind: str
    spec: str | None = None

    def resolve(self, spacing: Sequence[float]) -> CanonicalGrid:
        """The grid for a case with native ``spacing`` (x, y, z)."""
        if self.kind != "native":
            return parse_grid_spec(self.spec)
        grid = parse_grid_spec("x".join(repr(float(v)) for v in spacing) + ":fit")
        return grid if grid.spacing == tuple(float(v) for v in spacing) else CanonicalGrid(tuple(spacing), None, 4)


def grid_choices(spacings: Sequence[float], native: bool = True, fixed: Sequence[str] = ()) -> list[GridChoice]:
    """Fitted in-plane ``spacings`` (z 3 mm; preset names where one exists), native, fixed presets."""
    names = {v: k for k, v in FIT_PRESETS.items()}
    choices = [GridChoice(names.get((s, s, 3.0), f"{s:g}x{s:g}x3:fit"), "fit", f"{s:g}x{s:g}x3:fit") for s in spacings]
    return choices + ([GridChoice("native", "native")] if native else []) + [GridChoice(f, "fixed", f) for f in fixed]


def maisi_meta() -> Any:
    """The MAISI VAE architecture on the meta device (plans and activations need shapes only)."""
    import torch

    from latent.core.vae.loading import LAYOUT_MAISI, MAISI_CONFIG, LoadedVAE, build_vae

    with torch.device("meta"):
        network = build_vae("AutoencoderKlMaisi", MAISI_CONFIG, "meta")
    return LoadedVAE(network, "maisi-meta", "AutoencoderKlMaisi", dict(MAISI_CONFIG), "none", LAYOUT_MAISI)


def encode_cost(vae: Any, shape: tuple[int, int, int], throughput: dict | None) -> dict:
    """Tiling plan, largest activation and the estimated encode seconds / peak RSS of one canonical shape."""
    from latent.core.vae.tiling import largest_activation, plan_tiles

    plan = plan_tiles(vae, shape, "encode")
    window = shape if plan is None else plan.window
    windows = 1 if plan is None else math.prod(plan.counts)
    processed = windows * math.prod(window)
    activation = largest_activation(vae, window, "encode")[0] * FP32_BYTES
    cost = {"tile_window": list(window), "tile_windows": windows, "processed_voxels": processed,
            "processed_ratio": round(processed / math.prod(shape), 4), "largest_activation_bytes": activation,
            "est_encode_s": None, "est_peak_rss_gib": None}
    if throughput:
        cost["est_encode_s"] = round(processed * throughput["seconds_per_voxel"], 1)
        grow = (throughput["peak_rss_gib"] - throughput["rss_before_gib"]) / throughput["largest_activation_bytes"]
        cost["est_peak_rss_gib"] = round(throughput["rss_before_gib"] + grow * activation, 2)
    return cost


def case_rows(case: Case, choices: Sequence[GridChoice], vae: Any, throughput: dict | None) -> list[dict]:
    """Every grid on one case: floor metrics (full and VAE window) and cost."""
    _, mask, ct, properties = read_native(case)
    extent = body_extent_mm(mask, properties)
    rows = []
    for choice in choices:
        started = time.perf_counter()
        grid = choice.resolve(properties.spacing)
        mapping = plan_mapping(mask, properties, grid)
        shape = tuple(int(s) for s in mapping.canonical.shape)
        bbox = math.prod(int(math.ceil(e / s - 1e-6)) for e, s in zip(extent, grid.spacing))
        allow = choice.kind == "fixed"
        full, _ = grid_floor_sct(case, grid, "full", allow_truncation=allow)
        vae_window, _ = grid_floor_sct(case, grid, "vae", allow_truncation=allow)
        row = {"pid": case.pid, "region": case.region, "grid": choice.label, "kind": choice.kind,
               "spacing_mm": list(grid.spacing), "canonical_shape": list(shape), "canonical_voxels": math.prod(shape),
               "bbox_voxels": bbox, "voxel_ratio": round(math.prod(shape) / bbox, 4),
               "latent_shape": [s // 4 for s in shape], "body_lost_fraction": mapping.mask_fraction_outside,
               **encode_cost(vae, shape, throughput),
               **{k: float(v) for k, v in image_metrics(ct, full, mask).items()},
               "bone_dice": float(bone_dice(ct, full, mask)),
               "mae_vae_window": float(image_metrics(ct, vae_window, mask)["mae"])}
        row["floor_seconds"] = round(time.perf_counter() - started, 2)
        print(json.dumps({k: row[k] for k in ("pid", "grid", "canonical_shape", "mae", "mae_vae_window",
                                              "body_lost_fraction", "floor_seconds")}), flush=True)
        rows.append(row)
    return rows


def case_info(case: Case) -> dict:
    """Native size, spacing and body extent of a case."""
    _, mask, _, properties = read_native(case)
    extent = body_extent_mm(mask, properties)
    return {"pid": case.pid, "region": case.region, "size_xyz": list(properties.size),
            "spacing_mm": list(properties.spacing), "body_extent_mm": [round(float(v), 1) for v in extent],
            "longer_than_fixed_z": bool(extent[2] > FIXED_Z_MM)}


def _stats(rows: list[dict]) -> dict:
    worst = max(rows, key=lambda r: r["mae"])
    return {"cases": len(rows), "mae_mean": statistics.fmean(r["mae"] for r in rows), "mae_worst": worst["mae"],
            "mae_worst_case": worst["pid"], "psnr_mean": statistics.fmean(r["psnr"] for r in rows),
            "psnr_worst": min(r["psnr"] for r in rows), "ms_ssim_mean": statistics.fmean(r["ms_ssim"] for r in rows),
            "ms_ssim_worst": min(r["ms_ssim"] for r in rows),
            "bone_dice_mean": statistics.fmean(r["bone_dice"] for r in rows),
            "bone_dice_worst": min(r["bone_dice"] for r in rows),
            "mae_vae_window_mean": statistics.fmean(r["mae_vae_window"] for r in rows),
            "mae_vae_window_worst": max(r["mae_vae_window"] for r in rows)}


def summarise(rows: list[dict]) -> list[dict]:
    """Per grid: floor statistics over all cases and per region, and the cost over all cases."""
    out = []
    for label in dict.fromkeys(r["grid"] for r in rows):
        mine = [r for r in rows if r["grid"] == label]
        estimates = [r["est_encode_s"] for r in mine if r["est_encode_s"] is not None]
        out.append({"grid": label, "kind": mine[0]["kind"], "spacing_mm": mine[0]["spacing_mm"], **_stats(mine),
                    "regions": {region: _stats([r for r in mine if r["region"] == region])
                                for region in sorted({r["region"] for r in mine})},
                    "voxels_total": sum(r["canonical_voxels"] for r in mine),
                    "voxels_mean": statistics.fmean(r["canonical_voxels"] for r in mine),
                    "voxel_ratio_max": max(r["voxel_ratio"] for r in mine),
                    "body_lost_max": max(r["body_lost_fraction"] for r in mine),
                    "tile_windows_max": max(r["tile_windows"] for r in mine),
                    "processed_ratio_max": max(r["processed_ratio"] for r in mine),
                    "largest_activation_gib_max": max(r["largest_activation_bytes"] for r in mine) / GIB,
                    "est_encode_s_mean": statistics.fmean(estimates) if estimates else None,
                    "est_encode_s_max": max(estimates) if estimates else None})
    return out


def choose(summary: Sequence[dict]) -> dict:
    """The cheapest fitted spacing whose floor meets the rule (mean <= 10 HU, worst <= 20 HU, no body lost)."""
    verdicts, passing = [], []
    for row in summary:
        if row["kind"] != "fit":
            continue
        failures = []
        if not row["mae_mean"] <= MEAN_MAE_LIMIT_HU:
            failures.append(f"mean MAE {row['mae_mean']:.2f} > {MEAN_MAE_LIMIT_HU:g} HU")
        if not row["mae_worst"] <= WORST_MAE_LIMIT_HU:
            failures.append(f"worst MAE {row['mae_worst']:.2f} HU ({row['mae_worst_case']}) > {WORST_MAE_LIMIT_HU:g} HU")
        if row["body_lost_max"] > 0:
            failures.append(f"loses {row['body_lost_max']:.2%} of a body")
        verdicts.append({"grid": row["grid"], "passes": not failures, "failures": failures})
        if not failures:
            passing.append(row)
    rule = (f"fitted spacings only; mean floor MAE <= {MEAN_MAE_LIMIT_HU:g} HU, worst case <= "
            f"{WORST_MAE_LIMIT_HU:g} HU, no body voxel lost; then the fewest canonical voxels")
    if not passing:
        return {"grid": None, "rule": rule, "verdicts": verdicts,
                "reason": "no fitted spacing meets the rule: " + "; ".join(
                    f"{v['grid']}: {', '.join(v['failures'])}" for v in verdicts) if verdicts else "no fitted spacing ran"}
    best = min(passing, key=lambda r: (r["voxels_total"], -r["spacing_mm"][0]))
    cheaper = [v["grid"] for v in verdicts if not v["passes"]]
    reason = (f"{best['grid']}: mean floor MAE {best['mae_mean']:.2f} HU, worst {best['mae_worst']:.2f} HU "
              f"({best['mae_worst_case']}), no body lost, {best['voxels_mean'] / 1e6:.2f} M canonical voxels per case "
              f"(the fewest of the {len(passing)} passing)" + (f"; failing: {', '.join(cheaper)}" if cheaper else ""))
    return {"grid": best["grid"], "spacing_mm": best["spacing_mm"], "rule": rule, "verdicts": verdicts, "reason": reason}


def measure_grids(cases: Sequence[Case], choices: Sequence[GridChoice], throughput: dict | None = None,
                  vae: Any = None) -> dict:
    """The core: per-case rows, per-grid summary and the choice (no timing of its own)."""
    vae = maisi_meta() if vae is None else vae
    rows = [row for case in cases for row in case_rows(case, choices, vae, throughput)]
    summary = summarise(rows)
    return {"cases": [case_info(case) for case in cases], "rows": rows, "summary": summary, "choice": choose(summary)}


def _throughput_child(window: tuple[int, int, int], repeats: int, threads: int) -> dict:
    """MAISI fp32 encode of one window (random weights) in this process: median seconds and peak RSS."""
    import torch

    from latent.core.vae.loading import LAYOUT_MAISI, MAISI_CONFIG, LoadedVAE, build_vae
    from latent.core.vae.inference import encode_mu
    from latent.core.vae.tiling import largest_activation

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    network = build_vae("AutoencoderKlMaisi", MAISI_CONFIG, "cpu")
    vae = LoadedVAE(network, "maisi-random", "AutoencoderKlMaisi", dict(MAISI_CONFIG), "random", LAYOUT_MAISI)
    coarse = torch.rand(1, 1, *(s // 8 for s in window), generator=torch.Generator().manual_seed(1))
    volume = torch.nn.functional.interpolate(coarse, size=window, mode="trilinear")  # smooth, CT-like
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    runs = []
    for _ in range(repeats + 1):  # the first is a warm-up
        started = time.perf_counter()
        encode_mu(vae, volume)
        runs.append(time.perf_counter() - started)
    median = statistics.median(runs[1:])
    return {"window": list(window), "threads": threads, "repeats": repeats, "runs_s": [round(r, 2) for r in runs],
            "median_s": round(median, 3), "seconds_per_voxel": median / math.prod(window),
            "rss_before_gib": round(before, 3),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            "largest_activation_bytes": largest_activation(vae, window, "encode")[0] * FP32_BYTES}


def measure_throughput(window: tuple[int, int, int], repeats: int, threads: int) -> dict:
    """:func:`_throughput_child` in its own process (its peak RSS is that pass's alone)."""
    spec = json.dumps({"window": window, "repeats": repeats, "threads": threads})
    done = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fmt(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    """The report: cases, per-grid summary, per-region MAE, per-case detail, throughput, choice."""
    t, choice = report.get("throughput"), report["choice"]
    lines = ["# Grid spacing: floor and cost per canonical grid", "",
             f"Machine: {report['machine']}; python {report['python']}, torch {report['torch']}, numpy "
             f"{report['numpy']}, SimpleITK {report['simpleitk']}; git {report['git_revision'][:12]}; {report['date']}.",
             f"Load average (1/5/15 min) at start {report['load_average_start']}, at end {report['load_average_end']}; "
             f"wall time {report['wall_s'] / 60:.1f} min. Data: {report['data']}.", ""]
    lines += [f"Note: {note}" for note in report["notes"]] + ([""] if report["notes"] else [])
    lines += [f"**Choice: {choice['grid'] or 'none'}.** {choice['reason']}", "", f"Rule: {choice['rule']}.", ""]
    lines += ["## Cases", "", "| case | native size (x, y, z) | spacing mm | body extent mm (x, y, z) | "
              f"longer than {FIXED_Z_MM:g} mm |", "|---|---|---|---|---|"]
    lines += [f"| {c['pid']} | {'x'.join(map(str, c['size_xyz']))} | {'x'.join(f'{v:g}' for v in c['spacing_mm'])} | "
              f"{' x '.join(f'{v:g}' for v in c['body_extent_mm'])} | {'yes' if c['longer_than_fixed_z'] else 'no'} |"
              for c in report["cases"]]
    lines += ["", "## Per grid (full-window floor over all cases; cost)", "",
              "Encode s and peak RSS are **estimates** from the measured throughput (processed voxels x measured "
              "s/voxel; peak RSS scaled by the largest activation), not measured per case.", "",
              "| grid | MAE mean | MAE worst (case) | PSNR mean / worst | MS-SSIM mean / worst | bone Dice mean / worst | "
              "VAE-window MAE mean / worst | M voxels / case | voxels / body box (max, target <= 1.1) | body lost (max) | "
              "encode windows (max) | largest activation GiB (max) | est. encode s mean / max |", "|" + "---|" * 13]
    for s in report["summary"]:
        lines.append(
            f"| {s['grid']} | {s['mae_mean']:.2f} | {s['mae_worst']:.2f} ({s['mae_worst_case']}) | {s['psnr_mean']:.1f} / "
            f"{s['psnr_worst']:.1f} | {s['ms_ssim_mean']:.4f} / {s['ms_ssim_worst']:.4f} | {s['bone_dice_mean']:.4f} / "
            f"{s['bone_dice_worst']:.4f} | {s['mae_vae_window_mean']:.2f} / {s['mae_vae_window_worst']:.2f} | "
            f"{s['voxels_mean'] / 1e6:.2f} | {s['voxel_ratio_max']:.3f} | {s['body_lost_max']:.2%} | "
            f"{s['tile_windows_max']} | {s['largest_activation_gib_max']:.2f} | "
            f"{_fmt(s['est_encode_s_mean'], 0)} / {_fmt(s['est_encode_s_max'], 0)} |")
    regions = sorted(report["summary"][0]["regions"]) if report["summary"] else []
    lines += ["", "## Per region (full-window floor MAE, mean / worst HU)", "",
              "| grid | " + " | ".join(regions) + " |", "|" + "---|" * (len(regions) + 1)]
    lines += [f"| {s['grid']} | " + " | ".join(f"{s['regions'][g]['mae_mean']:.2f} / {s['regions'][g]['mae_worst']:.2f}"
                                               for g in regions) + " |" for s in report["summary"]]
    lines += ["", "## Per case", "", "| grid | case | canonical shape (z, y, x) | M voxels | / body box | latent shape | "
              "body lost | windows | processed / canonical | activation GiB | est. encode s | est. peak RSS GiB | "
              "MAE | PSNR | MS-SSIM | bone Dice | VAE-window MAE |", "|" + "---|" * 17]
    for r in report["rows"]:
        lines.append(
            f"| {r['grid']} | {r['pid']} | {'x'.join(map(str, r['canonical_shape']))} | {r['canonical_voxels'] / 1e6:.2f} | "
            f"{r['voxel_ratio']:.3f} | {'x'.join(map(str, r['latent_shape']))} | {r['body_lost_fraction']:.2%} | "
            f"{r['tile_windows']} | {r['processed_ratio']:.3f} | {r['largest_activation_bytes'] / GIB:.2f} | "
            f"{_fmt(r['est_encode_s'], 0)} | {_fmt(r['est_peak_rss_gib'])} | {r['mae']:.2f} | {r['psnr']:.1f} | "
            f"{r['ms_ssim']:.4f} | {r['bone_dice']:.4f} | {r['mae_vae_window']:.2f} |")
    lines += ["", "## Measured MAISI encode throughput", ""]
    if t:
        lines += [f"One {'x'.join(map(str, t['window']))} window, fp32, random weights, {t['threads']} torch threads, "
                  f"own process: median {t['median_s']:.2f} s of {t['repeats']} runs after a warm-up (runs {t['runs_s']}), "
                  f"{t['seconds_per_voxel'] * 1e6:.2f} s per million voxels; peak RSS {t['peak_rss_gib']:.2f} GiB "
                  f"({t['rss_before_gib']:.2f} GiB before the encode); largest activation "
                  f"{t['largest_activation_bytes'] / GIB:.2f} GiB."]
    else:
        lines += ["Not measured (--skip-throughput): no encode estimates."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases-per-region", type=int, default=2)
    parser.add_argument("--seed", type=int, default=4, help="phantom seed (4: both AB cases longer than 288 mm)")
    parser.add_argument("--spacings", default="1,1.25,1.5,2", help="fitted in-plane spacings in mm (z 3 mm)")
    parser.add_argument("--fixed", default="synthrad-1.5mm,synthrad-3mm", help="fixed presets for reference")
    parser.add_argument("--data", type=Path, help="an existing data root instead of generated phantoms")
    parser.add_argument("--window", default="64x128x128", help="throughput window z x y x x")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-throughput", action="store_true", help="no MAISI timing (no encode estimates)")
    parser.add_argument("--note", action="append", default=[])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(_throughput_child(tuple(spec["window"]), spec["repeats"], spec["threads"])))
        return 0
    import SimpleITK as sitk
    import torch

    started = time.perf_counter()
    report: dict[str, Any] = {
        "machine": machine_description(), "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "numpy": np.__version__, "simpleitk": sitk.Version.VersionString(),
        "git_revision": git_revision(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average_start": " ".join(f"{v:.2f}" for v in os.getloadavg()), "notes": args.note,
        "data": str(args.data) if args.data else f"phantoms, size synthrad, seed {args.seed}, "
                                                  f"{args.cases_per_region} per region"}
    window = tuple(int(v) for v in args.window.split("x"))
    report["throughput"] = None if args.skip_throughput else measure_throughput(window, args.repeats, args.threads)
    print(json.dumps({"throughput": report["throughput"]}), flush=True)
    choices = grid_choices([float(s) for s in args.spacings.split(",")], True,
                           [f for f in args.fixed.split(",") if f])
    with tempfile.TemporaryDirectory() as work:
        root = args.data
        if root is None:
            root = Path(work) / "phantoms"
            generate_phantom_dataset(root, 3 * args.cases_per_region, ["AB", "HN", "TH"], seed=args.seed, size="synthrad")
        report.update(measure_grids(discover_cases(root), choices, report["throughput"]))
    if not any(c["longer_than_fixed_z"] for c in report["cases"] if c["region"] == "AB"):
        report["notes"].append(f"WARNING: no AB case is longer than {FIXED_Z_MM:g} mm with this seed")
    report["load_average_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    report["wall_s"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_grid_spacing.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "bench_grid_spacing.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
