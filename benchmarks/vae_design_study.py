"""Which small-VAE design converges fastest per CPU-second? (the shipped stand-in VAE's study)

Trains several ``latent vae fit`` variants side by side on the stand-in VAE's training set
(phantoms of a seed the demo and the tests never use), each with the same wall-clock budget
and one CPU thread, and scores every variant the way the demo uses it: masked MAE in HU of
decode(encode(CT)) on the validation cases (canonical grid, VAE window), per tissue class, and
the MR reconstruction error. Writes ``benchmarks/results/vae_design_study.{json,md}``.

    python benchmarks/vae_design_study.py --work bench_run/vae_study --seconds 300 --note "..."

Each variant's folder under ``--work`` is a resumable ``latent vae fit`` run: the winner can be
continued with ``latent vae fit ... --resume`` (see latent/weights/standin_vae/PROVENANCE.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

RESULTS = Path(__file__).resolve().parent / "results"
#: Phantom seed of the stand-in VAE's training set: no test and no demo uses it.
TRAINING_SEED = 9001
TRAINING_CASES = 60
GRID = "3x3x5:32x128x128"
#: Validation cases each fit scores during training (``VAEFitConfig.val_cases`` default).
VALIDATION_DURING_FIT = 6
#: The variants: overrides of the VAEFitConfig defaults (the first is the default design).
VARIANTS = {
    "default": {},
    "ct_only": {"modalities": ["ct"]},
    "groupnorm": {"norm": "group"},
    "lr_3e-4": {"lr": 3e-4},
}


def make_training_set(work: Path) -> tuple[Path, Path]:
    """Phantoms of :data:`TRAINING_SEED` and a train/val split (no test cases: nothing is scored on them)."""
    data, split = work / "data", work / "splits.json"
    if not split.is_file():
        subprocess.run([sys.executable, "-m", "latent.app.cli", "phantom", "--out", str(data), "--cases",
                        str(TRAINING_CASES), "--seed", str(TRAINING_SEED)], check=True)
        subprocess.run([sys.executable, "-m", "latent.app.cli", "split", "--data", str(data), "--out", str(split),
                        "--val", "0.1", "--test", "0.0"], check=True)
    return data, split


def launch(name: str, overrides: dict, data: Path, split: Path, work: Path, seconds: float, threads: int):
    """Start one ``latent vae fit`` variant in its own process."""
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "vae_config.yaml"
    config.write_text(yaml.safe_dump(overrides))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "latent.app.cli", "vae", "fit", "--data", str(data), "--out", str(folder / "vae"),
               "--grid", GRID, "--split-file", str(split), "--config", str(config), "--seconds", str(seconds),
               "--quiet"] + (["--resume"] if (folder / "vae" / "checkpoint").is_dir() else [])
    log = (folder / "fit.log").open("a")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def score(vae_dir: Path, data: Path, split: Path) -> dict:
    """Validation scores of one fitted VAE: CT MAE in HU overall and per tissue, MR L1."""
    import torch

    from latent.core.cases import discover_cases, load_splits
    from latent.core.prepare import prepare_case
    from latent.core.grid import parse_grid_spec
    from latent.core.intensity import vae_to_ct
    from latent.core.vae.loading import load_vae
    from latent.core.vae.inference import decode, encode_mu

    vae = load_vae(str(vae_dir))
    grid = parse_grid_spec(GRID)
    val = set(load_splits(split)["val"])
    classes = {"air": (-2000, -500), "soft": (-500, 250), "bone": (250, 1000), "above_1000": (1000, 4000)}
    errors: dict[str, list[float]] = {name: [] for name in ["all", *classes]}
    bias: dict[str, list[float]] = {name: [] for name in classes}
    mr_l1 = []
    with torch.no_grad():
        for case in discover_cases(data):
            if case.pid not in val:
                continue
            prepared = prepare_case(case, grid)
            mask = prepared.mask > 0
            hu = vae_to_ct(prepared.ct_vae)
            full_hu = (prepared.ct_full + 1) / 2 * 4095 - 1024
            x = torch.from_numpy(prepared.ct_vae)[None, None]
            recon = vae_to_ct(decode(vae, encode_mu(vae, x))[0, 0].numpy())
            errors["all"].append(float(np.abs(recon - hu)[mask].mean()))
            for name, (low, high) in classes.items():
                region = mask & (full_hu >= low) & (full_hu < high)
                if region.any():
                    errors[name].append(float(np.abs(recon - full_hu)[region].mean()))
                    bias[name].append(float((recon - full_hu)[region].mean()))
            m = torch.from_numpy(prepared.mr_unit)[None, None]
            mr_l1.append(float((decode(vae, encode_mu(vae, m))[0, 0].numpy() - prepared.mr_unit)[mask].__abs__().mean()))
    report = json.loads((vae_dir / "fit_config.json").read_text())
    return {
        "steps": report["steps"], "selected_step": report["selected_step"],
        "ct_mae_hu_windowed": float(np.mean(errors["all"])),
        **{f"ct_mae_hu_{k}": float(np.mean(v)) if v else None for k, v in errors.items() if k != "all"},
        **{f"ct_bias_hu_{k}": float(np.mean(v)) if v else None for k, v in bias.items()},
        "mr_l1_in_body": float(np.mean(mr_l1)),
        "val_history": report["val_history"],
    }


def write_results(rows: dict, args: argparse.Namespace, seconds: float, split: Path) -> None:
    """JSON + markdown table of the study (written by this script only)."""
    from latent.core.cases import load_splits
    from latent.core.provenance import git_revision, machine_description

    counts = {name: len(pids) for name, pids in load_splits(split).items()}

    RESULTS.mkdir(exist_ok=True)
    record = {"machine": machine_description(),
              "threads_per_variant": args.threads, "seconds_per_variant": args.seconds, "parallel": args.parallel,
              "split_counts": counts, "grid": GRID,
              "training_seed": TRAINING_SEED, "training_cases": TRAINING_CASES, "variants": VARIANTS,
              "git_revision": git_revision(), "note": args.note, "wall_seconds": round(seconds, 1), "results": rows}
    (RESULTS / "vae_design_study.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"<!-- written by benchmarks/vae_design_study.py; {args.note} -->",
             "# Stand-in VAE design study (CPU)", "",
             f"Each variant: `latent vae fit` for {args.seconds:.0f} s with {args.threads} CPU thread(s), "
             f"{args.parallel} variant(s) at a time on a {os.cpu_count()}-core machine; {TRAINING_CASES} phantoms of "
             f"seed {TRAINING_SEED} (train {counts['train']}, val {counts['val']}; each fit validates on "
             f"{VALIDATION_DURING_FIT} of the val cases), grid `{GRID}`. Scores on the CTs of all val "
             "cases, canonical grid, inside the body mask: MAE in HU in the VAE window, then per tissue "
             "class of the true CT against the full-range CT (above 1000 HU the window saturates), and the MR L1.",
             "", "| variant | overrides | steps | CT MAE (HU, window) | air | soft tissue | bone 250-1000 | above 1000 "
             "| soft-tissue bias | MR L1 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        def f(key: str) -> str:
            value = row.get(key)
            return "n/a" if value is None else f"{value:.1f}"
        lines.append(f"| {name} | `{json.dumps(VARIANTS[name])}` | {row['steps']} | {row['ct_mae_hu_windowed']:.1f} | "
                     f"{f('ct_mae_hu_air')} | {f('ct_mae_hu_soft')} | {f('ct_mae_hu_bone')} | {f('ct_mae_hu_above_1000')} "
                     f"| {f('ct_bias_hu_soft')} | {row['mr_l1_in_body']:.4f} |")
    (RESULTS / "vae_design_study.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench_run/vae_study"))
    parser.add_argument("--seconds", type=float, default=300.0, help="training budget per variant")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per variant")
    parser.add_argument("--parallel", type=int, default=2, help="variants trained at once")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--note", default="", help="recorded with the results (machine state, purpose)")
    parser.add_argument("--score-only", action="store_true",
                        help="score the variants already trained under --work (same --seconds/--parallel as that run)")
    args = parser.parse_args()
    started = time.perf_counter()
    data, split = make_training_set(args.work)
    names = [n for n in args.variants.split(",") if n]
    for start in range(0, 0 if args.score_only else len(names), args.parallel):
        processes = [launch(n, VARIANTS[n], data, split, args.work, args.seconds, args.threads)
                     for n in names[start:start + args.parallel]]
        for process in processes:
            if process.wait() != 0:
                raise SystemExit(f"a variant failed; see {args.work}/*/fit.log")
    rows = {name: score(args.work / name / "vae", data, split) for name in names}
    write_results(rows, args, time.perf_counter() - started, split)
    print((RESULTS / "vae_design_study.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
