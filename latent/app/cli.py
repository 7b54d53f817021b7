"""The ``latent`` command line: thin wrappers that parse arguments and call library functions."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer


app = typer.Typer(add_completion=False, no_args_is_help=True, help="MR -> synthetic CT in a VAE latent space.")


@app.callback()
def options(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an input error too."),
) -> None:
    """MR -> synthetic CT in a VAE latent space. Input errors end with one line and exit status 2."""
    ctx.obj = {"debug": debug}

from latent.app.cli_common import (
    USER_ERRORS, check_output_folder, fail, report_failures, report_run, setup_logging, split_pids, user_error,
)
from latent.core.atomic import remove_stale_temporaries
from latent.app.bench.config import DEFAULT_METHODS as DEFAULT_BENCH_METHODS
from latent.app.cli_data import split
from latent.app.cli_evaluate import evaluate
from latent.app.cli_qa import qa
from latent.app.cli_register import register
from latent.app.cli_stages import cache_app, encode, vae_app
from latent.app.cli_tune import tune

app.command()(split)
app.command()(encode)
app.command()(evaluate)
app.command()(qa)
app.command()(register)
app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(tune)
app.add_typer(cache_app, name="cache")
app.add_typer(vae_app, name="vae")


@app.command()
def phantom(
    ctx: typer.Context,
    out: Path = typer.Option(..., help="Output data set root (Task1/<region>/<pid>/ is written inside)."),
    cases: int = typer.Option(12, min=1, help="Number of cases, spread over regions and centres."),
    regions: str = typer.Option("AB,HN,TH", help="Comma-separated regions."),
    seed: int = typer.Option(0, help="Random seed (same seed, same data)."),
    size: str = typer.Option("small", help="small (fast, demo/tests) or synthrad (1 x 1 x 3 mm, SynthRAD extents)."),
    misregistration: bool = typer.Option(False, help="Small rigid MR/CT misregistration."),
    metal: bool = typer.Option(False, help="Add one metal implant (screw, pacemaker or dental crown) to every case."),
    defects: str = typer.Option("", help=(
        "Comma-separated defects for QA tests: banding, fov_cut, extra_object, signal_void, ct_offset, metal, "
        "misregistration, deformation (recorded in phantom.json, docs/phantom.md).")),
    defect_fraction: float = typer.Option(1.0, "--defect-fraction", help="Share of the cases that get --defects."),
    defects_per_case: str = typer.Option("all", "--defects-per-case", help="all: every defect in each chosen case; "
                                         "one: one defect per chosen case, round robin."),
    write_truth: bool = typer.Option(False, "--write-truth", help="Write ct_true.mha (the CT before the motion) "
                                     "and motion_true.mha (the true motion field) beside ct.mha in moved cases."),
) -> None:
    """Generate a paired MR/CT phantom data set in the SynthRAD2025 layout."""
    from latent.core.phantom.generate import generate_phantom_dataset

    region_list = [r.strip() for r in regions.split(",") if r.strip()]
    defect_list = [d.strip() for d in defects.split(",") if d.strip()]
    try:
        folders = generate_phantom_dataset(out, cases, region_list, seed=seed, size=size,
                                           misregistration=misregistration, metal=metal, defects=defect_list,
                                           defect_fraction=defect_fraction, defects_per_case=defects_per_case,
                                           write_truth=write_truth)
    except USER_ERRORS as error:
        user_error(error, ctx)
    typer.echo(f"wrote {len(folders)} cases under {out}")


#: Option groups of `latent predict --help`, so that it reads as a menu.
PANEL_INPUT = "Input (one of --data, --mr, --from-cache, --gc-io)"
PANEL_BASELINE = "Baseline (no model)"
PANEL_MODEL = "Trained model"
PANEL_OUTPUT = "Output"


@app.command()
def predict(
    ctx: typer.Context,
    # -- input
    data: Optional[Path] = typer.Option(None, help="Data set root (SynthRAD layout).", rich_help_panel=PANEL_INPUT),
    mr: Optional[Path] = typer.Option(None, help="One MR file instead of --data.", rich_help_panel=PANEL_INPUT),
    mask: Optional[Path] = typer.Option(None, help="Body mask of --mr (derived from the MR when absent).",
                                        rich_help_panel=PANEL_INPUT),
    from_cache: Optional[Path] = typer.Option(None, "--from-cache", rich_help_panel=PANEL_INPUT,
                                              help="Read MR latents from this cache instead of encoding."),
    gc_io: Optional[tuple[Path, Path]] = typer.Option(None, "--gc-io", help="Grand Challenge INPUT and OUTPUT folders.",
                                                      rich_help_panel=PANEL_INPUT),
    split_file: Optional[Path] = typer.Option(None, "--split-file", help="Split JSON.", rich_help_panel=PANEL_INPUT),
    split: str = typer.Option("test", help="Which split to predict when --split-file is given.",
                              rich_help_panel=PANEL_INPUT),
    # -- baseline
    method: Optional[str] = typer.Option(None, rich_help_panel=PANEL_BASELINE, help=(
        "water, bulk (with --data), the oracles grid_floor / grid_floor_vae (CT -> canonical -> native; --data and "
        "--grid), or vae_floor (decode of each cached CT latent; --from-cache, VAE: --vae or the cache's).")),
    grid: Optional[str] = typer.Option(None, rich_help_panel=PANEL_BASELINE, help=(
        "Canonical grid of --method grid_floor*: a preset, SXxSYxSZ:DxHxW or SXxSYxSZ:fit.")),
    # -- trained model
    model: Optional[Path] = typer.Option(None, help="Training run folder (translate/train.py output), or hf://owner/name[@rev] (latent push).",
                                         rich_help_panel=PANEL_MODEL),
    ensemble: Optional[str] = typer.Option(None, rich_help_panel=PANEL_MODEL, help=(
        "RUN1,RUN2,...: average these runs in HU on the native grid (each with its own VAE); std map written. "
        "Runs trained on some regions (data.regions) predict only their regions' cases: an ensemble of "
        "region runs routes each case to its region's run.")),
    tta: str = typer.Option("none", rich_help_panel=PANEL_MODEL, help=(
        "none, or flip: also predict the input mirrored along the family's flip axes (left-right) and average.")),
    vae: Optional[str] = typer.Option(None, help="VAE spec (default: the one recorded in the run).",
                                      rich_help_panel=PANEL_MODEL),
    which: str = typer.Option("best", help="best or final model of the run.", rich_help_panel=PANEL_MODEL),
    decoder: Optional[Path] = typer.Option(None, rich_help_panel=PANEL_MODEL, help=(
        "An adapted decoder run (latent vae adapt) that decodes a latent-to-latent --model's CT latents over the "
        "full HU range instead of the VAE's [-1000, 1000] window.")),
    samples: int = typer.Option(1, min=1, help="Samples averaged for diffusion models; a std map is written for K > 1.",
                                rich_help_panel=PANEL_MODEL),
    seed: int = typer.Option(0, rich_help_panel=PANEL_MODEL),
    device: str = typer.Option("cpu", rich_help_panel=PANEL_MODEL),
    # -- output
    out: Optional[Path] = typer.Option(None, help=("Prediction folder (<pid>.mha per case; <pid>_std.mha for K > 1 "
                                                   "samples, --tta flip or --ensemble); not used with --gc-io."),
                                       rich_help_panel=PANEL_OUTPUT),
    fmt: str = typer.Option("mha", "--format", help="mha, nii.gz, nii, nrrd or dicom.", rich_help_panel=PANEL_OUTPUT),
    allow_truncation: bool = typer.Option(False, "--allow-truncation", rich_help_panel=PANEL_OUTPUT, help=(
        "Predict cases whose body a fixed canonical grid cuts (a warning; the share in timings.json).")),
    keep_going: bool = typer.Option(False, "--keep-going", help="Exit 0 even if some cases failed.",
                                    rich_help_panel=PANEL_OUTPUT),
    quiet: bool = typer.Option(False, "--quiet", "-q", rich_help_panel=PANEL_OUTPUT),
) -> None:
    """Write one sCT per case on the MR's exact native grid (baseline or trained model)."""
    setup_logging(quiet)
    try:
        if gc_io is None and out is None:
            fail("--out FOLDER is needed (only --gc-io INPUT OUTPUT writes into its OUTPUT)")
        if gc_io is not None and out is not None:
            typer.echo(f"warning: --out {out} is not used: --gc-io writes into its OUTPUT folder", err=True)
        destination = out if gc_io is None else gc_io[1]
        check_output_folder(destination, "--out" if gc_io is None else "--gc-io OUTPUT")
        remove_stale_temporaries(destination)
        pids = split_pids(split_file, split)
        if method is not None:
            from latent.app.predict_run import predict_with_method

            fit_pids = split_pids(split_file, "train") if split_file and method == "bulk" else None
            run = predict_with_method(method, out, data=data, cache=from_cache, grid=grid, vae_spec=vae, pids=pids,
                                      fit_pids=fit_pids, fmt=fmt, allow_truncation=allow_truncation, quiet=quiet)
        elif model is not None or ensemble is not None:
            from latent.decode.combine import check_tta
            from latent.app import predict_run as runner

            if model is not None and ensemble is not None:
                fail("--ensemble: give either --model RUN_DIR or --ensemble RUN1,RUN2,..., not both")
            check_tta(tta)
            if ensemble is not None:
                if decoder is not None:
                    fail("--decoder: goes with --model (one latent-to-latent run), not with --ensemble")
                trained, loaded_vae = runner.load_ensemble(ensemble, vae, which, device), None
            else:
                trained, loaded_vae = runner.load_run_and_vae(model, vae, which, device, decoder)
            options = runner.PredictOptions(samples=samples, seed=seed, fmt=fmt, which=which, tta=tta,
                                            allow_truncation=allow_truncation)
            if gc_io is not None:
                run = runner.predict_grand_challenge(trained, loaded_vae, gc_io[0], gc_io[1], options, quiet)
            elif mr is not None:
                path = runner.predict_files(trained, loaded_vae, mr, mask, out, options)
                typer.echo(f"wrote {path}")
                return
            elif from_cache is not None:
                run = runner.predict_from_cache(trained, loaded_vae, from_cache, out, pids, options, quiet)
            elif data is not None:
                run = runner.predict_dataset(trained, loaded_vae, data, out, pids, options, quiet)
            else:
                fail("--model needs one of --data ROOT, --mr FILE, --from-cache CACHE or --gc-io IN OUT")
        else:
            fail("give --method water|bulk|grid_floor|grid_floor_vae|vae_floor, --model RUN_DIR or --ensemble RUN1,RUN2,...")
    except USER_ERRORS as error:
        user_error(error, ctx)
    typer.echo(f"wrote {len(run.results)} predictions to {destination}")
    try:
        # No manifest in a Grand Challenge output folder: it must hold only the expected outputs.
        report_run(run, keep_going, out / "predict_manifest.json" if gc_io is None else None)
    except USER_ERRORS as error:
        user_error(error, ctx)


