"""Every method side by side on the phantom test split: accuracy and compute.

Reuses the phantom data, split and latent cache of a demo folder (``make demo`` -> ``demo_run``,
read only) with the frozen VAE that made the cache (``--vae``, default the shipped stand-in),
scores the baselines and the grid and VAE floors, trains every learned method with the same CPU
budget into its own work folder, adds a DDIM step sweep and the Pix2Pix NGF ablation
(lambda_NGF 20 vs 0), and writes ``benchmarks/results/bench_methods.{csv,md,json}``.

    python benchmarks/bench_methods.py --demo demo_run [--vae standin] [--seconds 150] [--steps 5,10,25,50]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from latent.cases import load_splits  # noqa: E402
from latent.app.demo import (  # noqa: E402
    DEMO_GRID, DemoConfig, MethodResult, _evaluate, baseline_results, comparison_rows, format_comparison,
    format_tissue_table, grid_floor_results, predict_method, train_method, vae_floor_result,
)
from latent.evaluate import write_rows_csv  # noqa: E402

#: Learned methods: name -> (recipe, extra overrides); the ControlNet prior is trained first.
METHODS = {
    "l2sct": ("l2sct_demo.yaml", []),
    "l2l_ddim": ("l2l_ddim_demo.yaml", ["model.num_inference_steps=25"]),
    "l2l_regress": ("l2l_regress_demo.yaml", []),
    "regress3d": ("regress3d_demo.yaml", []),
    "l2l_controlnet_prior": ("l2l_controlnet_prior_demo.yaml", []),
    "l2l_controlnet": ("l2l_controlnet_demo.yaml", []),
    "cyclegan": ("cyclegan_demo.yaml", []),
    "cut": ("cut_demo.yaml", []),
    "pix2pix": ("pix2pix_demo.yaml", []),
    "pix2pix_ngf0": ("pix2pix_demo.yaml", ["model.lambda_ngf=0.0"]),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=ROOT / "demo_run", help="finished demo folder to build on")
    parser.add_argument("--vae", default="standin", help="the VAE that made the demo's cache (a --vae spec)")
    parser.add_argument("--seconds", type=float, default=150.0, help="CPU training budget of each extra method")
    parser.add_argument("--steps", default="5,10,25,50", help="DDIM step sweep")
    parser.add_argument("--work", type=Path, default=ROOT / "bench_run", help="runs and predictions go here")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("accelerate", "latent.phantom"):
        logging.getLogger(name).setLevel(logging.WARNING)
    demo = args.demo.resolve()
    data, vae_dir, cache = demo / "data", args.vae, demo / "cache.zarr"
    if not cache.exists():
        print(f"error: {demo}: run `make demo` first (needs data/ and cache.zarr)", file=sys.stderr)
        return 2
    splits = load_splits(demo / "splits.json")
    test = splits["test"]
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "cache.zarr").unlink(missing_ok=True)
    (work / "cache.zarr").symlink_to(cache)
    (work / "splits.json").write_text((demo / "splits.json").read_text())
    results: list[MethodResult] = baseline_results(data, work, splits)
    results += grid_floor_results(data, work, DemoConfig(grid=DEMO_GRID), test)
    vae_seconds = json.loads((demo / "train_seconds.json").read_text()).get("vae", 0.0) \
        if (demo / "train_seconds.json").exists() else 0.0
    results.append(vae_floor_result(data, work, vae_dir, cache, test, vae_seconds))
    train_times: dict[str, float] = {}
    for name, (recipe, overrides) in METHODS.items():
        if name == "l2l_controlnet":
            overrides = [*overrides, f"model.prior_path={work / 'runs' / 'l2l_controlnet_prior' / 'final'}"]
        logging.info("training %s for %.0f s", name, args.seconds)
        run_dir, seconds = train_method(name, ROOT / "configs" / recipe, work, args.seconds, overrides)
        if name == "l2l_controlnet":
            seconds += train_times.get("l2l_controlnet_prior", 0.0)
        train_times[name] = seconds
        if name != "l2l_controlnet_prior":
            results.append(predict_method(name, run_dir, data, work, test, seconds, vae_spec=str(vae_dir)))
    sweep = [sweep_ddim(work / "runs" / "l2l_ddim", int(steps), data, work, test, vae_dir, train_times["l2l_ddim"])
             for steps in args.steps.split(",")]
    rows = comparison_rows(results)
    sweep_rows = comparison_rows(sweep)
    args.out.mkdir(parents=True, exist_ok=True)
    write_rows_csv(rows + sweep_rows, args.out / "bench_methods.csv")
    (args.out / "bench_methods.json").write_text(json.dumps({"methods": rows, "ddim_sweep": sweep_rows}, indent=2, default=float) + "\n")
    report = (
        "# Methods on the phantom test split (2-core CPU, demo budgets)\n\n"
        f"{len(test)} test cases, trained on {len(splits['train'])} phantom cases; every learned method has the same "
        f"CPU training budget of {args.seconds:.0f} s (the ControlNet {args.seconds:.0f} s more for its prior; the "
        "VAE's own fit is the vae_floor row's train s); seconds per volume are end to end from the raw MR file.\n\n"
        f"{format_comparison(rows)}\n\n## Error per tissue class of the true CT (HU)\n\n{format_tissue_table(rows)}\n\n"
        "## DDIM step sweep (l2l_ddim, same run)\n\n{format_comparison(sweep_rows)}\n\n"
        "## Pix2Pix NGF ablation\n\n`pix2pix` (lambda_NGF 20) vs `pix2pix_ngf0` (lambda_NGF 0) above.\n"
    )
    (args.out / "bench_methods.md").write_text(report)
    print(report)
    return 0


def sweep_ddim(run_dir: Path, steps: int, data: Path, demo: Path, test: list[str], vae_dir: Path,
               train_seconds: float) -> MethodResult:
    """Predict with a trained l2l_ddim run at ``steps`` DDIM steps."""
    from latent.app.predict_run import PredictOptions, load_run_and_vae, predict_dataset

    run, vae = load_run_and_vae(run_dir, str(vae_dir))
    run.model.config.num_inference_steps = steps  # read by the sampler at every translate call
    pred_dir = demo / "predictions" / f"l2l_ddim_{steps}steps"
    predict_dataset(run, vae, data, pred_dir, pids=test, options=PredictOptions(), quiet=True)
    timings = json.loads((pred_dir / "timings.json").read_text())["mean_seconds"]
    parameters = sum(p.numel() for p in run.model.parameters())
    return _evaluate(f"l2l_ddim_{steps}steps", data, pred_dir, demo, test, sum(timings.values()),
                     train_seconds=train_seconds, parameters=parameters, stage_seconds=timings)


if __name__ == "__main__":
    raise SystemExit(main())
