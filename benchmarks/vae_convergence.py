"""How many optimiser steps the demo-size VAE needs: in-body reconstruction error vs steps.

The demo fits its VAE for a few minutes on 2 CPU cores, i.e. tens of steps; this measures what
more steps (or another setting) would buy, in steps, so the answer does not depend on the device:

    python benchmarks/vae_convergence.py prepare --demo demo_run --out vae_volumes.npz    # CPU, SimpleITK
    python benchmarks/vae_convergence.py run --volumes vae_volumes.npz --out result.json  # any device

``run`` fits :func:`latent.core.vae.fit.fit_vae` once per setting, resuming up to each evaluation
step, and scores decode(encode(CT)) of the test split on the canonical grid: MAE in HU inside
the body mask (the VAE window is 2000 HU wide). Steps per second on the device are recorded too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: The VAEFitConfig defaults before the norm-free, crop-trained design (what the recorded
#: H100 study, benchmarks/results/vae_convergence_h100.md, called "demo").
WHOLE_VOLUME_GROUPNORM = {"norm": "group", "crop": None, "lr": 3e-4, "lr_schedule": "none", "warmup_steps": 0,
                          "ema_decay": None}
#: Settings compared (VAEFitConfig fields, on top of WHOLE_VOLUME_GROUPNORM except "default").
SETTINGS = {
    "default": None,  # today's VAEFitConfig defaults (norm-free, body-centred crops, EMA, cosine)
    "demo": {},
    "lr3e-4": {"lr": 3e-4},
    "lr3e-3": {"lr": 3e-3},
    "ch8-16-32_lr2e-3": {"channels": [8, 16, 32], "lr": 2e-3},
    "kl0": {"kl_weight": 0.0},
    "crop32x64x64": {"crop": [32, 64, 64]},
    "batch4": {"batch_size": 4},
}
VAE_WINDOW_HU = 2000.0


def prepare(demo: Path, out: Path) -> None:
    """Canonical, normalised training volumes and test CTs with masks of a demo folder."""
    from latent.core.cases import discover_cases, load_splits
    from latent.app.demo import DEMO_GRID
    from latent.core.prepare import prepare_case, resolve_grid
    from latent.core.vae.pipeline import training_volumes

    volumes = training_volumes(demo / "data", DEMO_GRID, demo / "splits.json", quiet=True).volumes
    test = set(load_splits(demo / "splits.json")["test"])
    cases = [case for case in discover_cases(demo / "data") if case.pid in test]
    grid, _ = resolve_grid(DEMO_GRID, cases)
    prepared = [prepare_case(case, grid) for case in cases]
    np.savez_compressed(
        out, train=np.stack(volumes).astype(np.float16),
        test_ct=np.stack([p.ct_vae for p in prepared]).astype(np.float16),
        test_mask=np.stack([p.mask for p in prepared]).astype(np.uint8),
    )


def body_mae_hu(vae_dir: Path, ct: np.ndarray, mask: np.ndarray, device: str) -> float:
    """Mean over test cases of the in-body |decode(encode(CT)) - CT| in HU."""
    import torch

    from latent.core.vae.loading import load_vae
    from latent.core.vae.inference import decode, encode_mu

    vae = load_vae(str(vae_dir), device=device)
    errors = []
    with torch.no_grad():
        for volume, body in zip(ct, mask):
            x = torch.from_numpy(volume.astype(np.float32))[None, None].to(device)
            reconstruction = decode(vae, encode_mu(vae, x))[0, 0].float().cpu().numpy()
            inside = body > 0
            errors.append(float(np.abs(reconstruction[inside] - volume[inside]).mean()) * VAE_WINDOW_HU)
    return float(np.mean(errors))


def run(volumes_path: Path, out: Path, evals: list[int], work: Path, names: list[str]) -> dict:
    import torch

    from latent.core.vae.fit import VAEFitConfig, fit_vae

    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = np.load(volumes_path)
    train = [v.astype(np.float32) for v in data["train"]]
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "train_volumes": len(train), "shape": list(train[0].shape), "settings": {}}
    for name in names:
        folder = work / name
        curve = []
        for index, steps in enumerate(evals):
            setting = {} if SETTINGS[name] is None else {**WHOLE_VOLUME_GROUPNORM, **SETTINGS[name]}
            config = VAEFitConfig(max_steps=steps, final_eval_volumes=0, checkpoint_every=10**6,
                                  cpu=device == "cpu", **setting)
            started = time.perf_counter()
            fit_vae(train, folder, config, resume=index > 0, quiet=True)
            seconds = time.perf_counter() - started
            mae = body_mae_hu(folder, data["test_ct"], data["test_mask"], device)
            curve.append({"steps": steps, "body_mae_hu": round(mae, 1), "fit_seconds": round(seconds, 2)})
            print(name, curve[-1], flush=True)
        result["settings"][name] = {"config": SETTINGS[name], "curve": curve}
        out.write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, out.with_suffix(".md"))
    return result


def write_markdown(result: dict, path: Path) -> None:
    """Markdown table of a ``run`` result: in-body MAE (HU) per setting and step count."""
    steps = sorted({point["steps"] for s in result["settings"].values() for point in s["curve"]})
    lines = [
        f"# Demo VAE: in-body reconstruction MAE (HU) vs optimiser steps ({result['device']}, torch {result['torch']})",
        "",
        f"`benchmarks/vae_convergence.py`, {result['train_volumes']} training volumes (MR and CT of the demo "
        f"train split) of shape {tuple(result['shape'])}, scored on the 6 test CTs: |decode(encode(CT)) - CT| "
        "inside the body mask on the canonical grid, HU. One run per setting (seed 0); single evaluations "
        "are noisy (no averaging over seeds).",
        "",
        "| setting | " + " | ".join(str(s) for s in steps) + " |",
        "|---|" + "---|" * len(steps),
    ]
    for name, setting in result["settings"].items():
        by_step = {point["steps"]: point["body_mae_hu"] for point in setting["curve"]}
        lines.append(f"| {name} {json.dumps(setting['config'])} | "
                     + " | ".join(f"{by_step[s]:.0f}" if s in by_step else "" for s in steps) + " |")
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--demo", type=Path, default=ROOT / "demo_run")
    p.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run")
    r.add_argument("--volumes", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--work", type=Path, default=Path("vae_convergence_runs"))
    r.add_argument("--evals", default="25,50,100,200,400,800,1600")
    r.add_argument("--settings", default=",".join(SETTINGS))
    t = sub.add_parser("table", help="markdown table of a run's JSON")
    t.add_argument("--result", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.demo, args.out)
    elif args.command == "table":
        write_markdown(json.loads(args.result.read_text()), args.out)
    else:
        run(args.volumes, args.out, [int(s) for s in args.evals.split(",")], args.work, args.settings.split(","))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
