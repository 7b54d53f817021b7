"""GPU timing check: the real-size MAISI VAE encode/decode and one training step of the full recipes.

Run on a CUDA machine: ``python benchmarks/gpu_check.py --out results.json``. Random weights (the
released ones are not needed for speed). Each measurement is the median of a few timed runs after
a warm-up, with ``torch.cuda.synchronize``; peak memory is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latent.vae import MAISI_CONFIG, LoadedVAE, build_vae  # noqa: E402
from latent.vae_inference import decode, encode_mu  # noqa: E402
from translate.models.base import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def timed(function, repeats: int = 3, warmup: int = 1) -> tuple[float, float]:
    """(median seconds, peak GiB) of ``function()`` on the current CUDA device."""
    for _ in range(warmup):
        function()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def vae_rows(shapes, bf16_options, report: dict, out: Path) -> list[dict]:
    network = build_vae("AutoencoderKlMaisi", MAISI_CONFIG, device="cuda")
    vae = LoadedVAE(network, "maisi-random", "AutoencoderKlMaisi", dict(MAISI_CONFIG), "0" * 64)
    rows = []
    for shape in shapes:
        volume = torch.rand((1, 1, *shape), device="cuda")
        for bf16 in bf16_options:
            row = {"what": "maisi encode", "shape_zyx": list(shape), "bf16": bf16}
            try:
                seconds, peak = timed(lambda: encode_mu(vae, volume, bf16=bf16), repeats=2)
                row.update(seconds=round(seconds, 4), peak_gib=round(peak, 2))
                latent = encode_mu(vae, volume, bf16=bf16)
                seconds, peak = timed(lambda: decode(vae, latent, bf16=bf16), repeats=2)
                rows.append(row)
                row = {"what": "maisi decode", "shape_zyx": list(shape), "bf16": bf16,
                       "seconds": round(seconds, 4), "peak_gib": round(peak, 2)}
            except Exception as error:  # noqa: BLE001 - record and go on (e.g. out of memory)
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
            out.write_text(json.dumps({**report, "rows": rows}, indent=2) + "\n")
        del volume
        torch.cuda.empty_cache()
    return rows


def train_step_row(recipe: str, batch: dict, mixed: str = "bf16") -> dict:
    config = yaml.safe_load((ROOT / "configs" / recipe).read_text())["model"]
    row = {"what": f"train step {config['family']}", "recipe": recipe,
           "batch_shapes": {k: list(v.shape) for k, v in batch.items()}, "mixed_precision": mixed}
    try:
        model = build_model(config).cuda().train()
        row["parameters_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        optimizers = {phase: torch.optim.AdamW(model.phase_parameters(phase), lr=1e-4) for phase in model.phases}

        def step() -> None:
            for phase in model.phases:
                optimizers[phase].zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mixed == "bf16"):
                    losses = model(batch, phase=phase)
                losses["loss"].backward()
                optimizers[phase].step()

        seconds, peak = timed(step, repeats=5, warmup=2)
        row.update(seconds=round(seconds, 4), peak_gib=round(peak, 2))
    except Exception as error:  # noqa: BLE001
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        traceback.print_exc()
    torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--skip-train", action="store_true", help="VAE timings only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": []}
    shapes = [(128, 128, 128), (96, 320, 320)] if args.quick else [(64, 64, 64), (128, 128, 128), (128, 256, 256), (96, 320, 320), (128, 512, 512)]
    report["rows"] += vae_rows(shapes, (False, True), report, args.out)
    if args.skip_train:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        return 0
    latent = (2, 4, 24, 80, 80)  # synthrad-1.5mm grid (96 x 320 x 320) / 4, batch 2
    latents = {"mr_mu": torch.randn(latent, device="cuda"), "ct_mu": torch.randn(latent, device="cuda"),
               "mask_latent": torch.ones((2, 1, 24, 80, 80), device="cuda")}
    report["rows"].append(train_step_row("l2l_ddim_full.yaml", latents))
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    crop = (2, 4, 24, 40, 40)
    pixels = {"mr_mu": torch.randn(crop, device="cuda"), "ct_pixels": torch.rand((2, 1, 96, 160, 160), device="cuda") * 2 - 1,
              "mask_pixels": torch.ones((2, 1, 96, 160, 160), device="cuda")}
    report["rows"].append(train_step_row("l2sct_full.yaml", pixels))
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
