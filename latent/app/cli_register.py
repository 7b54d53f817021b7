"""CLI verb `latent register` (registered in latent/app/cli.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from latent.app.cli_common import USER_ERRORS, check_output_folder, report_run, setup_logging, user_error


def register(
    ctx: typer.Context,
    data: Path = typer.Option(..., help="Data set root (SynthRAD layout); never modified."),
    out: Path = typer.Option(..., help="New SynthRAD-layout root: registered ct.mha, ct_orig, MR and mask copies, "
                             "register.csv, register.json, register.html."),
    method: str = typer.Option("rigid", help="rigid (Euler), bspline (rigid, then B-spline), or feature (rigid, then a "
                               "smooth field fitted on frozen VAE features with torch)."),
    parameter_dir: Path = typer.Option(None, "--parameter-dir", help="Folder of edited elastix maps (rigid.txt, "
                                       "bspline.txt; default latent/configs/elastix)."),
    feature_vae: str = typer.Option("standin", "--feature-vae", help="--method feature: the frozen VAE whose first "
                                    "encoder level gives the features (a --vae spec of `latent encode`: name, folder, file)."),
    feature_network: Path = typer.Option(None, "--feature-network", help="--method feature: instead of the VAE, a "
                                         "weights folder of a frozen MONAI segmentation network (config.json + "
                                         "model.safetensors; docs/registration.md)."),
    feature_layers: str = typer.Option("", "--feature-layers", help="--feature-network: comma-separated module names "
                                       "whose outputs are the features (default: the folder's config.json 'layers')."),
    workers: int = typer.Option(1, "--workers", min=1, help="Processes registering cases side by side."),
    keep_going: bool = typer.Option(False, "--keep-going", help="Exit 0 even if some cases failed."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Register each case's CT onto its MR (elastix with Mattes mutual information, or a frozen-feature metric, in
    the dilated mask) into a new data root, with NMI before / after and the displacement per case
    (docs/registration.md)."""
    from latent.app.register_run import run_register
    from latent.core.errors import BadFileError
    from latent.core.registration.methods import method_files, method_identity
    from latent.core.registration.settings import FeatureSettings, RegisterSettings

    setup_logging(quiet)
    try:
        settings = RegisterSettings(method=method, parameter_dir=parameter_dir, threads=max(1, 2 // workers),
                                    feature=FeatureSettings(
                                        vae=feature_vae, network=str(feature_network) if feature_network else None,
                                        network_layers=tuple(name for name in feature_layers.split(",") if name)))
        method_files(settings)
        method_identity(settings)  # --method feature: the VAE (or network) loads and gives features
        check_output_folder(out, "--out")
        if out.resolve() == data.resolve() or data.resolve() in out.resolve().parents:
            raise BadFileError(f"--out {out}: inside --data {data}; latent register never writes under the data")
        outcome = run_register(data, out, settings, workers=workers, quiet=quiet)
    except USER_ERRORS as error:
        user_error(error, ctx)
    typer.echo(f"wrote {out / 'register.csv'}, {out / 'register.json'} and {out / 'register.html'} in "
               f"{outcome.seconds:.1f} s")
    try:
        report_run(outcome.run, keep_going)
    except USER_ERRORS as error:
        user_error(error, ctx)
