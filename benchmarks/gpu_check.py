"""GPU check at real sizes: MAISI encode/decode, MR file -> sCT file end to end, one training step per full recipe.

Run on a CUDA machine (random weights: the released ones are not needed for speed)::

    python benchmarks/gpu_check.py --out gpu_check.json [--row-limit 120] [--rows e2e,train]

Rows (``--list`` prints them):
- ``vae encode|decode ZxYxX fp32|bf16``: ``latent.core.vae.inference.encode_mu`` / ``decode`` of the MAISI
  architecture at 96 x 320 x 320 (the synthrad-1.5mm grid) and 128 x 512 x 512 (a whole SynthRAD
  slab), with the project's automatic tiling below 2^31 elements per activation;
- ``e2e l2sct`` and ``e2e l2l_ddim`` (25 DDIM steps): one SynthRAD-size AB phantom (the longest
  region) from its MR file to the written sCT file on its native grid through
  ``latent.app.predict_run.predict_files`` (read, canonical grid, encode, translate, decode,
  native grid, write), with the full recipe's network;
- ``train <recipe> [field=value]``: one optimiser step of every ``configs/*_full.yaml`` (bf16
  autocast, AdamW) on a synthetic batch of the recipe's shapes; ``regress3d_full.yaml`` also with
  ``channels_last=false``, to compare the two memory layouts (docs/models.md).
Each figure is the median of a few timed runs after a warm-up (``torch.cuda.synchronize``); peak
memory is ``torch.cuda.max_memory_allocated``. Rows run in a child process; a row that passes
``--row-limit`` seconds is killed, recorded as timed out, and the next rows go on in a new child.
The JSON is rewritten after every row, so a command limit hit still leaves every finished row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VAE_SHAPES = ((96, 320, 320), (128, 512, 512))
E2E_FAMILIES = {"l2sct": "l2sct_full.yaml", "l2l_ddim": "l2l_ddim_full.yaml"}
E2E_DDIM_STEPS = 25
TRAIN_RECIPES = ("l2l_ddim_full.yaml", "l2l_controlnet_full.yaml", "l2l_regress_full.yaml", "l2sct_full.yaml",
                 "regress3d_full.yaml", "pix2pix_full.yaml", "resvit_full.yaml", "cyclegan_full.yaml", "cut_full.yaml")
#: Extra train rows: a recipe with one model field changed (YAML value).
TRAIN_VARIANTS = (("regress3d_full.yaml", "channels_last=false"),)
#: The canonical grid of the full recipes (each case its own shape; bench_grid_spacing chose it).
FULL_GRID = "synthrad-fit-1mm"
POLL_SECONDS = 0.2


def all_rows() -> list[str]:
    """Every row name, in run order."""
    rows = [f"vae {what} {'x'.join(map(str, shape))} {precision}" for shape in VAE_SHAPES
            for precision in ("fp32", "bf16") for what in ("encode", "decode")]
    rows += [f"e2e {family}" for family in E2E_FAMILIES]
    rows += [f"train {recipe}" for recipe in TRAIN_RECIPES]
    return rows + [f"train {recipe} {change}" for recipe, change in TRAIN_VARIANTS]


# ----------------------------------------------------------------------------- the rows (child process)
def timed(function, repeats: int = 3, warmup: int = 1) -> dict:
    """``{"seconds": median, "runs": [...], "peak_gib": ...}`` of ``function()`` on the CUDA device."""
    import torch

    for _ in range(warmup):
        function()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        torch.cuda.synchronize()
        runs.append(round(time.perf_counter() - started, 4))
    return {"seconds": statistics.median(runs), "runs": runs,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def maisi_random():
    """The MAISI VAE architecture with random weights on CUDA."""
    from latent.core.vae.loading import MAISI_CONFIG, LoadedVAE, build_vae

    network = build_vae("AutoencoderKlMaisi", MAISI_CONFIG, device="cuda")
    return LoadedVAE(network, "maisi-random", "AutoencoderKlMaisi", dict(MAISI_CONFIG), "0" * 64)


def vae_row(what: str, shape_text: str, precision: str) -> dict:
    import torch

    from latent.core.vae.inference import decode, encode_mu

    vae, bf16 = maisi_random(), precision == "bf16"
    shape = tuple(int(v) for v in shape_text.split("x"))
    volume = torch.rand((1, 1, *shape), device="cuda")
    if what == "encode":
        return timed(lambda: encode_mu(vae, volume, bf16=bf16), repeats=2)
    latent = encode_mu(vae, volume, bf16=bf16)
    del volume
    return timed(lambda: decode(vae, latent, bf16=bf16), repeats=2)


def recipe_model_config(recipe: str, work: Path) -> dict:
    """The recipe's model section; a ControlNet gets a freshly saved random prior of the same recipe."""
    import yaml

    from latent.translate.models.base import build_model

    recipe_data = yaml.safe_load((ROOT / "configs" / recipe).read_text())
    config = recipe_data["model"]
    crop = recipe_data["data"].get("crop")
    if crop is not None and config["family"] in ("l2sct", "l2l_ddim", "l2l_regress", "l2l_controlnet"):
        config["window"] = crop  # what training on the fitted grid records: sliding windows of the crop
    if config["family"] == "l2sct" and config.get("decoder", "from_vae") == "from_vae" and not config.get("vae"):
        import torch

        from latent.core.vae.loading import MAISI_CONFIG, build_vae

        weights = work / "maisi_random.pt"  # the exact MAISI decode path, random weights (speed only)
        torch.save(build_vae("AutoencoderKlMaisi", MAISI_CONFIG).state_dict(), weights)
        config.update(vae=str(weights), init_trunk_from=None)
    if config.get("stage") == "controlnet":
        prior = build_model({**config, "stage": "prior", "prior_path": None})
        config["prior_path"] = str(prior.save_pretrained(work / "prior"))
    return config


