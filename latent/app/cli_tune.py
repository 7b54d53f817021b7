"""CLI verb `latent tune` (registered in latent/app/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from latent.app.cli_common import USER_ERRORS, check_output_folder, setup_logging, user_error


def tune(
    ctx: typer.Context,
    config: str = typer.Option(..., help="Recipe to tune: a YAML file or a shipped recipe's name (e.g. regress3d_demo)."),
    space: Path = typer.Option(..., help="Search space YAML: dotted recipe field -> {type: loguniform|uniform|int|"
                               "categorical, low, high, step, choices} (docs/tune.md)."),
    trials: int = typer.Option(..., min=1, help="Trials this command runs (with --resume: the study's total)."),
    out: Path = typer.Option(..., help="Output folder: study.db, trials/NNNN/ runs, best_recipe.yaml, tune.csv, "
                             "tune.json, tune.html."),
    trial_seconds: Optional[float] = typer.Option(None, "--trial-seconds", min=1.0,
                                                  help="Training budget of each trial (train.max_seconds)."),
    storage: Optional[str] = typer.Option(None, help="Optuna storage URL shared by several processes or machines "
                                          "(default sqlite:///OUT/study.db)."),
    study: Optional[str] = typer.Option(None, help="Study name (default: the recipe's name)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Processes running trials side by side on the storage."),
    pruner: str = typer.Option("median", help="median, hyperband or none."),
    resume: bool = typer.Option(False, "--resume", help="Continue the study: an interrupted trial is marked failed, "
                                "the trials left are --trials minus those already counted."),
    seed: int = typer.Option(0, help="Seed of the TPE sampler."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Search a recipe's hyperparameters with Optuna (TPE, pruning, fANOVA importances): each trial is
    one `latent train` run scored by its native-grid validation MAE in HU. Extra arguments are dotted
    overrides as in `latent train`, e.g. `data.cache=bench_run/cache.zarr data.split_file=bench_run/work/splits.json`."""
    from latent.app.tune.run import TuneSettings, run_tune

    setup_logging(quiet)
    try:
        check_output_folder(out, "--out")
        outcome = run_tune(TuneSettings(recipe=config, space=space, out=out, trials=trials, overrides=tuple(ctx.args),
                                        trial_seconds=trial_seconds, storage=storage, study=study, workers=workers,
                                        pruner=pruner, resume=resume, seed=seed, quiet=quiet))
    except USER_ERRORS as error:
        user_error(error, ctx)
    if outcome.interrupted:
        typer.echo(f"marked interrupted (failed): trial(s) {', '.join(map(str, outcome.interrupted))}", err=True)
    states = [o.state.name.lower() for o in outcome.outcomes]
    typer.echo(f"study {outcome.study} on {outcome.storage}: ran {len(states)} trial(s) "
               f"({', '.join(f'{states.count(s)} {s}' for s in dict.fromkeys(states)) or 'none left'}); "
               f"wrote {', '.join(str(path) for path in outcome.written.values())}")
