"""`latent demo`: the main job on the embedded phantom data, end to end, with a report.

Stages (each writes under ``out``): phantom data -> split -> baselines and grid floors -> the
shipped, frozen stand-in VAE (``--vae standin``; ``fit_vae`` fits one instead, the old path) ->
encode into the latent cache -> VAE floor -> train the demo methods (best checkpoint chosen by
native-grid MAE in HU) -> predict the test split from the raw MR files -> evaluate -> dose on
one test case -> ``metrics.csv`` + ``report.md``.
Stage packages are imported lazily: this module only orchestrates their public functions.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from latent.core.errors import BadConfigError
from latent.core.cases import discover_cases, make_splits, save_splits
from latent.core.recipes import RECIPES_DIR
from latent.app.methods import (GRID_FLOORS, MethodResult, baseline_result, grid_floor_result, predict_method,
                                train_method, vae_floor_result)
from latent.evaluation.scoring import METRIC_COLUMNS, format_summary, summarise, write_rows_csv
from latent.evaluation.metrics import METRICS, metric_digits, metric_names

logger = logging.getLogger(__name__)

#: Canonical grid of the demo: 3 x 3 x 5 mm, 32 x 128 x 128 covers every small phantom body.
DEMO_GRID = "3x3x5:32x128x128"
#: Methods the demo trains: recipe file and CPU training seconds. The VAE is pretrained and
#: frozen (as MAISI is for real data), so the whole budget goes to the translation models.
DEMO_METHODS = {"l2l_regress": ("l2l_regress_demo.yaml", 75.0), "l2sct": ("l2sct_demo.yaml", 120.0),
                "l2l_ddim": ("l2l_ddim_demo.yaml", 120.0), "pix2pix": ("pix2pix_demo.yaml", 120.0)}
#: The demo's VAE: the shipped stand-in (latent/weights/standin_vae).
DEMO_VAE = "standin"
#: The smallest phantom set whose stratified split gives every region a validation and a test case.
MIN_DEMO_CASES = 9


@dataclass
class DemoConfig:
    """Size and budgets of the demo."""

    cases: int = 30
    seed: int = 0
    regions: tuple[str, ...] = ("AB", "HN", "TH")
    size: str = "small"
    grid: str = DEMO_GRID
    vae: str = DEMO_VAE
    fit_vae: bool = False
    vae_seconds: float = 240.0
    methods: dict[str, tuple[str, float]] = field(default_factory=lambda: dict(DEMO_METHODS))
    ddim_steps: int = 20
    dose: bool = True
    dose_cases: int = 1
    configs_dir: Path = RECIPES_DIR


def vae_and_encode(data: Path, out: Path, config: DemoConfig) -> tuple[str, Path, float]:
    """The demo's VAE (shipped, or fitted with ``fit_vae``) and every case encoded with it.

    Returns:
        ``(vae spec, cache path, VAE training seconds in this run)`` (0 for the shipped VAE).
    """
    from latent.app.encode_run import encode_dataset
    from latent.core.vae.loading import load_vae

    vae_spec, vae_seconds = config.vae, 0.0
    if config.fit_vae:
        from latent.core.vae.pipeline import fit_vae_on_dataset

        started = time.perf_counter()
        vae_spec = str(fit_vae_on_dataset(data, out / "vae", config.grid, split_file=out / "splits.json",
                                          seconds=config.vae_seconds, max_steps=100000, quiet=True))
        vae_seconds = time.perf_counter() - started
    report = encode_dataset(data, out / "cache.zarr", load_vae(vae_spec), config.grid,
                            split_file=out / "splits.json", quiet=True)
    logger.info("encode: %d cases in %.0f s (%d failed)", len(report.encoded) + len(report.skipped),
                report.seconds, len(report.failures))
    return vae_spec, out / "cache.zarr", vae_seconds


#: Rows without dose in the demo: the oracles (their images already say how close the grid comes)
#: and water; each dose row costs about 20 s on a 2-core CPU.
NO_DOSE = ("water", "grid_floor", "grid_floor_vae")


def add_dose(results: list[MethodResult], data: Path, out: Path, pids: list[str]) -> None:
    """Photon and proton dose (plans optimised on the CT, recomputed on each sCT) for ``pids``."""
    from latent.evaluation.dose.run import run_dose

    for result in results:
        if result.pred_dir is None or result.name in NO_DOSE:
            continue
        try:
            dose_run = run_dose(result.pred_dir, data, out / "dose" / result.name, pids=pids,
                                plan_cache=out / "dose" / "plans", figures=True, quiet=True)
        except Exception as error:  # noqa: BLE001 - the dose extra may be missing: report, keep the demo going
            logger.error("dose for %s: %s", result.name, str(error).splitlines()[0])
            continue
        if dose_run.summary:
            overall = dose_run.summary[-1]
            result.dose = {column: overall.get(column, float("nan")) for column in dose_run.columns}


def comparison_rows(results: list[MethodResult]) -> list[dict]:
    """One row per method: mean metrics over the test split and compute columns."""
    rows = []
    for result in results:
        columns = [*METRIC_COLUMNS, *metric_names("tissue")]
        overall = summarise(result.rows, columns=columns)[-1] if result.rows else {}
        row = {"method": result.name, "n": overall.get("n", 0)}
        for column in columns:
            row[column] = overall.get(column, float("nan"))
            row[f"{column}_std"] = overall.get(f"{column}_std", float("nan"))
        row.update({"train_seconds": result.train_seconds, "seconds_per_volume": result.seconds_per_volume,
                    "encode_s": result.stage_seconds.get("encode", float("nan")),
                    "translate_s": result.stage_seconds.get("translate", float("nan")),
                    "decode_s": result.stage_seconds.get("decode", float("nan")), "parameters": result.parameters})
        row.update(result.dose)
        rows.append(row)
    return rows


def format_comparison(rows: list[dict]) -> str:
    """Markdown table of :func:`comparison_rows`."""
    dose_columns = [c for c in ("photon_mae", "photon_gamma", "proton_mae", "proton_gamma", "range_shift_mm")
                    if any(c in row for row in rows)]
    columns = ["method", "n", "MAE (HU)", "PSNR (dB)", "MS-SSIM", "SSIM", "bone Dice", "train s",
               "s/volume (enc/transl/dec)", "params", *dose_columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        split = "" if row["encode_s"] != row["encode_s"] else \
            f" ({row['encode_s']:.2f}/{row['translate_s']:.2f}/{row['decode_s']:.2f})"
        dose = "".join(f" {row.get(c, float('nan')):.3f} |" for c in dose_columns)
        lines.append(
            f"| {row['method']} | {row['n']} | {row['mae']:.1f} +- {row['mae_std']:.1f} | {row['psnr']:.2f} | "
            f"{row['ms_ssim']:.4f} | {row['ssim']:.4f} | {row['bone_dice']:.3f} | {row['train_seconds']:.0f} | "
            f"{row['seconds_per_volume']:.2f}{split} | {row['parameters'] / 1e6:.2f} M |{dose}"
        )
    return "\n".join(lines)


def format_tissue_table(rows: list[dict]) -> str:
    """Markdown table of the per-tissue MAE and bias (HU, mean over the test cases) of every method."""
    columns = metric_names("tissue")
    header = ["method", *(METRICS[column].label for column in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append(f"| {row['method']} | " + " | ".join(
            f"{row.get(c, float('nan')):.{metric_digits(c)}f}" for c in columns) + " |")
    return "\n".join(lines)


def prepare_data(out: Path, config: DemoConfig) -> tuple[Path, dict[str, list[str]]]:
    """Generate the phantom set and its split."""
    from latent.core.phantom.generate import generate_phantom_dataset

    data = out / "data"
    if data.exists():
        shutil.rmtree(data)
    generate_phantom_dataset(data, config.cases, list(config.regions), seed=config.seed, size=config.size)
    splits = make_splits(discover_cases(data), seed=config.seed)
    empty = [name for name in ("train", "val", "test") if not splits.get(name)]
    if empty:
        raise BadConfigError(f"--cases {config.cases}: the split has no {' and no '.join(empty)} case; use more cases")
    save_splits(splits, out / "splits.json")
    return data, splits


def write_report(out: Path, results: list[MethodResult], splits: dict[str, list[str]], seconds: float,
                 cache_info: str = "", notes: str = "") -> str:
    """``metrics.csv`` and ``report.md``; returns the comparison table."""
    rows = comparison_rows(results)
    write_rows_csv(rows, out / "metrics.csv")
    table = format_comparison(rows)
    per_region = "\n\n".join(f"### {r.name}\n\n{format_summary(summarise(r.rows))}" for r in results if r.rows)
    report = (
        "# Demo report (phantom data)\n\n"
        f"Split {', '.join(f'{k} {len(v)}' for k, v in splits.items())} phantom cases; scored on the test split "
        "with the SynthRAD2025 metrics inside the body mask, on each case's native grid. Seconds per volume are "
        "end to end from the raw MR file (encode / translate / decode). Dose columns: one test case, plans "
        "optimised on the CT and recomputed on the sCT (dose MAE as a fraction of the prescription, gamma 2%/2mm "
        "pass rate in %, mean absolute proton range shift in mm).\n\n"
        "grid_floor / grid_floor_vae: the true CT taken to the canonical grid and back (full range / VAE window), "
        "no model: the part of every canonical-grid method's error that is the grid's. vae_floor: decode(encode(CT)) "
        "through the frozen VAE, the floor of latent-to-latent methods.\n\n"
        f"{notes}"
        "These are phantom numbers on a 2-core CPU with minutes of training: they rank pipelines, they say "
        "nothing about accuracy on real patients.\n\n"
        f"{table}\n\n## Error per tissue class of the true CT (HU; bias = mean sCT - CT)\n\n"
        f"{format_tissue_table(rows)}\n\n## Latent cache\n\n```\n{cache_info}\n```\n\n## Per region\n\n{per_region}\n\n"
        f"Total demo time: {seconds:.0f} s.\n"
    )
    (out / "report.md").write_text(report)
    return table


def write_bench_report(out: Path, results: list[MethodResult], data: Path, pid: str, notes: str) -> Path:
    """``out/report/report.{md,html}``: paired statistics, Pareto plot, per-region bars and, per
    method, the axial, coronal and sagittal slices of test case ``pid`` (MR | CT | sCT | error)."""
    from latent.app.bench.panels import method_panels
    from latent.app.bench.report import write_report

    figures = method_panels(results, data, pid, out / "report" / "panels")
    compute = {r.name: {"train_seconds": r.train_seconds, "seconds_per_volume": r.seconds_per_volume,
                        "parameters": r.parameters, **{f"{k}_s": v for k, v in r.stage_seconds.items()}}
               for r in results}
    _, html_path = write_report(out / "report", {r.name: r.rows for r in results if r.rows}, compute, figures,
                                {"note": notes.strip()}, structural_bias={r.name: r.structural_bias for r in results})
    return html_path


def starting_run(name: str, trained: dict[str, float]) -> tuple[str, str] | None:
    """``(method, config field)`` of the already trained demo run that ``name``'s family starts from."""
    from latent.translate.models.base import family_class

    cls = family_class(name)
    start = cls.starts_from if cls is not None else None
    return start if start is not None and start[0] in trained else None


