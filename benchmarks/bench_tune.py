"""Does `latent tune` find a better regress3d demo recipe than the shipped one? Tuned vs shipped on the test split.

    python benchmarks/bench_tune.py [--work bench_run] [--trials 12] [--trial-seconds 45] [--seconds 120]
                                    [--pruner median] [--results benchmarks/results] [--note "..."]

Uses the phantom study's data, cache and split when ``--work`` holds them (``data/``,
``cache.zarr``, ``work/splits.json``, as ``benchmarks/bench_phantom.sh`` leaves them); otherwise
builds ``--cases`` phantoms (regions AB, HN, TH, seed 0), the stratified split (seed 0) and the
cache (shipped stand-in VAE, demo grid) there. Then: ``latent tune`` of ``regress3d_demo`` over
``regress3d_demo_space.yaml`` (``--trials`` x ``--trial-seconds``, TPE seed 0, the pruner), objective
the native-grid validation MAE; the best recipe and the shipped one retrained for ``--seconds``
each; both predict the TEST split from the MR files and are scored (MAE in HU, native grid), with
the bench's paired tests. Writes ``<results>/bench_tune.{json,md}`` with the machine, its load, the
git revision, the trials, the fANOVA importances and tuned vs shipped.
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
RECIPE, SPACE = "regress3d_demo", "regress3d_demo_space"


def inputs(work: Path, cases: int) -> tuple[Path, Path, Path]:
    """``(data, cache, split file)``: the phantom study's when present, else built here."""
    data, cache, split_file = work / "data", work / "cache.zarr", work / "work" / "splits.json"
    if data.is_dir() and cache.is_dir() and split_file.is_file():
        return data, cache, split_file
    from latent.app.demo import DEMO_GRID
    from latent.app.encode_run import encode_dataset
    from latent.core.cases import discover_cases, make_splits, save_splits
    from latent.core.phantom.generate import generate_phantom_dataset
    from latent.core.vae.loading import load_vae

    if not data.is_dir():
        generate_phantom_dataset(data, cases, ["AB", "HN", "TH"], seed=0)
    save_splits(make_splits(discover_cases(data), seed=0), split_file)
    encode_dataset(data, cache, load_vae("standin"), DEMO_GRID, split_file=split_file, quiet=True)
    return data, cache, split_file


