"""Faults by injection: ``kill -9`` of ``latent encode`` and of training at random moments, resumed
each time, and two encoders on one cache at once.

On a small phantom set with a tiny random VAE (the weights do not matter here, only the
bookkeeping), it measures:

- **encode kills**: ``latent encode`` is started and killed with SIGKILL after a seeded random
  delay, again and again, until ``--kills`` kills landed while it was still running; whenever a
  run completes, the round's cache is checked and a new round starts on a fresh cache. Every
  round's cache must pass ``LatentCache.verify()``, hold every case exactly once, and hold the
  same arrays as an uninterrupted reference encode.
- **training kills**: ``translate/train.py`` (a tiny ``l2l_regress``, a checkpoint every 2 steps)
  is killed the same way and resumed with ``--resume`` until it reaches ``max_steps``. Its
  ``metrics.jsonl`` must hold every step once, in order, and its losses are compared with an
  uninterrupted run of the same recipe (reported: the largest difference).
- **two encoders at once** on one fresh cache, without ``--shard``: both must finish, and the
  cache must verify clean with every case once.

    .venv/bin/python benchmarks/bench_faults.py [--kills 20] [--seed 0] [--cases 8]

Writes ``benchmarks/results/bench_faults.{json,md}`` (with the git revision) and exits 1 when a
check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GRID = "8x8x6:32x32x32"
TINY_VAE = {
    "spatial_dims": 3, "in_channels": 1, "out_channels": 1, "latent_channels": 4, "channels": [8, 8, 16],
    "num_res_blocks": 1, "norm_num_groups": 4, "attention_levels": [False, False, False],
    "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False,
}
#: One thread per process: runs are then bit-identical, so arrays can be compared exactly.
ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
LATENT = [sys.executable, "-m", "latent.app.cli"]


def _run(arguments: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(arguments, env=ENVIRONMENT, cwd=ROOT, capture_output=True, text=True, **kwargs)


def _kill_after(arguments: list[str], delay: float) -> tuple[bool, int]:
    """Start ``arguments``; SIGKILL it after ``delay`` s. Returns (killed while running, exit code)."""
    process = subprocess.Popen(arguments, env=ENVIRONMENT, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        process.wait(timeout=delay)
        return False, process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return True, process.returncode


def _case_arrays(cache_path: Path) -> tuple[dict[str, dict[str, np.ndarray]], list[str]]:
    from latent.cache import LatentCache, list_producers

    producers = list_producers(cache_path)
    assert len(producers) == 1, f"{cache_path}: {len(producers)} producers"
    cache = LatentCache.open(cache_path, next(iter(producers)))
    ids = cache.case_ids()
    return {pid: cache.read_case(pid, as_float32=False) for pid in ids}, cache.verify()


def _same(left: dict, right: dict) -> bool:
    return sorted(left) == sorted(right) and all(
        sorted(left[pid]) == sorted(right[pid]) and all(np.array_equal(left[pid][k], right[pid][k]) for k in left[pid])
        for pid in left)


def encode_kills(work: Path, data: Path, vae: Path, kills: int, rng: random.Random) -> dict:
    encode = lambda cache: LATENT + ["encode", "--data", str(data), "--cache", str(cache), "--vae", str(vae),  # noqa: E731
                                     "--grid", GRID, "-q"]
    reference_path = work / "reference.zarr"
    started = time.perf_counter()
    completed = _run(encode(reference_path), timeout=1800)
    assert completed.returncode == 0, completed.stderr
    full_seconds = time.perf_counter() - started
    reference, problems = _case_arrays(reference_path)
    assert not problems, problems
    landed, rounds, runs, failures = 0, [], 0, []
    cache = work / "round0.zarr"
    while landed < kills:
        killed, code = _kill_after(encode(cache), rng.uniform(0.3, full_seconds))
        runs += 1
        landed += killed
        if not killed:
            if code != 0:
                failures.append(f"run {runs}: exit {code} without a kill")
            arrays, problems = _case_arrays(cache)
            rounds.append({"cases": len(arrays), "verify_problems": problems, "same_as_reference": _same(arrays, reference)})
            cache = work / f"round{len(rounds)}.zarr"
    # finish the last round so that it is checked too
    completed = _run(encode(cache), timeout=1800)
    if completed.returncode != 0:
        failures.append(f"final run: exit {completed.returncode}: {completed.stderr[-300:]}")
    arrays, problems = _case_arrays(cache)
    rounds.append({"cases": len(arrays), "verify_problems": problems, "same_as_reference": _same(arrays, reference)})
    lost = sum(len(reference) - r["cases"] for r in rounds)
    ok = not failures and all(r["cases"] == len(reference) and not r["verify_problems"] and r["same_as_reference"]
                              for r in rounds)
    return {"kills": landed, "runs": runs, "rounds": len(rounds), "cases": len(reference), "cases_lost": lost,
            "uninterrupted_seconds": round(full_seconds, 1), "rounds_detail": rounds, "failures": failures, "ok": ok}


def _train_recipe(work: Path, cache: Path, split: Path, run_dir: Path, max_steps: int) -> Path:
    recipe = {
        "data": {"cache": str(cache), "split_file": str(split), "batch_size": 1, "val_split": None, "preload": True},
        "model": {"family": "l2l_regress", "channels": [8, 8], "num_res_blocks": 1, "norm_num_groups": 4,
                  "num_head_channels": 4, "lr": 1e-3},
        "train": {"seed": 0, "max_steps": max_steps, "log_every": 1, "checkpoint_every": 2, "mixed_precision": "no",
                  "tensorboard": False},
        "run_dir": str(run_dir),
    }
    path = work / f"{run_dir.name}.json"
    path.write_text(json.dumps(recipe))
    return path


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)), "steps repeated or out of order"
    return {r["step"]: float(r["loss"]) for r in records if "loss" in r}


def training_kills(work: Path, cache: Path, split: Path, kills: int, rng: random.Random, max_steps: int) -> dict:
    train = [sys.executable, str(ROOT / "translate" / "train.py"), "--quiet", "--config"]
    reference_dir = work / "train_reference"
    started = time.perf_counter()
    completed = _run(train + [str(_train_recipe(work, cache, split, reference_dir, max_steps))], timeout=1800)
    assert completed.returncode == 0, completed.stderr
    full_seconds = time.perf_counter() - started
    reference = _losses(reference_dir)
    landed, runs, failures, rounds = 0, 0, [], []

    def check(run_dir: Path) -> None:
        losses = _losses(run_dir)
        difference = max((abs(losses[s] - reference[s]) for s in reference if s in losses), default=float("nan"))
        rounds.append({"every_step_once": sorted(losses) == sorted(reference), "largest_loss_difference": difference})

    run_dir = work / "train_killed_0"
    recipe = _train_recipe(work, cache, split, run_dir, max_steps)
    while True:
        # killed before its first complete checkpoint: the run's records are there, nothing to resume
        complete = any(run_dir.glob("checkpoints/step_*/trainer_state.json"))
        resume = ["--resume"] if complete else ["--overwrite"] if run_dir.exists() else []
        if landed < kills:
            killed, code = _kill_after(train + [str(recipe)] + resume, rng.uniform(2.0, full_seconds))
        else:
            completed = _run(train + [str(recipe)] + resume, timeout=1800)
            killed, code = False, completed.returncode
        runs += 1
        landed += killed
        if killed:
            continue
        if code != 0:
            failures.append(f"run {runs}: exit {code}")
        check(run_dir)
        if landed >= kills:
            break
        run_dir = work / f"train_killed_{len(rounds)}"  # this round finished early: a new one
        recipe = _train_recipe(work, cache, split, run_dir, max_steps)
    complete = all(r["every_step_once"] for r in rounds)
    difference = max(r["largest_loss_difference"] for r in rounds)
    return {"kills": landed, "runs": runs, "rounds": len(rounds), "max_steps": max_steps,
            "every_step_once": complete, "largest_loss_difference_vs_uninterrupted": difference,
            "uninterrupted_seconds": round(full_seconds, 1), "failures": failures,
            "ok": not failures and complete}


def concurrent_encodes(work: Path, data: Path, vae: Path, expected: int) -> dict:
    cache = work / "concurrent.zarr"
    arguments = LATENT + ["encode", "--data", str(data), "--cache", str(cache), "--vae", str(vae), "--grid", GRID, "-q"]
    processes = [subprocess.Popen(arguments, env=ENVIRONMENT, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=1800) for process in processes]
    codes = [process.returncode for process in processes]
    arrays, problems = _case_arrays(cache)
    return {"exit_codes": codes, "cases": len(arrays), "expected": expected, "verify_problems": problems,
            "stderr_tails": [err[-300:] for _, err in outputs],
            "ok": codes == [0, 0] and len(arrays) == expected and not problems}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="kills that must land while a process runs, per part")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=8, help="small phantom cases")
    parser.add_argument("--max-steps", type=int, default=40, help="training steps of the killed run")
    parser.add_argument("--note", default="", help="recorded in the report (machine state)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch
    from monai.networks.nets import AutoencoderKL

    from latent.core.cases import discover_cases, make_splits, save_splits
    from latent.core.phantom.generate import generate_phantom_dataset
    from latent.core.provenance import git_revision, machine_description
    from latent.core.vae.loading import save_vae_dir

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="bench_faults_"))
    try:
        data = work / "data"
        generate_phantom_dataset(data, args.cases, ["AB", "HN", "TH"], seed=5150, size="small")
        torch.manual_seed(0)
        vae = save_vae_dir(AutoencoderKL(**TINY_VAE), {"class_name": "AutoencoderKL", "kwargs": TINY_VAE}, work / "vae")
        split = save_splits(make_splits(discover_cases(data), (0.75, 0.0, 0.25)), work / "splits.json")
        report = {"revision": git_revision(), "machine": machine_description(), "note": args.note,
                  "seed": args.seed, "cases": args.cases}
        report["encode"] = encode_kills(work, data, vae, args.kills, rng)
        print("encode:", {k: v for k, v in report["encode"].items() if k != "rounds_detail"}, flush=True)
        report["training"] = training_kills(work, work / "reference.zarr", split, args.kills, rng, args.max_steps)
        print("training:", report["training"], flush=True)
        report["concurrent"] = concurrent_encodes(work, data, vae, report["encode"]["cases"])
        print("concurrent:", {k: v for k, v in report["concurrent"].items() if k != "stderr_tails"}, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_faults.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    encode, training, concurrent = report["encode"], report["training"], report["concurrent"]
    lines = [
        f"<!-- written by benchmarks/bench_faults.py at git {report['revision']}, {report['machine']}"
        + (f"; {args.note}" if args.note else "") + " -->",
        "# Faults by injection (kill -9, resume)", "",
        f"Seed {args.seed}, {args.cases} small phantom cases, grid {GRID}, a tiny random VAE.", "",
        "| part | kills landed | runs | checks | result |", "|---|---|---|---|---|",
        f"| `latent encode` | {encode['kills']} | {encode['runs']} | {encode['rounds']} round(s) of {encode['cases']} cases: "
        f"verify clean, every case once, arrays identical to an uninterrupted encode; cases lost: {encode['cases_lost']} "
        f"| {'pass' if encode['ok'] else 'FAIL'} |",
        f"| training (`l2l_regress`, {training['max_steps']} steps, checkpoint every 2) | {training['kills']} | "
        f"{training['runs']} | {training['rounds']} round(s): every step logged once: {training['every_step_once']}; largest loss difference "
        f"against an uninterrupted run: {training['largest_loss_difference_vs_uninterrupted']:.3g} "
        f"| {'pass' if training['ok'] else 'FAIL'} |",
        f"| two `latent encode` at once, one cache | - | 2 | exit codes {concurrent['exit_codes']}, "
        f"{concurrent['cases']} of {concurrent['expected']} cases, verify problems: {len(concurrent['verify_problems'])} "
        f"| {'pass' if concurrent['ok'] else 'FAIL'} |",
    ]
    (RESULTS / "bench_faults.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if encode["ok"] and training["ok"] and concurrent["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