def samples_steps(name: str) -> bool:
    """Whether ``name``'s family samples in steps (diffusion): the demo sets its step count."""
    from latent.translate.models.base import family_class

    cls = family_class(name)
    return cls is not None and cls.stochastic and "num_inference_steps" in cls.config_class.model_fields


def run_demo(out: str | Path, config: DemoConfig | None = None) -> list[dict]:
    """Run the demo; return the comparison rows (also written to ``out/metrics.csv``)."""
    from latent.app.cli_stages import format_cache_info, open_cache

    config = config or DemoConfig()
    if config.cases < MIN_DEMO_CASES:
        raise BadConfigError(f"--cases {config.cases}: the demo needs at least {MIN_DEMO_CASES} cases, so that the split "
                         "gives every region a validation and a test case")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data, splits = prepare_data(out, config)
    test = splits["test"]
    logger.info("phantom: %d cases (%s)", sum(map(len, splits.values())), ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    results = [baseline_result(method, data, out, splits) for method in ("water", "bulk")]
    results += [grid_floor_result(name, data, out, config.grid, test) for name in GRID_FLOORS]
    if config.fit_vae:
        logger.info("fitting the demo VAE for %.0f s", config.vae_seconds)
    vae_spec, cache_path, vae_seconds = vae_and_encode(data, out, config)
    cache_info = format_cache_info(open_cache(cache_path, None).info())
    print(cache_info)
    results.append(vae_floor_result(data, out, vae_spec, cache_path, test, vae_seconds))
    train_times = {"vae": vae_seconds}
    for name, (recipe, seconds) in config.methods.items():
        logger.info("training %s for %.0f s", name, seconds)
        overrides = [f"model.num_inference_steps={config.ddim_steps}"] if samples_steps(name) else []
        start = starting_run(name, train_times)
        if start is not None:  # e.g. l2sct's translator starts from this demo's l2l_regress run
            overrides.append(f"model.{start[1]}={out / 'runs' / start[0]}")
        run_dir, train_seconds = train_method(name, config.configs_dir / recipe, out, seconds, overrides)
        train_seconds += train_times[start[0]] if start is not None else 0.0
        train_times[name] = train_seconds
        (out / "train_seconds.json").write_text(json.dumps(train_times, indent=2) + "\n")
        results.append(predict_method(name, run_dir, data, out, test, train_seconds, vae_spec=vae_spec))
    if config.dose:
        add_dose(results, data, out, test[: config.dose_cases])
    origin = f"fitted in this run for {config.vae_seconds:.0f} s" if config.fit_vae else "shipped, pretrained, frozen"
    starts = "".join(f" `{name}` starts from the `{start[0]}` run of this demo; its seconds include that run's."
                     for name in train_times if (start := starting_run(name, train_times)) is not None)
    notes = f"VAE: `{vae_spec}` ({origin}). Training seconds per method: {json.dumps(train_times)}.{starts}\n\n"
    table = write_report(out, results, splits, time.perf_counter() - started, cache_info, notes)
    html_path = write_bench_report(out, results, data, test[0], notes)
    print(table)
    print(f"report with figures: {html_path}")
    return comparison_rows(results)
