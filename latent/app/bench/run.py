"""``latent bench``: every method on one fixed split, trained where needed, scored and reported.

For each method of a :class:`~latent.app.bench.config.BenchConfig`: the baselines and the grid
and VAE floors are predicted directly; each learned family reuses ``<runs>/<method>`` when that
run is complete and is trained there with the stated budget otherwise; then the test split is
predicted from the raw MR files and scored. The report (``latent.app.bench.report``) adds the
paired tests, the compute table (training seconds and peak memory, inference seconds split into
encode / translate / decode, parameters), the latent cache's one-time cost amortised over
several experiments, the DDIM step curve, the training curves and one test case's slices.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from latent.app.bench.config import (BASELINES, ORACLES, SWEPT, VAE_FLOOR, BenchConfig, Variant,
                                     parse_variant, samples_per_case)
from latent.app.bench.memory import PeakMemory
from latent.app.methods import (MethodResult, baseline_result, grid_floor_result, predict_method, train_recipe,
                                vae_floor_result)
from latent.core.cases import check_split_ids, discover_cases, load_splits, make_splits, save_splits
from latent.core.errors import BadConfigError, InputError, one_line
from latent.core.recipes import find_recipe
from latent.translate.models.base import family_class

logger = logging.getLogger(__name__)

#: Written into a run folder trained by the bench: its budget, seconds and peak memory, read back on reuse.
TRAIN_RECORD = "bench_train.json"
#: Methods that predict without a trained run.
NOT_TRAINED = (*BASELINES, *ORACLES, VAE_FLOOR)


@dataclass
class CacheFacts:
    """The latent cache a benchmark ran on and what it cost."""

    path: Path
    producer_key: str
    grid: str
    vae: str
    cases: int
    build_seconds: float
    read_seconds: float
    built_here: bool


@dataclass
class TrainRecord:
    """One learned method's run: where, how long, at what memory, with which recipe."""

    run_dir: Path
    seconds: float
    peak_memory_mb: float
    peak_cuda_mb: float
    recipe: str
    reused: bool


def resolve_splits(config: BenchConfig) -> tuple[Path, dict[str, list[str]]]:
    """The split file and its splits: the given one, or a stratified split (seed 0) written to the work folder.

    Raises:
        BadConfigError: a split without train, validation or test cases.
        BadFileError: a given split file with an id twice, a case in two splits, or an id not in the data.
    """
    if config.split_file is not None:
        split_file, splits = config.split_file, load_splits(config.split_file)
        check_split_ids(split_file, splits, list(splits), [case.pid for case in discover_cases(config.data)],
                        config.data)
    else:
        splits = make_splits(discover_cases(config.data), seed=0)
        split_file = save_splits(splits, config.work / "splits.json")
    needed = ["test"] + (["train"] if any(m not in ORACLES + (VAE_FLOOR, "water") for m in config.methods) else [])
    empty = [name for name in needed if not splits.get(name)]
    if empty:
        raise BadConfigError(f"{split_file}: the split has no {' and no '.join(empty)} case")
    return split_file, splits


def _recorded_build_seconds(cache_path: Path, producer_key: str) -> float:
    """Encoding seconds of a cache built in one go, from its encode manifests (NaN if a run resumed)."""
    folder = cache_path.with_name(cache_path.name + ".manifests")
    total, found = 0.0, False
    for path in sorted(folder.glob(f"encode_{producer_key}_shard*.json")):
        record = json.loads(path.read_text())
        if record.get("skipped") or "seconds" not in record:
            return math.nan  # resumed or written before manifests recorded seconds: the cost is unknown
        total, found = total + float(record["seconds"]), True
    return total if found else math.nan


