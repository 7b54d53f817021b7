"""The training data path of ``bench_cache.py``: loader stall and cold start of an experiment.

- **stall**: a real ``latent.translate.train.train`` run of a small latent recipe on the cache, with
  timers around every ``next()`` of the (Accelerate-wrapped) training loader. The stall share
  is the time spent waiting for batches over the whole step time (wait + forward, backward,
  optimiser step, logging). Target <= 5 %.
- **cold start**: a fresh ``python translate/train.py --config ...`` subprocess on the
  existing cache, from launch to the first optimiser step (its ``metrics.jsonl`` record of
  step 1 appearing, with ``train.log_every=1``). Target <= 15 s.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
#: The small latent recipe both measurements train (cheapest latent model: one UNet pass).
RECIPE = ROOT / "configs" / "l2l_regress_demo.yaml"
TARGET_STALL_SHARE = 0.05
TARGET_COLD_START_S = 15.0


def recipe_overrides(cache: Path, split_file: Path, run_dir: Path, steps: int) -> list[str]:
    """The recipe pointed at the bench cache, a fixed step count and no mid-run checkpoint."""
    return [f"data.cache={cache}", f"data.split_file={split_file}", f"run_dir={run_dir}",
            f"train.max_steps={steps}", "train.max_seconds=null", f"train.checkpoint_every={steps}",
            f"train.val_every={steps}", "train.log_every=1", "train.tensorboard=false"]


@contextmanager
def timed_loader_waits(waits: list[float], marks: list[float]) -> Iterator[None]:
    """Record each wait for the next training batch (``waits``) and when it arrived (``marks``).

    Wraps ``accelerate``'s ``DataLoaderShard.__iter__``, the loader ``translate/train.py``
    iterates after ``accelerator.prepare``; restored on exit.
    """
    from accelerate.data_loader import DataLoaderShard

    original = DataLoaderShard.__iter__

    def timed(self):  # type: ignore[no-untyped-def]
        iterator = original(self)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            now = time.perf_counter()
            waits.append(now - start)
            marks.append(now)
            yield batch

    DataLoaderShard.__iter__ = timed
    try:
        yield
    finally:
        DataLoaderShard.__iter__ = original


def measure_stall(cache: Path, split_file: Path, work: Path, steps: int, preload: bool) -> dict:
    """Train ``steps`` steps of the recipe in this process and time the loader waits."""
    import torch

    from latent.translate.train import load_config, train

    run_dir = work / f"stall_run_preload_{preload}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a kept work folder: start afresh
    overrides = recipe_overrides(cache, split_file, run_dir, steps) + [f"data.preload={str(preload).lower()}",
                                                                     "data.val_split=null"]
    config = load_config(str(RECIPE), overrides)
    waits: list[float] = []
    marks: list[float] = []
    threads = torch.get_num_threads()
    with timed_loader_waits(waits, marks):
        start = time.perf_counter()
        train(config, quiet=True)
        total = time.perf_counter() - start
    # Step i spans from batch i's request to batch i+1's request; the first wait carries the
    # loader start (and the preload, when on), so it is reported apart.
    requests = [mark - wait for mark, wait in zip(marks, waits)]
    spans = [b - a for a, b in zip(requests, requests[1:])]
    steady_waits = waits[1:len(spans)]
    steady_span = sum(spans[1:])
    return {
        "recipe": RECIPE.name, "preload": preload, "steps": steps, "batches": len(waits),
        "batch_size": config.data.batch_size, "torch_threads": threads, "run_seconds": total,
        "first_wait_seconds": waits[0] if waits else None,
        "median_step_seconds": statistics.median(spans[1:]) if len(spans) > 1 else None,
        "median_wait_ms": 1e3 * statistics.median(steady_waits) if steady_waits else None,
        "stall_share": sum(steady_waits) / steady_span if steady_span else None,
        "stall_share_with_first": sum(waits[: len(spans)]) / (sum(spans) + waits[0]) if spans else None,
    }


def first_step_record(metrics_path: Path) -> dict | None:
    """The first record of ``metrics.jsonl`` when it is complete, else None."""
    try:
        text = metrics_path.read_text()
    except FileNotFoundError:
        return None
    line = text.split("\n", 1)[0]
    return json.loads(line) if "\n" in text and line.strip() else None


def measure_cold_start(cache: Path, split_file: Path, work: Path, run: int, threads: int | None = None,
                       timeout: float = 300.0) -> dict:
    """Launch ``translate/train.py`` as a new process and time launch -> first optimiser step.

    ``threads`` sets ``OMP_NUM_THREADS`` (torch's intra-op threads) for the process.
    """
    run_dir = work / f"cold_start_{run}"
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, str(ROOT / "translate" / "train.py"), "--config", str(RECIPE), "--quiet",
               *recipe_overrides(cache, split_file, run_dir, steps=2)]
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    if threads is not None:
        environment["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    first, record = None, None
    while first is None and process.poll() is None and time.perf_counter() - start < timeout:
        record = first_step_record(run_dir / "metrics.jsonl")
        if record is not None:
            first = time.perf_counter() - start
        else:
            time.sleep(0.02)
    if first is not None:
        process.terminate()  # the first step is all this measures
    _, stderr = process.communicate(timeout=timeout)
    if first is None:
        raise RuntimeError(f"train.py stopped before its first step (exit {process.returncode}): "
                           f"{stderr.strip()[-500:]}")
    return {"launch_to_first_step_seconds": first, "first_step_seconds": record["elapsed_s"],
            "launch_to_loop_seconds": first - record["elapsed_s"], "omp_num_threads": threads,
            "command": " ".join(Path(part).name if part.startswith(str(ROOT)) else part for part in command[:5])}


#: Imported one after the other in a fresh interpreter: what a cold start pays before any work.
#: ``torch._dynamo`` is imported by the first optimiser's construction (torch's own lazy import).
IMPORT_STEPS = ("torch", "monai", "torch._dynamo", "accelerate", "latent.translate.train", "latent.translate.models.l2l_regress",
                "latent.app.validation")
_IMPORT_SCRIPT = """
import importlib, json, sys, time
times = {}
for name in sys.argv[1:]:
    start = time.perf_counter()
    importlib.import_module(name)
    times[name] = time.perf_counter() - start
print(json.dumps(times))
"""


def import_breakdown() -> dict[str, float]:
    """Seconds of each import of :data:`IMPORT_STEPS` in a fresh interpreter, and their sum."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _IMPORT_SCRIPT, *IMPORT_STEPS], cwd=ROOT, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    times = json.loads(done.stdout.strip().splitlines()[-1])
    return {**times, "total_imports": sum(times.values()), "interpreter_total": time.perf_counter() - start}


def training_path(cache: Path, split_file: Path, work: Path, steps: int, cold_runs: int) -> dict:
    """Stall (preload on, as the recipe, and off) and cold start (median of ``cold_runs``)."""
    stall = {"preload": measure_stall(cache, split_file, work, steps, preload=True),
             "streamed": measure_stall(cache, split_file, work, steps, preload=False)}
    colds = [measure_cold_start(cache, split_file, work, run) for run in range(cold_runs)]
    median = statistics.median(c["launch_to_first_step_seconds"] for c in colds)
    one_thread = [measure_cold_start(cache, split_file, work, cold_runs + run, threads=1) for run in range(cold_runs)]
    worst_stall = max(s["stall_share"] for s in stall.values())
    return {
        "stall": stall, "cold_start_runs": colds, "cold_start_median_seconds": median,
        "cold_start_one_thread_runs": one_thread,
        "cold_start_one_thread_median_seconds": statistics.median(
            c["launch_to_first_step_seconds"] for c in one_thread),
        "imports": import_breakdown(),
        "targets": {
            "stall_share": {"target": f"<= {TARGET_STALL_SHARE:.0%}", "value": worst_stall,
                            "met": worst_stall <= TARGET_STALL_SHARE},
            "cold_start": {"target": f"<= {TARGET_COLD_START_S:g} s", "value": median,
                           "met": median <= TARGET_COLD_START_S},
        },
    }


def training_table(result: dict) -> list[str]:
    """Markdown rows of :func:`training_path`'s result."""
    stall, targets = result["stall"], result["targets"]
    mark = {name: ("met" if row["met"] else "MISSED") for name, row in targets.items()}
    lines = ["| measure | value | target |", "| --- | --- | --- |"]
    for name, row in stall.items():
        lines.append(
            f"| loader stall, {row['recipe']} preload={row['preload']} ({row['steps']} steps, batch "
            f"{row['batch_size']}, {row['torch_threads']} torch threads) | {row['stall_share']:.2%} of step time "
            f"(median wait {row['median_wait_ms']:.2f} ms, median step {row['median_step_seconds']:.3f} s; "
            f"first batch {row['first_wait_seconds']:.3f} s) | <= {TARGET_STALL_SHARE:.0%}: {mark['stall_share']} |")
    for label, key, verdict in (("default torch threads", "cold_start", f"<= {TARGET_COLD_START_S:g} s: "
                                 f"{mark['cold_start']}"), ("OMP_NUM_THREADS=1", "cold_start_one_thread", "(reported)")):
        runs = result[f"{key}_runs"]
        median = statistics.median(c["launch_to_loop_seconds"] for c in runs)
        step = statistics.median(c["first_step_seconds"] for c in runs)
        each = ", ".join(f"{c['launch_to_first_step_seconds']:.1f}" for c in runs)
        lines.append(
            f"| cold start, launch -> first optimiser step, {label} (median of {len(runs)}: {each} s) | "
            f"{result[f'{key}_median_seconds']:.1f} s (launch -> loop {median:.1f} s, first step {step:.2f} s) | "
            f"{verdict} |")
    imports = result["imports"]
    lines.append("| imports in a fresh interpreter, one after the other | " + ", ".join(
        f"{name} {imports[name]:.1f} s" for name in IMPORT_STEPS) + f"; total {imports['total_imports']:.1f} s | |")
    return lines


def training_markdown(result: dict, note: str = "") -> list[str]:
    """The report section of :func:`training_path`'s result."""
    return [
        "## Training data path",
        "",
        f"Machine load average (1/5/15 min): {result['load_average_start']} at the start, "
        f"{result['load_average_end']} at the end." + (f" Note: {note}" if note else ""),
        "",
        *training_table(result),
        "",
        f"- Stall: `latent.translate.train.train` of `configs/{RECIPE.name}` on this cache (no validation), with timers "
        "around every `next()` of the Accelerate-wrapped training loader (`benchmarks/cache_training.py`); "
        "share = waits / step spans after the first batch.",
        f"- Cold start: `python translate/train.py --config configs/{RECIPE.name}` as a new process on the "
        "existing cache, until `metrics.jsonl` holds step 1 (`train.log_every=1`).",
        "",
    ]
