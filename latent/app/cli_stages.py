"""CLI verbs of the latent stages: `latent encode`, `latent cache ...`, `latent vae ...`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from latent.core.errors import BadConfigError, BadFileError
from latent.app.cli_common import (
    USER_ERRORS, check_output_folder, fail, report_failures, report_interrupted, setup_logging, split_pids, user_error,
)

cache_app = typer.Typer(no_args_is_help=True, help="Inspect and check a latent cache.")
vae_app = typer.Typer(no_args_is_help=True, help="Fit, load and check the VAE.")


def parse_shape(text: Optional[str]) -> Optional[tuple[int, int, int]]:
    """``'64x128x128'`` -> (64, 128, 128); ``None``/``'none'`` -> None."""
    if text is None or text.lower() == "none":
        return None
    try:
        values = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise BadConfigError(f"shape {text!r}: expected DxHxW, e.g. 64x128x128") from None
    if len(values) != 3:
        raise BadConfigError(f"shape {text!r}: expected three numbers DxHxW")
    return values


def parse_shard(text: str) -> tuple[int, int]:
    """``'1/4'`` -> (1, 4)."""
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise BadConfigError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    return index, count


def open_cache(cache: Path, producer: Optional[str]):
    """Open a cache read-only; with one producer group it is chosen automatically."""
    from latent.cache import LatentCache, pick_producer

    key, _ = pick_producer(cache, producer, option="--producer")
    return LatentCache.open(cache, key)


def encode(
    ctx: typer.Context,
    data: Path = typer.Option(..., help="Data set root (SynthRAD layout)."),
    cache: Path = typer.Option(..., help="Zarr latent cache (created when missing)."),
    vae: str = typer.Option(..., help="maisi-ct, maisi-mr, a .pt/.safetensors file, or a VAE folder (latent vae fit)."),
    grid: str = typer.Option("auto", help=("auto, a preset (synthrad-fit-1mm, synthrad-1.5mm, ...), 'SXxSYxSZ:DxHxW', "
                                           "or 'SXxSYxSZ:fit' (each case's shape covers its body).")),
    max_shape: Optional[str] = typer.Option(None, help="Cap for --grid auto, DxHxW."),
    shard: str = typer.Option("0/1", help="Encode every n-th case starting at i (cluster array jobs)."),
    split_file: Optional[Path] = typer.Option(None, "--split-file", help="Split JSON: its train cases define latent statistics."),
    tile: Optional[str] = typer.Option(None, help="Encoder window DxHxW (sliding window, gaussian blending); default one pass."),
    bf16: bool = typer.Option(False, help="bfloat16 autocast."),
    allow_truncation: bool = typer.Option(False, "--allow-truncation", help=(
        "Keep cases whose body a fixed --grid cuts (a warning, and the share cut off in the manifest).")),
    recompute_stats: bool = typer.Option(False, "--recompute-stats", help=(
        "Recompute the cache's frozen latent statistics from this split (old values kept in the producer's history).")),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    keep_going: bool = typer.Option(False, help="Exit 0 even if some cases failed."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Encode every case (MR, and CT when present) onto the canonical grid into the latent cache."""
    from latent.app.encode_run import encode_dataset
    from latent.core.vae.loading import load_vae

    setup_logging(quiet)
    try:
        if cache.exists() and not cache.is_dir():
            raise BadFileError(f"--cache {cache}: exists and is a file, not a cache folder")
        check_output_folder(cache.parent, "--cache")
        loaded = load_vae(vae, device=device)
        report = encode_dataset(data, cache, loaded, grid, max_shape=parse_shape(max_shape), shard=parse_shard(shard),
                                split_file=split_file, tile=parse_shape(tile), bf16=bf16,
                                allow_truncation=allow_truncation, recompute_stats=recompute_stats, quiet=quiet)
    except USER_ERRORS as error:
        user_error(error, ctx)
    typer.echo(f"producer {report.producer_key}, grid {report.grid.spec()}"
               + ("" if report.coverage != report.coverage else f" (covers {report.coverage:.0%} of bodies)")
               + f": encoded {len(report.encoded)}, already cached {len(report.skipped)}, failed {len(report.failures)}"
               + f" in {report.seconds:.1f} s")
    if report.truncated:
        typer.echo(f"body cut off by the grid (kept, --allow-truncation): "
                   + ", ".join(f"{pid} {share:.1%}" for pid, share in sorted(report.truncated.items())), err=True)
    if report.interrupted is not None:
        report_interrupted(*report.interrupted, report.manifest)
    if report.failures:
        typer.echo(f"failure manifest: {report.manifest}", err=True)
        report_failures(report.failures, exit_code=0 if keep_going else 1)