def e2e_row(family: str) -> dict:
    from latent.decode.pipeline import TrainedRun
    from latent.encode.latents import grid_record
    from latent.app.predict_run import PredictOptions, predict_files
    from latent.core.grid import parse_grid_spec
    from latent.core.phantom.generate import generate_phantom_dataset
    from latent.translate.models.base import build_model

    work = Path(tempfile.mkdtemp(prefix="gpu_e2e_"))
    case = generate_phantom_dataset(work / "data", 1, ["AB"], seed=0, size="synthrad")[0]
    config = recipe_model_config(E2E_FAMILIES[family], work)
    if family == "l2l_ddim":
        config["num_inference_steps"] = E2E_DDIM_STEPS
    model = build_model(config).cuda().eval()
    grid = parse_grid_spec(FULL_GRID)
    run = TrainedRun(work / "run", model, {"record": {"grid": grid_record(grid)}, "latent_stats": None})
    vae = maisi_random()
    written = []

    def one_case() -> None:
        written.append(predict_files(run, vae, Path(case) / "mr.mha", Path(case) / "mask.mha", work / "out",
                                     PredictOptions()))

    row = timed(one_case, repeats=3)
    row["stage_seconds"] = json.loads((written[-1].parent / f"{written[-1].name.split('.')[0]}_timings.json").read_text())
    row["grid"] = FULL_GRID
    return row


def synthetic_batch(recipe: str) -> dict:
    """Every batch key at the recipe's shapes (its latent crop; 24 x 80 x 80 latents for a recipe without one)."""
    import torch
    import yaml

    data = yaml.safe_load((ROOT / "configs" / recipe).read_text())["data"]
    batch, latent = int(data.get("batch_size", 2)), tuple(data.get("crop") or (24, 80, 80))
    pixels = tuple(4 * v for v in latent)
    return {"mr_mu": torch.randn((batch, 4, *latent), device="cuda"),
            "ct_mu": torch.randn((batch, 4, *latent), device="cuda"),
            "mask_latent": torch.ones((batch, 1, *latent), device="cuda"),
            "mr_pixels": torch.randn((batch, 1, *pixels), device="cuda"),
            "ct_pixels": torch.rand((batch, 1, *pixels), device="cuda") * 2 - 1,
            "mask_pixels": torch.ones((batch, 1, *pixels), device="cuda")}


def train_row(recipe: str, *changes: str) -> dict:
    import torch
    import yaml

    from latent.translate.models.base import build_model

    config = recipe_model_config(recipe, Path(tempfile.mkdtemp(prefix="gpu_train_")))
    for change in changes:
        field, value = change.split("=", 1)
        config[field] = yaml.safe_load(value)
    model = build_model(config).cuda().train()
    batch = synthetic_batch(recipe)
    optimizers = {phase: torch.optim.AdamW(model.phase_parameters(phase), lr=1e-4) for phase in model.phases}

    def step() -> None:
        for phase in model.phases:
            optimizers[phase].zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                losses = model(batch, phase=phase)
            losses["loss"].backward()
            optimizers[phase].step()

    row = timed(step, repeats=5, warmup=2)
    row.update(parameters_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
               batch_shapes={k: list(v.shape) for k, v in batch.items()}, mixed_precision="bf16",
               model_changes=list(changes))
    return row