def prepare_cache(config: BenchConfig, split_file: Path) -> CacheFacts:
    """Open the cache (building it with ``config.vae`` and ``config.grid`` when missing) and time one full read."""
    from latent.cache import LatentCache, pick_producer
    from latent.app.encode_run import encode_dataset
    from latent.core.grid import CanonicalGrid
    from latent.core.vae.loading import load_vae

    built_here, build_seconds = False, math.nan
    if not config.cache.exists():
        if config.vae is None:
            raise BadConfigError(f"--cache {config.cache}: no such cache; pass --vae (and --grid) to build it")
        logger.info("building the latent cache %s", config.cache)
        report = encode_dataset(config.data, config.cache, load_vae(config.vae), config.grid, split_file=split_file,
                                quiet=config.quiet)
        built_here, build_seconds = True, report.seconds
    key, record = pick_producer(config.cache, None)
    if not built_here:
        build_seconds = _recorded_build_seconds(config.cache, key)
    cache = LatentCache.open(config.cache, key)
    started = time.perf_counter()
    pids = cache.case_ids()
    for pid in pids:
        cache.read_case(pid)
    read_seconds = time.perf_counter() - started
    location = record.get("vae_location", {})
    vae = config.vae or location.get("path") or location.get("name")
    if not vae:
        raise BadConfigError(f"--cache {config.cache}: the cache does not record where its VAE is; pass --vae")
    grid = CanonicalGrid.from_dict(record["grid"]).spec()
    return CacheFacts(config.cache, key, grid, str(vae), len(pids), build_seconds, read_seconds, built_here)


def _reusable(run_dir: Path) -> bool:
    return (run_dir / "final" / "model.safetensors").is_file()


def _elapsed(run_dir: Path) -> float:
    """The last ``elapsed_s`` that a run logged: its training seconds when the bench did not train it."""
    seconds = [json.loads(line).get("elapsed_s") for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if line.strip()] if (run_dir / "metrics.jsonl").is_file() else []
    seconds = [float(value) for value in seconds if value is not None]
    return max(seconds) if seconds else math.nan


def train_or_reuse(config: BenchConfig, name: str, recipe: str, split_file: Path, cache: Path,
                   overrides: list[str] = ()) -> TrainRecord:
    """``<runs>/<name>``: reused when complete (its recorded or logged seconds), else trained with the budget."""
    run_dir = config.runs / name
    recipe_path = str(find_recipe(recipe))
    if _reusable(run_dir):
        recorded = json.loads((run_dir / TRAIN_RECORD).read_text()) if (run_dir / TRAIN_RECORD).is_file() else {}
        logger.info("%s: reusing %s", name, run_dir)
        return TrainRecord(run_dir, float(recorded.get("seconds", _elapsed(run_dir))),
                           float(recorded.get("peak_memory_mb", math.nan)), float(recorded.get("peak_cuda_mb", math.nan)),
                           recorded.get("recipe", recipe_path), True)
    changes = [*config.overrides, *overrides]
    logger.info("%s: training %s for %.0f s", name, recipe_path, config.seconds)
    with PeakMemory() as memory:
        seconds = train_recipe(recipe_path, run_dir, cache, split_file, config.seconds, changes, quiet=config.quiet)
    described = recipe_path + (f" ({' '.join(changes)})" if changes else "")
    record = TrainRecord(run_dir, seconds, memory.peak_rss_mb, memory.peak_cuda_mb, described, False)
    (run_dir / TRAIN_RECORD).write_text(json.dumps(
        {"seconds": seconds, "peak_memory_mb": memory.peak_rss_mb, "peak_cuda_mb": memory.peak_cuda_mb,
         "budget_seconds": config.seconds, "recipe": described}, indent=2) + "\n")
    return record


def train_learned(config: BenchConfig, family: str, split_file: Path, cache: Path, fold: tuple[int, int] | None = None
                  ) -> TrainRecord:
    """Train (or reuse) a learned family, or a recipe another family starts from, on fold ``(k, K)``
    of train + val when given (run ``<name>_fold<k>of<K>``). What the family's class names in
    ``starts_from`` (l2sct: an l2l_regress run; the ControlNet: its prior) is trained first and its
    seconds are added to the row."""
    suffix, overrides = ("", []) if fold is None else (f"_fold{fold[0]}of{fold[1]}", [f"data.fold={fold[0]}/{fold[1]}"])
    cls = family_class(family)
    start = cls.starts_from if cls is not None else None
    if start is None:
        return train_or_reuse(config, family + suffix, config.recipe(family), split_file, cache, overrides)
    first = train_learned(config, start[0], split_file, cache, fold)
    record = train_or_reuse(config, family + suffix, config.recipe(family), split_file, cache,
                            [*overrides, f"model.{start[1]}={first.run_dir}"])
    record.seconds += first.seconds
    record.peak_memory_mb = max(record.peak_memory_mb, first.peak_memory_mb)
    return record


