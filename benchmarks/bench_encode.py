"""Encode cost of the released MAISI VAE architecture (random weights, CPU build).

For canonical shapes it measures seconds and peak RSS per volume of:

- ``raw``: one ``network.encode`` call on the whole volume (the floor);
- ``untiled``: :func:`latent.core.vae.inference.encode_mu` in one pass (layout conversion included);
- ``tiled``: ``encode_mu`` through the gaussian sliding window. Its pipeline overhead is the
  wall time outside the network calls divided by the time inside them (target <= 25 %).

Every configuration runs in its own subprocess, which reports its own peak RSS
(``getrusage(RUSAGE_SELF)``), so one run's memory never hides another's. The tiled and untiled
latents of a shape are compared (seam error of the random network).

    python benchmarks/bench_encode.py            # everything (~15 min on 2 idle cores, far more under load)
    python benchmarks/bench_encode.py --merge --only "128^3 raw"   # rerun one row into the results
    python benchmarks/bench_encode.py --quick    # 64^3 and 128^3 only

Writes ``benchmarks/results/bench_encode.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
#: The issue's memory target for the largest canonical volume.
PEAK_RSS_LIMIT_GIB = 8.0
#: Pipeline overhead target for the tiled path, relative to the network's own time.
OVERHEAD_TARGET = 0.25

# (label, shape (z, y, x), mode, tile or None, overlap, bf16)
FULL = [
    ("64^3 raw", (64, 64, 64), "raw", None, 0.0, False),
    ("64^3 untiled", (64, 64, 64), "untiled", None, 0.0, False),
    ("64^3 tiled 32^3", (64, 64, 64), "tiled", (32, 32, 32), 0.25, False),
    ("128^3 raw", (128, 128, 128), "raw", None, 0.0, False),
    ("128^3 untiled", (128, 128, 128), "untiled", None, 0.0, False),
    ("128^3 tiled 64^3", (128, 128, 128), "tiled", (64, 64, 64), 0.25, False),
    ("128x256x256 tiled 128^3", (128, 256, 256), "tiled", (128, 128, 128), 0.25, False),
    # Probe: peak RSS is reached in the first window (later windows repeat it); time extrapolated.
    ("128x512x512 tiled 128^3 (probe)", (128, 512, 512), "tiled", (128, 128, 128), 0.25, False),
]
#: Windows run before a probe configuration stops.
PROBE_WINDOWS = 2
QUICK_LABELS = {"64^3 raw", "64^3 untiled", "64^3 tiled 32^3", "128^3 raw", "128^3 untiled", "128^3 tiled 64^3"}


def _child(spec: dict) -> dict:
    """Run one configuration in this process and return its measurements."""
    import numpy as np
    import torch

    from latent.core.vae.loading import LAYOUT_MAISI, MAISI_CONFIG, LoadedVAE, build_vae
    from latent.core.vae.inference import encode_mu, to_network_layout

    torch.manual_seed(0)
    network = build_vae("AutoencoderKlMaisi", MAISI_CONFIG, "cpu")
    vae = LoadedVAE(network, "maisi-random", "AutoencoderKlMaisi", dict(MAISI_CONFIG), "random", LAYOUT_MAISI)
    generator = torch.Generator().manual_seed(1)
    shape = tuple(spec["shape"])
    coarse = torch.rand(1, 1, *(s // 8 for s in shape), generator=generator)
    volume = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear")  # smooth, CT-like range
    baseline_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    inside = {"seconds": 0.0, "calls": 0}
    original_encode = network.encode

    def timed_encode(x):
        start = time.perf_counter()
        result = original_encode(x)
        inside["seconds"] += time.perf_counter() - start
        inside["calls"] += 1
        return result

    probe = spec.get("probe_windows")

    def timed_encode(x):
        if probe and inside["calls"] >= probe:
            raise _ProbeDone
        start = time.perf_counter()
        result = original_encode(x)
        inside["seconds"] += time.perf_counter() - start
        inside["calls"] += 1
        return result

    network.encode = timed_encode
    start = time.perf_counter()
    latent = None
    try:
        if spec["mode"] == "raw":
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["bf16"]):
                latent = network.encode(to_network_layout(volume, LAYOUT_MAISI))[0].float()
        else:
            latent = encode_mu(vae, volume, spec["tile"], spec["overlap"], bf16=spec["bf16"])
    except _ProbeDone:
        pass
    seconds = time.perf_counter() - start
    extra = {}
    if latent is None:  # probe: extrapolate the network time to all windows
        windows = _window_count(shape, spec["tile"], spec["overlap"])
        outside = seconds - inside["seconds"]
        seconds = outside + inside["seconds"] / inside["calls"] * windows
        extra = {"probe": f"{inside['calls']} of {windows} windows run; seconds extrapolated", "windows": windows}
    elif spec.get("save"):
        np.save(spec["save"], latent.numpy())
    return {
        **extra,
        "seconds": round(seconds, 2),
        "network_seconds": round(inside["seconds"], 2),
        "network_calls": inside["calls"],
        "overhead_vs_network": None if extra else round(seconds / inside["seconds"] - 1, 4),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "rss_before_encode_gib": round(baseline_gib, 3),
        "latent_shape": None if latent is None else list(latent.shape),
    }


class _ProbeDone(Exception):
    """Raised inside the network call once a probe has run its windows."""


def _window_count(shape, tile, overlap) -> int:
    """Windows MONAI places for this shape (same rule as dense_patch_slices)."""
    from latent.core.vae.inference import window_overlap

    total = 1
    for size, roi, ov in zip(shape, tile, window_overlap(tile, overlap, 4)):
        roi = min(roi, size)
        step = max(1, int(roi * (1 - ov))) if roi < size else roi
        starts = list(range(0, size - roi + 1, step))
        if starts[-1] != size - roi:
            starts.append(size - roi)
        total *= len(starts)
    return total


def _run_child(spec: dict) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    completed = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env
    )
    if completed.returncode != 0:
        return {"error": completed.stderr.strip().splitlines()[-1] if completed.stderr.strip() else "failed"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _relative_error(a_path: str, b_path: str) -> float:
    import numpy as np

    a, b = np.load(a_path), np.load(b_path)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _markdown(report: dict) -> str:
    lines = [
        "# VAE encode benchmark (MAISI architecture, random weights, CPU)",
        "",
        f"Machine: {report['machine']}; torch {report['torch']}; threads {report['threads']}; "
        f"load average (1/5/15 min) at start: {report['load_start']}; at end: {report['load_end']} "
        "(one entry per run merged into this table; other jobs shared the CPUs: times are upper bounds).",
        "",
        "| configuration | s / volume | network s | overhead vs network | peak RSS GiB | windows |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["runs"]:
        if "error" in row:
            lines.append(f"| {row['label']} | error: {row['error']} | | | | |")
            continue
        overhead = row["overhead_vs_network"]
        overhead_text = "-" if overhead is None else f"{100 * overhead:.1f} %"
        lines.append(
            f"| {row['label']} | {row['seconds']} | {row['network_seconds']} | {overhead_text} | "
            f"{row['peak_rss_gib']} | {row.get('windows', row['network_calls'])} |"
        )
    lines += ["", "Derived:", ""]
    lines += [f"- {key}: {value}" for key, value in report["derived"].items()]
    if report.get("skipped"):
        lines += ["", "Not run: " + ", ".join(report["skipped"])]
    if report.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64^3 and 128^3 only")
    parser.add_argument("--only", nargs="*", help="labels to run (default: all of the chosen set)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--merge", action="store_true", help="keep earlier rows (and derived lines) of other labels")
    parser.add_argument("--note", action="append", default=[], help="a line for the report's notes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return

    import torch

    chosen = [c for c in FULL if not args.quick or c[0] in QUICK_LABELS]
    if args.only:
        chosen = [c for c in chosen if c[0] in set(args.only)]
    skipped = [c[0] for c in FULL if c not in chosen]
    scratch = Path(tempfile.mkdtemp(prefix="bench_encode_"))
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_start": " ".join(f"{v:.1f}" for v in os.getloadavg()),
        "runs": [],
        "skipped": skipped,
        "notes": list(args.note),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge and (args.out / "bench_encode.json").is_file():
        os.replace(args.out / "bench_encode.json", args.out / "bench_encode.previous.json")
    for label, shape, mode, tile, overlap, bf16 in chosen:
        spec = {"shape": shape, "mode": mode, "tile": tile, "overlap": overlap, "bf16": bf16}
        if "(probe)" in label:
            spec["probe_windows"] = PROBE_WINDOWS
        if mode != "raw":
            spec["save"] = str(scratch / f"{label.replace(' ', '_').replace('^', '')}.npy")
        print(f"running {label} ...", flush=True)
        result = {"label": label, **spec, **_run_child(spec)}
        print(f"  {json.dumps(result)}", flush=True)
        report["runs"].append(result)
        partial = {**report, "load_end": "(running)", "derived": {}}  # survives an interrupted run
        (args.out / "bench_encode.json").write_text(json.dumps(partial, indent=2) + "\n")
    report["load_end"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    previous_derived: dict = {}
    previous_file = args.out / "bench_encode.previous.json"
    if args.merge and previous_file.is_file():
        previous = json.loads(previous_file.read_text())
        fresh = {row["label"] for row in report["runs"]}
        kept = [row for row in previous["runs"] if row["label"] not in fresh]
        order = [c[0] for c in FULL]
        rank = {label: index for index, label in enumerate(order)}
        report["runs"] = sorted(kept + report["runs"], key=lambda row: rank.get(row["label"], len(rank)))
        report["load_start"] = f"{previous['load_start']}; then {report['load_start']}"
        report["load_end"] = f"{previous['load_end']}; then {report['load_end']}"
        previous_derived = previous.get("derived", {})
        report["notes"] = previous.get("notes", []) + report["notes"]
        report["skipped"] = [c[0] for c in FULL if c[0] not in {r["label"] for r in report["runs"]}]

    by_label = {row["label"]: row for row in report["runs"] if "error" not in row}
    derived: dict[str, object] = {}
    for size in ("64^3", "128^3"):
        raw, untiled = by_label.get(f"{size} raw"), by_label.get(f"{size} untiled")
        if raw and untiled:
            # separate processes on shared CPUs: this ratio carries the machine's load noise
            ratio = untiled["seconds"] / raw["seconds"]
            derived[f"{size} untiled encode_mu / raw forward (separate runs)"] = f"{ratio:.2f}x"
    for size, tiled_label in (("64^3", "64^3 tiled 32^3"), ("128^3", "128^3 tiled 64^3")):
        tiled, untiled = by_label.get(tiled_label), by_label.get(f"{size} untiled")
        if tiled and untiled and "save" in tiled and "save" in untiled:  # both run in this call
            error = _relative_error(tiled["save"], untiled["save"])
            derived[f"{tiled_label} seam error (relative L2 vs untiled, random weights)"] = f"{error:.4f}"
            derived[f"{tiled_label} time vs untiled"] = f"{tiled['seconds'] / untiled['seconds']:.2f}x"
    pipeline_rows = [
        row for row in report["runs"]
        if row.get("mode") != "raw" and "error" not in row and row["overhead_vs_network"] is not None
    ]
    if pipeline_rows:
        # measured inside one process: wall time of encode_mu outside the network's encode calls
        worst = max(row["overhead_vs_network"] for row in pipeline_rows)
        verdict = "met" if worst <= OVERHEAD_TARGET else "NOT met"
        derived["worst encode_mu overhead beyond network time (same process)"] = (
            f"{100 * worst:.1f} % (target <= {100 * OVERHEAD_TARGET:.0f} %: {verdict})"
        )
    big = by_label.get("128x512x512 tiled 128^3 (probe)")
    if big:
        derived["128x512x512 peak RSS"] = (
            f"{big['peak_rss_gib']} GiB (limit {PEAK_RSS_LIMIT_GIB}: "
            f"{'met' if big['peak_rss_gib'] <= PEAK_RSS_LIMIT_GIB else 'NOT met'})"
        )
    report["derived"] = {**previous_derived, **derived}
    for row in report["runs"]:
        row.pop("save", None)

    (args.out / "bench_encode.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "bench_encode.md").write_text(_markdown(report))
    (args.out / "bench_encode.previous.json").unlink(missing_ok=True)
    print(_markdown(report))


if __name__ == "__main__":
    main()
