"""Does a per-region fine-tune beat one global model at the same total budget? (unetpp25d, phantoms)

    python benchmarks/bench_region_finetune.py [--seconds 120] [--work bench_region] [--note "..."]
        [--data bench_run/data --cache bench_run/cache.zarr --split-file bench_run/work/splits.json]

The two-stage recipe of the third-placed SynthRAD2025 team against one stage, on the phantom
study's data, cache and split (``benchmarks/bench_phantom.sh`` leaves them in ``bench_run/``;
without ``--data`` this script generates the same 30 phantoms, seed 0, the demo's split, and
encodes them with the stand-in VAE on the demo grid). With a total budget of T seconds:

- ``global``: ``unetpp25d_demo`` for T s on every region;
- ``global+regions``: ``unetpp25d_demo`` for T/2 s, then ``unetpp25d_region_ab_th_demo`` and
  ``unetpp25d_region_hn_demo`` for T/4 s each, both starting from it (``init_from``); the test
  cases are predicted by the ensemble of the two region runs, which routes each case to its
  region's run (``--ensemble``).

Both predict the TEST split from the MR files; MAE, bone Dice and PSNR per case, paired tests
(Wilcoxon, t-test, Cohen's d_z; ``latent.app.bench.stats.paired_tests``) overall and per region.
Writes ``<results>/bench_region_finetune.{json,md}`` (default ``benchmarks/results``) with the
machine, its load and the git revision. ``--override KEY=VALUE`` changes every recipe (the
region recipes need the global run's model sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "benchmarks" / "results"
METRICS = ("mae", "bone_dice", "psnr")
REGION_RECIPES = {"AB_TH": "unetpp25d_region_ab_th_demo", "HN": "unetpp25d_region_hn_demo"}


def inputs(args: argparse.Namespace, work: Path) -> tuple[Path, Path, Path, dict[str, list[str]]]:
    """``(data, cache, split_file, splits)``: the given ones, or 30 phantoms (seed 0) encoded here."""
    from latent.core.cases import discover_cases, load_splits, make_splits, save_splits

    data = args.data or work / "data"
    if args.data is None:
        from latent.core.phantom.generate import generate_phantom_dataset

        generate_phantom_dataset(data, args.cases, ["AB", "HN", "TH"], seed=args.seed)
    split_file = args.split_file or save_splits(make_splits(discover_cases(data), seed=0), work / "splits.json")
    cache = args.cache or work / "cache.zarr"
    if args.cache is None:
        from latent.app.demo import DEMO_GRID
        from latent.app.encode_run import encode_dataset
        from latent.core.vae.loading import load_vae

        encode_dataset(data, cache, load_vae("standin"), DEMO_GRID, split_file=split_file, quiet=True)
    return data, cache, split_file, load_splits(split_file)


def train_all(work: Path, cache: Path, split_file: Path, seconds: float, overrides: list[str]) -> dict:
    """The four runs and their training seconds."""
    from latent.app.methods import train_recipe

    runs = work / "runs"
    record = {"global": {"seconds": train_recipe("unetpp25d_demo", runs / "global", cache, split_file, seconds,
                                                 overrides, quiet=True)}}
    record["global_half"] = {"seconds": train_recipe("unetpp25d_demo", runs / "global_half", cache, split_file,
                                                     seconds / 2, overrides, quiet=True)}
    for name, recipe in REGION_RECIPES.items():
        record[name] = {"seconds": train_recipe(recipe, runs / name, cache, split_file, seconds / 4,
                                                [*overrides, f"init_from={runs / 'global_half'}"], quiet=True)}
    for name in record:
        record[name]["run"] = str(runs / name)
    return record


def compare(rows: dict[str, list[dict]]) -> dict:
    """Means and paired tests of ``global+regions`` against ``global``, overall and per region."""
    from latent.app.bench.stats import paired_tests

    def by_pid(method: str, metric: str, region: str | None) -> dict[str, float]:
        return {row["pid"]: row[metric] for row in rows[method] if region is None or row["region"] == region}

    regions = sorted({row["region"] for row in rows["global"]})
    out = {}
    for region in [None, *regions]:
        key = region or "all"
        out[key] = {}
        for metric in METRICS:
            one, two = by_pid("global", metric, region), by_pid("global+regions", metric, region)
            mean = lambda values: sum(values) / len(values) if values else float("nan")  # noqa: E731
            out[key][metric] = {"global": mean(list(one.values())), "global+regions": mean(list(two.values())),
                                **paired_tests(two, one)}
    return out


def markdown(record: dict) -> str:
    """The report: one table, overall and per region."""
    t = record["seconds"]
    lines = [record["header"], "",
             f"{len(record['test'])} test cases; total budget {t:.0f} s: `global` = unetpp25d_demo {t:.0f} s; "
             f"`global+regions` = unetpp25d_demo {t / 2:.0f} s, then AB+TH and HN fine-tunes of {t / 4:.0f} s each "
             "(init_from), predicted by the routed region ensemble. Differences are global+regions - global; "
             "p: two-sided Wilcoxon signed-rank.", "",
             "| cases | n | MAE global | MAE global+regions | difference | p | bone Dice global | bone Dice global+regions | p |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, row in record["comparison"].items():
        mae, dice = row["mae"], row["bone_dice"]
        lines.append(f"| {key} | {mae['n']} | {mae['global']:.1f} | {mae['global+regions']:.1f} | "
                     f"{mae['mean_difference']:+.1f} | {mae['wilcoxon_p']:.3g} | {dice['global']:.3f} | "
                     f"{dice['global+regions']:.3f} | {dice['wilcoxon_p']:.3g} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="total training budget T of each arm (the phantom study: 120)")
    parser.add_argument("--work", type=Path, default=Path("bench_region"), help="scratch folder (replaced)")
    parser.add_argument("--data", type=Path, default=None, help="phantom data root (default: generated)")
    parser.add_argument("--cache", type=Path, default=None, help="latent cache of --data (default: encoded)")
    parser.add_argument("--split-file", type=Path, default=None, help="split JSON (default: the demo's split)")
    parser.add_argument("--cases", type=int, default=30, help="phantoms generated without --data")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed without --data")
    parser.add_argument("--override", action="append", default=[], help="KEY=VALUE for every recipe (repeatable)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the json and md go")
    parser.add_argument("--note", default="", help="recorded with the results (machine state, purpose)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPOSITORY))
    from latent.app.methods import predict_method
    from latent.core.provenance import git_revision, machine_description

    load_before = os.getloadavg()
    started = time.perf_counter()
    work = args.work.resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    data, cache, split_file, splits = inputs(args, work)
    runs = train_all(work, cache, split_file, args.seconds, args.override)
    test = splits["test"]
    arms = {"global": Path(runs["global"]["run"]), "global+regions": [Path(runs[n]["run"]) for n in REGION_RECIPES]}
    rows = {}
    for name, run in arms.items():
        result = predict_method(name.replace("+", "_"), run, data, work, test, 0.0)
        rows[name] = [{"pid": row["pid"], "region": row["region"], **{m: row[m] for m in METRICS}}
                      for row in result.rows]
    record = {"script": "benchmarks/bench_region_finetune.py", "git": git_revision(), "machine": machine_description(),
              "date": f"{datetime.now(timezone.utc):%Y-%m-%d}", "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "wall_seconds": time.perf_counter() - started,
              "note": args.note, "seconds": args.seconds, "overrides": args.override, "data": str(data),
              "cache": str(cache), "split_file": str(split_file), "test": test, "runs": runs, "rows": rows,
              "comparison": compare(rows)}
    record["header"] = (f"<!-- written by benchmarks/bench_region_finetune.py at git {record['git']}, {record['date']}, "
                        f"{record['machine']}, load average {load_before[0]:.2f} before / "
                        f"{record['load_average_after'][0]:.2f} after. {args.note} -->\n"
                        "# Global vs global + region fine-tunes at the same budget (unetpp25d, phantoms, test split)")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "bench_region_finetune.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (args.results / "bench_region_finetune.md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