def markdown(record: dict) -> str:
    """Trials, importances and tuned vs shipped."""
    space = list(record["space"])
    lines = [record["header"], "",
             f"`latent tune --config {RECIPE} --space {SPACE}`: {record['trials']} trials x {record['trial_seconds']:.0f} s "
             f"({record['pruner']} pruner, TPE seed 0) on the phantom study's split ({record['cases']} cases; "
             f"test {len(record['test'])}); best and shipped retrained {record['seconds']:.0f} s each and scored on "
             f"the test split (native grid). Tuning took {record['tune_seconds']:.0f} s.", "",
             "## Trials (objective: native-grid validation MAE, HU)", "",
             "| trial | state | val MAE | " + " | ".join(space) + " | s | reason |",
             "|---" * (len(space) + 5) + "|"]
    for row in record["trials_table"]:
        value = "" if row["value"] is None else f"{row['value']:.1f}"
        cells = [str(row.get(name)) if not isinstance(row.get(name), float) else f"{row[name]:.4g}" for name in space]
        lines.append(f"| {row['number']} | {row['state']} | {value} | " + " | ".join(cells)
                     + f" | {row['seconds'] or 0:.0f} | {row['reason']} |")
    lines += ["", "## fANOVA importances", ""]
    lines += ([f"- {name}: {value:.3f}" for name, value in record["importances"].items()]
              or [record["importances_note"]])
    test = record["test_result"]
    lines += ["", "## Tuned vs shipped on the test split", "", "| recipe | test MAE (HU) | val MAE of the retrain |",
              "|---|---|---|"]
    for name in ("tuned", "shipped"):
        lines.append(f"| {name} | {test[name]['mae']:.1f} | {test[name]['val_mae']:.1f} |")
    paired = test["paired"]
    lines += ["", f"Paired over {paired['n']} test cases (tuned - shipped): mean {paired['mean_difference']:.1f} HU, "
              f"Wilcoxon p = {paired['wilcoxon_p']:.3g}, paired t p = {paired['ttest_p']:.3g}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench_run"), help="phantom study folder (reused) / scratch")
    parser.add_argument("--cases", type=int, default=30, help="phantoms built when --work has none")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--trial-seconds", type=float, default=45.0)
    parser.add_argument("--seconds", type=float, default=120.0, help="retraining budget of the tuned and shipped recipes")
    parser.add_argument("--pruner", default="median")
    parser.add_argument("--val-every", type=int, default=25, help="validation period of each trial (pruning points)")
    parser.add_argument("--results", type=Path, default=REPOSITORY / "benchmarks" / "results")
    parser.add_argument("--note", default="", help="recorded with the results (machine state, purpose)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPOSITORY))
    from latent.app.bench.stats import paired_tests
    from latent.app.methods import predict_method, train_recipe
    from latent.app.tune.run import TuneSettings, run_tune
    from latent.app.tune.trial import best_validation_mae
    from latent.core.cases import read_split
    from latent.core.provenance import git_revision, machine_description
    from latent.core.recipes import RECIPES_DIR

    load_before, started = os.getloadavg(), time.perf_counter()
    work = args.work.resolve()
    data, cache, split_file = inputs(work, args.cases)
    scratch = work / "bench_tune"
    if scratch.exists():
        shutil.rmtree(scratch)
    overrides = (f"data.cache={cache}", f"data.split_file={split_file}", f"train.val_every={args.val_every}")
    tune_started = time.perf_counter()
    run_tune(TuneSettings(recipe=RECIPE, space=RECIPES_DIR / f"{SPACE}.yaml", out=scratch / "tune", trials=args.trials,
                          overrides=overrides, trial_seconds=args.trial_seconds, pruner=args.pruner))
    tune_seconds = time.perf_counter() - tune_started
    summary = json.loads((scratch / "tune" / "tune.json").read_text())
    if summary["best"] is None:
        print("no trial completed: nothing to retrain", file=sys.stderr)
        return 1
    test = read_split(split_file, "test")
    recipes = {"tuned": scratch / "tune" / "best_recipe.yaml", "shipped": RECIPES_DIR / f"{RECIPE}.yaml"}
    scores, by_pid = {}, {}
    for name, recipe in recipes.items():
        run_dir = scratch / "runs" / name
        seconds = train_recipe(recipe, run_dir, cache, split_file, args.seconds, [f"train.val_every={args.val_every}"])
        result = predict_method(name, run_dir, data, scratch, test, seconds)
        by_pid[name] = {row["pid"]: row["mae"] for row in result.rows}
        scores[name] = {"mae": sum(by_pid[name].values()) / len(by_pid[name]), "val_mae": best_validation_mae(run_dir),
                        "train_seconds": seconds, "per_case": by_pid[name]}
        print(name, f"test MAE {scores[name]['mae']:.1f} HU", flush=True)
    scores["paired"] = paired_tests(by_pid["tuned"], by_pid["shipped"])
    record = {"script": "benchmarks/bench_tune.py", "git": git_revision(), "machine": machine_description(),
              "date": f"{datetime.now(timezone.utc):%Y-%m-%d}", "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "wall_seconds": time.perf_counter() - started, "note": args.note,
              "cases": len({pid for pids in json.loads(split_file.read_text()).values() if isinstance(pids, list)
                            for pid in pids}),
              "test": test, "trials": args.trials, "trial_seconds": args.trial_seconds, "seconds": args.seconds,
              "pruner": args.pruner, "val_every": args.val_every, "tune_seconds": tune_seconds,
              "space": _space(),
              "trials_table": summary["trials"], "importances": summary["importances"],
              "importances_note": summary["importances_note"], "best": summary["best"], "test_result": scores}
    record["header"] = (f"<!-- written by benchmarks/bench_tune.py at git {record['git']}, {record['date']}, "
                        f"{record['machine']}, load average {load_before[0]:.2f} before / "
                        f"{record['load_average_after'][0]:.2f} after. {args.note} -->\n"
                        f"# latent tune: {RECIPE} tuned vs shipped (test split, native grid)")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "bench_tune.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (args.results / "bench_tune.md").write_text(markdown(record))
    print(markdown(record))
    return 0


def _space() -> dict:
    from latent.app.tune.space import load_space

    return load_space(SPACE).to_dict()


if __name__ == "__main__":
    sys.exit(main())