@cache_app.command("info")
def cache_info(
    ctx: typer.Context,
    cache: Path = typer.Argument(..., help="Zarr latent cache."),
    producer: Optional[str] = typer.Option(None, help="Producer key (needed when the store holds several)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Producer, cases per region, sizes on disk and the latent scale factor."""
    try:
        info = open_cache(cache, producer).info()
    except USER_ERRORS as error:
        user_error(error, ctx)
    typer.echo(json.dumps(info, indent=2, default=str) if as_json else format_cache_info(info))


def format_cache_info(info: dict) -> str:
    """Human-readable summary of :meth:`cache.LatentCache.info`."""
    record = info.get("producer", {})
    grid = record.get("grid", {})
    lines = [
        f"producer     {info.get('producer_key', record.get('producer_key'))}",
        f"vae weights  {str(record.get('vae_weights_sha256', '?'))[:16]}...",
        f"grid         spacing {grid.get('spacing')} mm, shape {grid.get('shape')}",
        f"cases        {info.get('cases')} " + str(info.get("cases_per_region", {})),
    ]
    sizes = info.get("sizes", {})
    if sizes:
        ratio = sizes.get("ratio")  # None for a producer group without arrays
        lines.append(f"size         {sizes.get('stored_bytes', 0) / 2**20:.1f} MiB stored, "
                     f"{sizes.get('raw_float32_bytes', 0) / 2**20:.1f} MiB as raw float32 "
                     f"(ratio {'n/a' if ratio is None else f'{ratio:.2f}'})")
    scale = info.get("scale_factor")
    lines.append(f"scale factor {scale}")
    return "\n".join(lines)


@cache_app.command("verify")
def cache_verify(
    ctx: typer.Context,
    cache: Path = typer.Argument(..., help="Zarr latent cache."),
    producer: Optional[str] = typer.Option(None, help="Producer key."),
    sources: bool = typer.Option(False, help="Also re-hash the source files recorded for each case."),
) -> None:
    """Every complete case readable, shapes and hashes consistent."""
    try:
        store = open_cache(cache, producer)
        paths = {pid: store.case_attrs(pid).get("source_paths", {}) for pid in store.case_ids()} if sources else None
        problems = store.verify(paths)
    except USER_ERRORS as error:
        user_error(error, ctx)
    for problem in problems:
        typer.echo(f"problem: {problem}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"ok: {len(store.case_ids())} cases verified")


@vae_app.command("fit")
def vae_fit(
    ctx: typer.Context,
    data: Path = typer.Option(..., help="Data set root."),
    out: Path = typer.Option(..., help="Output VAE folder (config.json + model.safetensors)."),
    grid: str = typer.Option("auto", help="Canonical grid the VAE is trained at (use the same for encode)."),
    split_file: Optional[Path] = typer.Option(None, "--split-file", help="Train on this split's train cases."),
    config: Optional[Path] = typer.Option(None, help="YAML/JSON with VAEFitConfig fields."),
    seconds: Optional[float] = typer.Option(None, min=1.0, help="Time budget in seconds."),
    max_steps: Optional[int] = typer.Option(None, help="Step budget."),
    resume: bool = typer.Option(False, help="Continue from the last checkpoint in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the VAE run --out holds (removed first)."),
    resume_inexact: bool = typer.Option(False, "--resume-inexact", help="Resume without the random state (inexact)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Train a small VAE of the MAISI family (4 latent channels, x4) on your own MR and CT."""
    from latent.core.vae.pipeline import fit_vae_on_dataset

    setup_logging(quiet)
    try:
        path = fit_vae_on_dataset(data, out, grid, split_file=split_file, config_path=config, seconds=seconds,
                                  max_steps=max_steps, resume=resume or resume_inexact, quiet=quiet,
                                  overwrite=overwrite, resume_inexact=resume_inexact)
    except USER_ERRORS as error:
        user_error(error, ctx)
    typer.echo(f"wrote {path}")


@vae_app.command("check")
def vae_check_command(
    ctx: typer.Context,
    cache: Path = typer.Option(..., help="Latent cache made with this VAE."),
    vae: str = typer.Option(..., help="The VAE that made the cache."),
    data: Path = typer.Option(..., help="Data set root (native CT and masks)."),
    out: Path = typer.Option(..., help="Folder for the reconstructions (<pid>.mha) and scores."),
    split_file: Optional[Path] = typer.Option(None, "--split-file"),
    split: str = typer.Option("test"),
    producer: Optional[str] = typer.Option(None),
    decoder: Optional[Path] = typer.Option(None, help=(
        "An adapted decoder run (latent vae adapt) of this cache: score its floor instead of the frozen VAE's.")),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """decode(encode(CT)) on the native grid, scored: the floor of latent-to-latent methods."""
    from latent.app.vae_check import vae_check
    from latent.evaluation.scoring import format_summary, summarise, write_rows_csv
    from latent.core.vae.loading import load_vae

    setup_logging(quiet)
    try:
        store = open_cache(cache, producer)
        loaded = load_vae(vae)
        if loaded.producer_info()["weights_sha256"] != store.record["vae_weights_sha256"]:
            raise BadConfigError(f"{vae}: not the VAE that made {cache} (weights hash differs); pass the cache's VAE")
        if decoder is not None:
            from latent.decode.pipeline import load_adapted_decoder

            loaded = load_adapted_decoder(decoder, store.key)
        evaluation = vae_check(store, loaded, data, out, split_pids(split_file, split), quiet=quiet)
    except USER_ERRORS as error:
        user_error(error, ctx)
    if evaluation.rows:
        write_rows_csv(evaluation.rows, out / "scores.csv")
        columns = ["mae", "psnr", "ms_ssim", "bone_dice"]
        typer.echo(format_summary(summarise(evaluation.rows, columns=columns), columns=columns))
        tissues = [f"{kind}_{name}" for name in ("air", "soft", "bone", "above_1000") for kind in ("mae", "bias")]
        typer.echo("\nper tissue of the true CT (HU; bias = mean sCT - CT):")
        typer.echo(format_summary(summarise(evaluation.rows, columns=tissues), columns=tissues))
    report_failures(evaluation.run.failures)


@vae_app.command("adapt")
def vae_adapt(
    ctx: typer.Context,
    cache: Path = typer.Option(..., help="Latent cache: the training split's CT latents and full-range CTs."),
    split_file: Path = typer.Option(..., "--split-file", help="Split JSON (train on 'train', validate on 'val')."),
    out: Path = typer.Option(..., help="Run folder of the adapted decoder (best/, final/, producer.json)."),
    config: str = typer.Option("decoder_adapt_demo", help="Recipe: a YAML file or a shipped recipe's name."),
    seconds: Optional[float] = typer.Option(None, min=1.0, help="Time budget in seconds (train.max_seconds)."),
    resume: bool = typer.Option(False, help="Continue from the last checkpoint in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run --out holds (removed before training)."),
    resume_inexact: bool = typer.Option(False, "--resume-inexact", help="Resume even without the random state (not exact)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Dotted recipe overrides, e.g. model.lr=1e-4."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Fine-tune the VAE's decode path (post_quant_conv + decoder) on cached CT latents -> full-range CT.

    The encoder, the VAE's files and the cache are only read.

    Latent routes decode through the result with latent predict --decoder; l2sct starts from it with init_decoder_from.
    """
    from latent.app.validation import train_run
    from latent.translate.train import load_config

    setup_logging(quiet)
    changes = [f"data.cache={cache}", f"data.split_file={split_file}", f"run_dir={out}",
               *([f"train.max_seconds={seconds}"] if seconds is not None else []),
               *(["train.resume=true"] if resume or resume_inexact else []), *(overrides or [])]
    try:
        recipe = load_config(config, changes)
        if recipe.model.family != "decoder_adapt":
            fail(f"--config {config}: a {recipe.model.family} recipe; latent vae adapt trains model.family: decoder_adapt")
        run_dir = train_run(recipe, quiet=quiet, overwrite=overwrite, resume_inexact=resume_inexact)
    except USER_ERRORS as error:
        user_error(error, ctx)
    typer.echo(f"wrote {run_dir}")