def run_row(name: str) -> dict:
    """Measure one row; ``sleep S`` rows (driver self-test) only sleep."""
    kind, *rest = name.split(" ")
    if kind == "sleep":
        time.sleep(float(rest[0]))
        return {"seconds": float(rest[0])}
    import torch

    torch.backends.cudnn.benchmark = True
    if kind == "vae":
        return vae_row(*rest)
    if kind == "e2e":
        return e2e_row(rest[0])
    if kind == "train":
        return train_row(*rest)
    raise ValueError(f"unknown row {name!r}")


def child(rows: list[str], events: Path) -> int:
    """Run ``rows`` in order, appending a ``started`` and a ``row`` event per row to ``events``."""
    for name in rows:
        with events.open("a") as handle:
            handle.write(json.dumps({"started": name, "at": time.time()}) + "\n")
        try:
            result = {"row": name, **run_row(name)}
        except Exception as error:  # noqa: BLE001 - record and go on (out of memory, say)
            result = {"row": name, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
            if not name.startswith("sleep"):
                import torch

                torch.cuda.empty_cache()
        with events.open("a") as handle:
            handle.write(json.dumps(result) + "\n")
    return 0


# ----------------------------------------------------------------------------- the driver
def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def drive(rows: list[str], out: Path, row_limit: float, report: dict) -> dict:
    """Run ``rows`` in child processes, killing a row past ``row_limit`` s; rewrite ``out`` after every row."""
    events = out.with_name(out.name + ".events.jsonl")
    events.unlink(missing_ok=True)
    results: list[dict] = []
    remaining = list(rows)

    def save() -> None:
        out.write_text(json.dumps({**report, "row_limit_s": row_limit, "rows": results}, indent=2) + "\n")

    while remaining:
        process = subprocess.Popen([sys.executable, __file__, "--child", "--events", str(events), "--rows-json",
                                    json.dumps(remaining)], cwd=ROOT)
        seen = len(_events(events))
        while True:
            time.sleep(POLL_SECONDS)
            new = _events(events)[seen:]
            for event in new:
                if "row" in event:
                    results.append(event)
                    remaining.remove(event["row"])
                    print(json.dumps(event), flush=True)
                    save()
            seen += len(new)
            started = [e for e in _events(events) if "started" in e and e["started"] in remaining]
            if process.poll() is not None:
                if remaining and started:  # the child died inside a row (a crash, not an exception)
                    results.append({"row": started[-1]["started"], "error": f"child exited with {process.returncode}"})
                    remaining.remove(started[-1]["started"])
                    save()
                break
            if started and time.time() - started[-1]["at"] > row_limit:
                process.kill()
                process.wait()
                results.append({"row": started[-1]["started"], "error": f"timed out after {row_limit:.0f} s (killed)"})
                remaining.remove(started[-1]["started"])
                print(json.dumps(results[-1]), flush=True)
                save()
                break
    save()
    return {**report, "rows": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="JSON to write (rewritten after every row)")
    parser.add_argument("--rows", default="", help="comma-separated prefixes of the rows to run (default: all)")
    parser.add_argument("--row-limit", type=float, default=120.0, help="seconds before a row is killed")
    parser.add_argument("--list", action="store_true", help="print the row names and stop")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--events", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rows-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.child:
        return child(json.loads(args.rows_json), args.events)
    prefixes = [p.strip() for p in args.rows.split(",") if p.strip()]
    rows = [row for row in all_rows() if not prefixes or any(row.startswith(p) for p in prefixes)]
    if args.list:
        print("\n".join(rows))
        return 0
    if args.out is None:
        parser.error("--out is required")
    import torch

    if not torch.cuda.is_available() and not all(row.startswith("sleep") for row in rows):
        print("error: no CUDA device (gpu_check measures the GPU)", file=sys.stderr)
        return 2
    report = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
              "torch": torch.__version__}
    drive(rows, args.out, args.row_limit, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