def train_variant(config: BenchConfig, variant: Variant, split_file: Path, cache: Path) -> list[TrainRecord]:
    """The run of a family (shared by its ``+tta`` variant), or its K fold runs for ``+ensK``."""
    if variant.folds == 1:
        return [train_learned(config, variant.family, split_file, cache)]
    return [train_learned(config, variant.family, split_file, cache, (k, variant.folds))
            for k in range(1, variant.folds + 1)]


def training_curve(run_dir: Path) -> list[tuple[float, float]]:
    """``(training seconds, validation MAE)`` of every validation a run logged with its time."""
    path = run_dir / "metrics.jsonl"
    points = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        record = json.loads(line) if line.strip() else {}
        if "val/mae" in record and "elapsed_s" in record:
            points.append((float(record["elapsed_s"]), float(record["val/mae"])))
    return points


def cache_table(facts: CacheFacts, experiments: tuple[int, ...]) -> tuple[list[str], list[list[str]]]:
    """The one-time encode cost spread over N experiments, against re-encoding for every experiment."""
    headers = ["experiments", "encode once (s)", "read per experiment (s)", "with the cache, s per experiment",
               "re-encoding, s per experiment", "speed-up"]
    rows = []
    for count in experiments:
        cached = facts.build_seconds / count + facts.read_seconds
        rows.append([str(count), f"{facts.build_seconds:.1f}", f"{facts.read_seconds:.2f}", f"{cached:.2f}",
                     f"{facts.build_seconds:.1f}", f"{facts.build_seconds / cached:.1f}x"])
    return headers, rows


def _compute(result: MethodResult, train: TrainRecord | None, predict_memory: PeakMemory) -> dict:
    figures = {"train_seconds": result.train_seconds, "seconds_per_volume": result.seconds_per_volume,
               "parameters": result.parameters, **{f"{k}_s": v for k, v in result.stage_seconds.items()},
               "peak_memory_mb": train.peak_memory_mb if train is not None else math.nan,
               "predict_peak_memory_mb": predict_memory.peak_rss_mb}
    for key, value in (("train_peak_cuda_mb", train.peak_cuda_mb if train else math.nan),
                       ("predict_peak_cuda_mb", predict_memory.peak_cuda_mb)):
        if math.isfinite(value):
            figures[key] = value
    if train is not None and train.reused:
        figures["reused_run"] = str(train.run_dir)
    return figures


def run_method(config: BenchConfig, name: str, splits: dict[str, list[str]], split_file: Path,
               facts: CacheFacts | None, progress: tqdm) -> tuple[list[MethodResult], dict[str, dict], dict]:
    """Predict and score one method (training it first when it learns); its rows, compute and training facts.

    Returns ``([result, *sweep results], {name: compute}, {"recipe", "curve"})``.
    """
    work, test = config.work, splits["test"]
    train, variant = None, parse_variant(name) or (Variant(name) if name not in NOT_TRAINED else None)
    if variant is not None:
        progress.set_postfix_str(f"{name}: train")
        members = train_variant(config, variant, split_file, facts.path)
        train = TrainRecord(members[0].run_dir, sum(m.seconds for m in members),
                            max(m.peak_memory_mb for m in members), max(m.peak_cuda_mb for m in members),
                            "; ".join(dict.fromkeys(m.recipe for m in members)), all(m.reused for m in members))
        run_dirs = [m.run_dir for m in members]
    progress.set_postfix_str(f"{name}: predict + score")
    with PeakMemory() as memory:
        if name in BASELINES:
            result = baseline_result(name, config.data, work, splits)
        elif name in ORACLES:
            result = grid_floor_result(name, config.data, work, facts.grid, test)
        elif name == VAE_FLOOR:
            result = vae_floor_result(config.data, work, facts.vae, facts.path, test, 0.0)
        else:
            samples = samples_per_case(variant.family, config.samples)
            result = predict_method(name, run_dirs if len(run_dirs) > 1 else run_dirs[0], config.data, work, test,
                                    train.seconds, samples=samples, vae_spec=facts.vae,
                                    tta="flip" if variant.tta else "none", quiet=config.quiet)
    results, compute = [result], {name: _compute(result, train, memory)}
    if name == SWEPT:
        for steps in config.ddim_steps:
            progress.set_postfix_str(f"{name}: {steps} DDIM steps")
            with PeakMemory() as memory:
                swept = predict_method(f"{name}_{steps}steps", train.run_dir, config.data, work, test, train.seconds,
                                       vae_spec=facts.vae, steps=steps, quiet=config.quiet)
            results.append(swept)
            compute[swept.name] = {**_compute(swept, train, memory), "ddim_steps": steps}
    details = {"recipe": train.recipe if train else "none (no training)",
               "curve": training_curve(train.run_dir) if train and variant == Variant(variant.family) else []}
    return results, compute, details


