"""Cost of checking a volume's compressed data before it is read (``latent.core.volume_files``).

One SynthRAD-size CT (150 x 512 x 512 voxels, int16, the synthetic case of
``bench_metrics.py``) is written compressed as ``.mha`` (SimpleITK, zlib) and as ``.nii.gz``; each
is timed (fastest of ``--repeats``) for the check alone (``verify_volume_file``: one inflate,
CRC/Adler checked, output discarded), for SimpleITK's read alone, and for ``latent.core.io.read_volume``
(check + read + geometry checks).

Run: ``.venv/bin/python benchmarks/bench_integrity.py [--note "..."]``; writes
``results/bench_integrity.json`` and ``.md`` with the machine, its load and the git commit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_metrics import synthetic_case  # noqa: E402  (benchmarks/ helper)

from latent.core.io import VolumeProperties, read_volume, write_volume  # noqa: E402
from latent.core.provenance import git_revision, machine_description  # noqa: E402
from latent.core.volume_files import verify_volume_file  # noqa: E402

SHAPE = (150, 512, 512)
SPACING_XYZ = (1.0, 1.0, 2.5)
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def fastest(function: Callable[[], object], repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(path: Path, repeats: int) -> dict:
    """Check, plain read and checked read times of one file."""
    check = fastest(lambda: verify_volume_file(path), repeats)
    itk_read = fastest(lambda: sitk.GetArrayFromImage(sitk.ReadImage(str(path))), repeats)
    checked_read = fastest(lambda: read_volume(path), repeats)
    return {"file_mb": path.stat().st_size / 1e6, "check_s": check, "sitk_read_s": itk_read,
            "read_volume_s": checked_read, "check_fraction_of_sitk_read": check / itk_read}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--note", default="", help="a remark about the machine (load, other jobs)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    load_start = os.getloadavg()
    ct = synthetic_case(SHAPE, 0)[0]
    properties = VolumeProperties(SPACING_XYZ, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1),
                                  tuple(reversed(SHAPE)), "int16")
    files = {}
    with tempfile.TemporaryDirectory(prefix="bench-integrity-") as folder:
        for name in ("ct.mha", "ct.nii.gz"):
            path = write_volume(Path(folder) / name, ct, properties)
            files[name] = measure(path, args.repeats)
    result = {"shape_zyx": list(SHAPE), "dtype": "int16", "repeats": args.repeats, "files": files,
              "machine": machine_description(), "load_average": {"start": list(load_start),
                                                                  "end": list(os.getloadavg())},
              "git_commit": git_revision(), "note": args.note}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_integrity.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Integrity check of compressed volumes: cost per SynthRAD-size CT", "",
             f"CT {SHAPE[0]} x {SHAPE[1]} x {SHAPE[2]} (z, y, x) int16, written compressed by SimpleITK; "
             f"{result['machine']}; 1-min load {load_start[0]:.1f} -> {result['load_average']['end'][0]:.1f}; "
             f"commit {result['git_commit']}; fastest of {args.repeats}." + (f" Note: {args.note}" if args.note else ""),
             "", "| file | size (MB) | check (s) | SimpleITK read (s) | read_volume (s) | check / read |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {row['file_mb']:.1f} | {row['check_s']:.2f} | {row['sitk_read_s']:.2f} | "
              f"{row['read_volume_s']:.2f} | {row['check_fraction_of_sitk_read']:.0%} |" for name, row in files.items()]
    (args.out / "bench_integrity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
