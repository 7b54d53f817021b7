"""How well ContourDiff's contour maps of the MR and of the CT agree, on phantoms.

    python benchmarks/bench_contour_agreement.py [--cases 30] [--grid 3x3x5:32x128x128] [--note "idle machine"]

ContourDiff trains on the CT's contour maps and samples from the MR's
(:mod:`latent.translate.models.contour_map`); it can only put anatomy where the MR has it if the
two maps agree. ``--cases`` small phantoms (the three regions) are put on the canonical grid;
for every axial slice with body the maps of the MR and of the CT are compared by Dice after a
``--dilation``-pixel dilation: all channels merged, the body outline alone and the edges alone,
per case (mean over its slices) and over the cases. A control compares the MR's maps with the
CT's shifted by ``--shift`` pixels in x (misaligned anatomy), which the Dice must see.

Writes ``<out>/bench_contour_agreement.{json,md}`` (machine, load, git revision) and
``<out>/bench_contour_agreement.png`` (one slice per region: CT, MR, the two maps overlaid).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "benchmarks" / "results"
NAME = "bench_contour_agreement"


def case_slices(case, grid) -> tuple[np.ndarray, np.ndarray]:
    """MR (unit) and CT ([-1, 1]) body slices of a case on ``grid``, ``(N, H, W)`` each."""
    from latent.core.prepare import prepare_case

    prepared = prepare_case(case, grid)
    body = prepared.mask.reshape(prepared.mask.shape[0], -1).any(axis=1)
    return prepared.mr_unit[body], prepared.ct_full[body]


def agreement(data: Path, grid_spec: str, dilation: int, shift: int) -> tuple[list[dict], dict]:
    """Per-case Dice rows, and the maps of each region's first case (for the figure)."""
    import torch

    from latent.core.cases import discover_cases
    from latent.core.grid import parse_grid_spec
    from latent.translate.models.contour_map import contour_map, map_dice

    grid = parse_grid_spec(grid_spec)
    rows, shown = [], {}
    for case in sorted(discover_cases(data), key=lambda c: c.pid):
        mr, ct = case_slices(case, grid)
        started = time.perf_counter()
        mr_map, ct_map = (contour_map(torch.from_numpy(v)[:, None].float()) for v in (mr, ct))
        seconds = time.perf_counter() - started
        rows.append({"pid": case.pid, "region": case.region, "slices": int(mr.shape[0]),
                     "dice": map_dice(mr_map, ct_map, dilation),
                     "dice_outline": map_dice(mr_map[:, :1], ct_map[:, :1], dilation),
                     "dice_edges": map_dice(mr_map[:, 1:], ct_map[:, 1:], dilation),
                     "dice_shifted": map_dice(mr_map, ct_map.roll(shift, dims=-1), dilation),
                     "map_fraction_mr": float(mr_map.amax(1).mean()), "map_fraction_ct": float(ct_map.amax(1).mean()),
                     "ms_per_slice_pair": 1000 * seconds / mr.shape[0]})
        if case.region not in shown:
            middle = mr.shape[0] // 2
            shown[case.region] = (case.pid, mr[middle], ct[middle], mr_map[middle].amax(0).numpy(),
                                  ct_map[middle].amax(0).numpy())
    return rows, shown


def figure(shown: dict, path: Path) -> None:
    """One row per region: CT, MR, the CT's (red) and the MR's (green) maps overlaid (yellow: both)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(shown), 3, figsize=(9, 3 * len(shown)), squeeze=False)
    for row, (region, (pid, mr, ct, mr_map, ct_map)) in zip(axes, sorted(shown.items())):
        overlay = np.stack([ct_map, mr_map, np.zeros_like(mr_map)], axis=-1)
        for axis, image, title, cmap in ((row[0], ct, f"{pid} CT", "gray"), (row[1], mr, "MR", "gray"),
                                         (row[2], overlay, "maps: CT red, MR green, both yellow", None)):
            axis.imshow(image, cmap=cmap)
            axis.set_title(title, fontsize=9)
            axis.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(record: dict) -> str:
    """The report."""
    summary = record["summary"]
    lines = [record["header"], "",
             f"{summary['cases']} phantoms on the grid {record['grid']}; Dice after a {record['dilation']}-pixel "
             "dilation, mean over each case's body slices, then over cases (min in brackets).", "",
             "| maps | Dice MR vs CT |", "|---|---|"]
    for key, title in (("dice", "all channels merged"), ("dice_outline", "body outline"), ("dice_edges", "edges"),
                       ("dice_shifted", f"control: CT maps shifted {record['shift']} px")):
        lines.append(f"| {title} | {summary[key]['mean']:.3f} ({summary[key]['min']:.3f}) |")
    lines += ["", "| region | cases | Dice (merged) |", "|---|---|---|"]
    for region, value in summary["by_region"].items():
        lines.append(f"| {region} | {value['cases']} | {value['dice']:.3f} |")
    lines += ["", f"Contour map: {summary['ms_per_slice_pair']:.1f} ms per slice pair (CPU). "
              f"Figure: {NAME}.png."]
    return "\n".join(lines) + "\n"


def summarise(rows: list[dict]) -> dict:
    """Means and minima over cases, and the merged Dice per region."""
    summary = {"cases": len(rows)}
    for key in ("dice", "dice_outline", "dice_edges", "dice_shifted"):
        values = [row[key] for row in rows]
        summary[key] = {"mean": float(np.mean(values)), "min": float(np.min(values))}
    summary["by_region"] = {region: {"cases": len(mine), "dice": float(np.mean([row["dice"] for row in mine]))}
                            for region in sorted({row["region"] for row in rows})
                            for mine in [[row for row in rows if row["region"] == region]]}
    summary["ms_per_slice_pair"] = float(np.mean([row["ms_per_slice_pair"] for row in rows]))
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=30, help="phantoms (spread over AB, HN, TH)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed")
    parser.add_argument("--grid", default="3x3x5:32x128x128", help="canonical grid (the demo's by default)")
    parser.add_argument("--dilation", type=int, default=1, help="pixels of dilation before the Dice")
    parser.add_argument("--shift", type=int, default=4, help="pixels the control shifts the CT's maps")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the json, md and png")
    parser.add_argument("--note", default="", help="recorded with the results (machine state, purpose)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPOSITORY))
    from latent.core.phantom.generate import generate_phantom_dataset
    from latent.core.provenance import git_revision, machine_description

    load_before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "data"
        generate_phantom_dataset(data, args.cases, seed=args.seed)
        rows, shown = agreement(data, args.grid, args.dilation, args.shift)
    args.out.mkdir(parents=True, exist_ok=True)
    figure(shown, args.out / f"{NAME}.png")
    record = {"script": f"benchmarks/{NAME}.py", "git": git_revision(), "machine": machine_description(),
              "date": f"{datetime.now(timezone.utc):%Y-%m-%d}", "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "wall_seconds": time.perf_counter() - started,
              "note": args.note, "grid": args.grid, "seed": args.seed, "dilation": args.dilation, "shift": args.shift,
              "summary": summarise(rows), "rows": rows}
    record["header"] = (f"<!-- written by benchmarks/{NAME}.py at git {record['git']}, {record['date']}, "
                        f"{record['machine']}, load average {load_before[0]:.2f} before / "
                        f"{record['load_average_after'][0]:.2f} after. {args.note} -->\n"
                        "# ContourDiff: MR and CT contour maps on phantoms")
    (args.out / f"{NAME}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (args.out / f"{NAME}.md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