@dataclass
class BenchOutcome:
    """Where the report is, and the methods that failed on an input error (method -> one line)."""

    html_path: Path
    failures: dict[str, str]


def run_bench(config: BenchConfig) -> BenchOutcome:
    """Run the benchmark of ``config``: a method that fails on an input error (a bad recipe or
    run folder, say) is named in the report and the outcome, and the others go on; any other
    exception is a bug and stops the bench."""
    from latent.app.bench import figures as bench_figures
    from latent.app.bench.panels import method_panels
    from latent.app.bench.report import write_report

    started, load_start = time.perf_counter(), os.getloadavg()
    config.work.mkdir(parents=True, exist_ok=True)
    config.out.mkdir(parents=True, exist_ok=True)
    split_file, splits = resolve_splits(config)
    facts = prepare_cache(config, split_file) if config.needs_cache else None
    results: list[MethodResult] = []
    compute: dict[str, dict] = {}
    recipes: dict[str, str] = {}
    curves: dict[str, list[tuple[float, float]]] = {}
    progress = tqdm(config.methods, desc="bench", unit="method", disable=config.quiet)
    failures: dict[str, str] = {}
    for name in progress:
        try:
            method_results, method_compute, details = run_method(config, name, splits, split_file, facts, progress)
        except InputError as error:
            failures[name] = f"{name}: {one_line(error)}"
            logger.error(failures[name])
            continue
        results += method_results
        compute.update(method_compute)
        recipes[name] = details["recipe"]
        if details["curve"]:
            curves[name] = details["curve"]
    progress.close()

    figures = method_panels(results, config.data, splits["test"][0], config.work / "panels")
    sweep = [(compute[r.name]["ddim_steps"], float(_mean_mae(r)), r.seconds_per_volume)
             for r in results if "ddim_steps" in compute[r.name]]
    if sweep:
        figures["step_curve"] = bench_figures.step_curve(sweep, config.work / "step_curve.png")
    if curves:
        figures["training_curves"] = bench_figures.training_curves(curves, config.work / "training_curves.png")
    tables = {}
    if facts is not None:
        tables["Latent cache: one-time encoding amortised over N experiments"] = cache_table(facts, config.experiments)
    metadata = {
        "note": config.note, "data": str(config.data), "split_file": str(split_file),
        "scored against": f"the CT of each test case in {Path(config.data).resolve()} (its ct.* file)",
        "split": {name: len(pids) for name, pids in splits.items()},
        "training budget per learned method (s)": config.seconds, "recipes": recipes,
        "diffusion samples per case": config.samples,
        "peak memory": "process RSS sampled every 0.05 s (what the machine needs for that stage in one process)",
        "bench seconds": round(time.perf_counter() - started, 1),
        "load average (1, 5, 15 min) at start / end": f"{_load(load_start)} / {_load(os.getloadavg())}",
    }
    if failures:
        metadata["failed methods"] = failures
    if facts is not None:
        metadata["cache"] = {"path": str(facts.path), "producer": facts.producer_key, "grid": facts.grid,
                             "vae": facts.vae, "cases": facts.cases, "built by this bench": facts.built_here}
    _, html_path = write_report(config.out, {r.name: r.rows for r in results if r.rows}, compute, figures,
                                metadata, tables=tables, structural_bias={r.name: r.structural_bias for r in results})
    return BenchOutcome(html_path, failures)


def _mean_mae(result: MethodResult) -> float:
    values = [float(row["mae"]) for row in result.rows if math.isfinite(float(row.get("mae", math.nan)))]
    return sum(values) / len(values) if values else math.nan


def _load(values: tuple[float, float, float]) -> str:
    return " ".join(f"{value:.1f}" for value in values)