@app.command()
def dose(
    ctx: typer.Context,
    pred: Path = typer.Option(..., help="Prediction folder (<pid>.mha on the native grids)."),
    data: Path = typer.Option(..., help="Data set root with ct.mha and mask.mha per case."),
    out: Path = typer.Option(..., help="Output folder: per-case JSON/CSV, summary, DVH and dose-difference PNGs."),
    modes: str = typer.Option("photon,proton,range", help="Any of photon, proton (plans) and range (plan-free proxy)."),
    dose_grid: Optional[float] = typer.Option(None, "--dose-grid", help="Dose grid spacing in mm (protocol default 3)."),
    protocol: Optional[Path] = typer.Option(None, help="Protocol YAML/JSON (beam templates, prescription, gamma)."),
    plan_cache: Optional[Path] = typer.Option(None, help="Plan cache folder (plans optimised on each CT are reused)."),
    split_file: Optional[Path] = typer.Option(None, "--split-file"),
    split: str = typer.Option("test"),
    figures: bool = typer.Option(True, help="Write DVH and dose-difference figures."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Dose evaluation: plans optimised on the CT, recomputed on the sCT, challenge dose metrics."""
    from latent.evaluation.dose import DoseExtraMissing, run_dose

    setup_logging(quiet)
    try:
        dose_run = run_dose(pred, data, out, modes=modes, dose_grid_mm=dose_grid, protocol=protocol,
                            plan_cache=plan_cache, pids=split_pids(split_file, split), figures=figures, quiet=quiet)
    except DoseExtraMissing as error:
        user_error(error, ctx)
    except USER_ERRORS as error:
        user_error(error, ctx)
    if dose_run.summary:
        typer.echo(dose_run.table())
    report_failures(dose_run.failures)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    config: str = typer.Option(..., help="Recipe: a YAML file or a shipped recipe's name (e.g. l2sct_demo, vae_standin)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's latest checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help=(
        "Replace the run that run_dir holds (its run files are removed just before training starts).")),
    resume_inexact: bool = typer.Option(False, "--resume-inexact", help=(
        "Resume even if the checkpoint's random state cannot be restored (the run is then not exact).")),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Train any model with the project's one training loop and one recipe schema: a translation
    model (also launched as `accelerate launch translate/train.py ...`) or the VAE (`model.family:
    vae`, as `latent vae fit`). Extra arguments are dotted overrides, e.g. `train.max_steps=20
    model.lr=1e-4` or `data.root=/data run_dir=runs/vae`."""
    from latent.app.validation import train_run
    from latent.translate.train import load_config

    try:
        setup_logging(quiet)
        recipe = load_config(config, [*ctx.args, *(["train.resume=true"] if resume or resume_inexact else [])])
        if recipe.is_vae:  # the frozen VAE's family: its own task in the same loop, on the data set's volumes
            from latent.core.vae.fit_config import vae_fit_config
            from latent.core.vae.pipeline import fit_vae_on_dataset

            run_dir = fit_vae_on_dataset(recipe.data.root, recipe.run_dir, recipe.data.grid,
                                         split_file=recipe.data.split_file,
                                         config=vae_fit_config(recipe.model, recipe.data, recipe.train),
                                         resume=bool(recipe.train.resume), quiet=quiet, overwrite=overwrite,
                                         resume_inexact=resume_inexact)
        else:
            run_dir = train_run(recipe, quiet=quiet, overwrite=overwrite, resume_inexact=resume_inexact)
    except USER_ERRORS as error:
        user_error(error, ctx)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(run_dir)


@app.command()
def push(
    ctx: typer.Context,
    folder: Path = typer.Argument(..., help="A training run (runs/l2sct) or a model folder (a VAE from `latent vae fit`)."),
    repo: str = typer.Option(..., help="Hub repository owner/name (created when missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repository private."),
    token: Optional[str] = typer.Option(None, help="Hub token (default: the logged-in one, HF_TOKEN)."),
) -> None:
    """Push a run's models and records (or a model folder) to the Hugging Face hub with a model card;
    use it anywhere a folder is accepted as hf://owner/name[@revision]."""
    from latent.app.push import push as push_to_hub

    try:
        typer.echo(push_to_hub(folder, repo, private=private, token=token))
    except USER_ERRORS as error:
        user_error(error, ctx)


@app.command()
def demo(
    ctx: typer.Context,
    out: Path = typer.Option(Path("demo_run"), help="Output folder."),
    cases: int = typer.Option(30, min=9, help="Phantom cases (at least 9: a validation and a test case per region)."),
    seed: int = typer.Option(0),
    vae: str = typer.Option("standin", help="Frozen VAE: the shipped stand-in, or any --vae spec of `latent encode`."),
    fit_vae: bool = typer.Option(False, "--fit-vae", help="Fit a small VAE on the demo's training split instead."),
    vae_seconds: float = typer.Option(240.0, min=1.0, help="Training budget of --fit-vae."),
    train_seconds: Optional[float] = typer.Option(None, min=1.0, help="Training budget of each method (default: per-method)."),
    dose: bool = typer.Option(True, help="Dose evaluation of one test case (needs the dose extra)."),
) -> None:
    """The main job on phantom data: baselines, frozen VAE + latent cache, trained methods, evaluation, dose.

    Trains l2l_regress, l2sct, l2l_ddim, pix2pix; bench-only (latent bench --methods ...): l2l_controlnet,
    regress3d, resvit, unetpp25d (and its region fine-tunes, benchmarks/bench_region_finetune.py), cyclegan, cut,
    contourdiff.
    """
    from latent.app.demo import DEMO_METHODS, DemoConfig, run_demo

    setup_logging(False)
    methods = {name: (recipe, train_seconds or seconds) for name, (recipe, seconds) in DEMO_METHODS.items()}
    try:
        run_demo(out, DemoConfig(cases=cases, seed=seed, vae=vae, fit_vae=fit_vae, vae_seconds=vae_seconds,
                                 methods=methods, dose=dose))
    except USER_ERRORS as error:
        user_error(error, ctx)
    typer.echo(f"wrote {out / 'metrics.csv'} and {out / 'report.md'}")


@app.command()
def bench(
    ctx: typer.Context,
    data: Path = typer.Option(..., help="Data set root (SynthRAD layout)."),
    cache: Path = typer.Option(..., help="Latent cache (built with --vae and --grid when missing)."),
    out: Path = typer.Option(..., help="Report folder: report.md, report.html, results.json/csv, figures/."),
    methods: str = typer.Option(",".join(DEFAULT_BENCH_METHODS), help=(
        "Comma-separated: water, bulk, grid_floor, grid_floor_vae, vae_floor, l2sct, l2l_regress, l2l_ddim, "
        "l2l_controlnet, regress3d, pix2pix, resvit, cyclegan, cut, contourdiff, unetpp25d; a learned family with +tta (flip TTA) and/or "
        "+ensK (K fold runs averaged), e.g. regress3d+tta, l2sct+ens3.")),
    split_file: Optional[Path] = typer.Option(None, "--split-file", help="Split JSON (default: a stratified split, seed 0)."),
    runs: Optional[Path] = typer.Option(None, help="Training runs: <runs>/<method> is reused when complete, else trained there."),
    work: Optional[Path] = typer.Option(None, help="Predictions, scores and panels (default <out>/work)."),
    seconds: float = typer.Option(120.0, min=1.0, help="Training budget of each learned method trained here."),
    size: str = typer.Option("demo", help="Shipped recipes <family>_<size>.yaml: demo or full."),
    recipe: list[str] = typer.Option([], help="METHOD=RECIPE: another recipe for one method (repeatable)."),
    override: list[str] = typer.Option([], help="Dotted key=value for every recipe trained here (repeatable)."),
    ddim_steps: str = typer.Option("5,10,25", "--ddim-steps", help="DDIM step sweep of l2l_ddim ('' for none)."),
    samples: int = typer.Option(2, min=1, help="Samples per case of the diffusion families (> 1: std map)."),
    vae: Optional[str] = typer.Option(None, help="VAE spec (building the cache, VAE floor; default the cache's)."),
    grid: str = typer.Option("auto", help="Canonical grid of a cache built here."),
    note: str = typer.Option("", help="Text at the head of the report (e.g. the machine's load)."),
    keep_going: bool = typer.Option(False, "--keep-going", help="Exit 0 even if some method failed."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Every method on one split: accuracy with CIs and paired tests, compute, figures, HTML report."""
    from latent.app.bench.config import BenchConfig, parse_methods, parse_recipes, parse_steps
    from latent.app.bench.run import run_bench

    setup_logging(quiet)
    try:
        config = BenchConfig(data, cache, out, methods=parse_methods(methods), split_file=split_file, runs=runs,
                             work=work, seconds=seconds, size=size, recipes=parse_recipes(recipe),
                             overrides=tuple(override), ddim_steps=parse_steps(ddim_steps), samples=samples, vae=vae,
                             grid=grid, note=note, quiet=quiet)
        outcome = run_bench(config)
    except USER_ERRORS as error:
        user_error(error, ctx)
    typer.echo(f"wrote {out / 'report.md'} and {outcome.html_path}")
    report_failures(outcome.failures, exit_code=0 if keep_going else 1)


def main() -> None:
    """Console entry point. Ctrl-C ends every command with exit status 130; where a loop over cases
    did not already say how far it got, one line says the command was interrupted."""
    try:
        app(prog_name="latent")
    except SystemExit as stop:
        cause = getattr(stop.__context__, "__cause__", None)
        if stop.code == 130 and isinstance(cause, KeyboardInterrupt):
            typer.echo("interrupted (Ctrl-C): what was already written is kept whole (cache entries, checkpoints "
                       "and predictions are written completely or not at all)", err=True)
        raise


if __name__ == "__main__":
    main()
