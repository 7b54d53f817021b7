"""Copy a fitted VAE into the package as the shipped stand-in, and write its provenance file.

    python benchmarks/ship_standin_vae.py --run runs/standin_vae --command "..." --machine-note "..."

Reads the ``latent vae fit`` output folder ``RUN/vae`` (``config.json``, ``model.safetensors``,
``fit_config.json``) and the phantom set it was trained on, copies the two model files to
``latent/weights/standin_vae/``, scores the copy on the validation cases (masked MAE in HU of
decode(encode(CT)) on the canonical grid, per tissue class) and writes ``PROVENANCE.md`` beside
it. It prints the two SHA-256 digests to pin in ``latent.core.vae.loading.SHIPPED_VAES``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

REPOSITORY = Path(__file__).resolve().parents[1]
TARGET = REPOSITORY / "latent" / "weights" / "standin_vae"


def validation_figures(vae_dir: Path, data: Path, split: Path, grid: str) -> dict[str, float]:
    """Mean over the validation cases of the canonical-grid CT floor, overall and per tissue."""
    import torch

    from latent.core.cases import discover_cases, load_splits
    from latent.core.grid import parse_grid_spec
    from latent.core.intensity import full_to_ct, vae_to_ct
    from latent.evaluation.metrics import tissue_errors
    from latent.core.prepare import prepare_case
    from latent.core.vae.loading import load_vae
    from latent.core.vae.inference import decode, encode_mu

    vae = load_vae(str(vae_dir))
    val = set(load_splits(split)["val"])
    rows = []
    with torch.no_grad():
        for case in discover_cases(data):
            if case.pid not in val:
                continue
            prepared = prepare_case(case, parse_grid_spec(grid))
            mask = prepared.mask > 0
            recon = vae_to_ct(decode(vae, encode_mu(vae, torch.from_numpy(prepared.ct_vae)[None, None]))[0, 0].numpy())
            mr = torch.from_numpy(prepared.mr_unit)[None, None]
            mr_recon = decode(vae, encode_mu(vae, mr))[0, 0].numpy()
            row = {"ct_mae_hu_window": float(np.abs(recon - vae_to_ct(prepared.ct_vae))[mask].mean()),
                   "mr_l1_in_body": float(np.abs(mr_recon - prepared.mr_unit)[mask].mean())}
            row.update(tissue_errors(full_to_ct(prepared.ct_full), recon, mask))
            rows.append(row)
    return {key: float(np.nanmean([r[key] for r in rows])) for key in rows[0]} | {"cases": len(rows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="folder with data/, splits.json and vae/")
    parser.add_argument("--commands", required=True, help="the exact commands that made RUN, one per line")
    parser.add_argument("--machine", required=True, help="the machine it trained on")
    parser.add_argument("--wall", required=True, help="wall time of the training, as measured")
    parser.add_argument("--revision", required=True, help="git revision the training ran at")
    args = parser.parse_args()
    from latent.core.vae.loading import run_model_folder, sha256_file

    source = args.run / "vae"
    report = json.loads((source / "fit_config.json").read_text())
    grid = json.loads((source / "training_grid.json").read_text())
    grid_spec = "x".join(f"{v:g}" for v in grid["spacing"]) + ":" + "x".join(str(v) for v in grid["shape"])
    TARGET.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):  # the selected weights: best/ of the run
        shutil.copyfile(run_model_folder(source) / name, TARGET / name)
    figures = validation_figures(TARGET, args.run / "data", args.run / "splits.json", grid_spec)
    weights, config = sha256_file(TARGET / "model.safetensors"), sha256_file(TARGET / "config.json")
    phantom = json.loads((args.run / "data" / "phantom.json").read_text())
    splits = json.loads((args.run / "splits.json").read_text())
    val_history = ", ".join(f"{step}: {mae:.1f}" for step, mae in report["val_history"])
    text = f"""# The shipped stand-in VAE (`--vae standin`)

Written by `benchmarks/ship_standin_vae.py`. A small VAE of the MAISI family (MONAI `AutoencoderKL`,
4 latent channels, x4 per axis, no normalisation layers: see docs/vae.md) that the demo uses frozen,
the way real users run the pretrained MAISI VAE. It was trained on phantoms only, of a seed that no
test and no demo uses; it knows nothing of real anatomy.

| | |
| --- | --- |
| files | `config.json` sha256 `{config}`; `model.safetensors` sha256 `{weights}` ({(TARGET / 'model.safetensors').stat().st_size / 2**20:.1f} MiB) |
| pinned in | `latent/core/vae/loading.py`, `SHIPPED_VAES["standin"]` (both files are checked before loading) |
| training data | `latent phantom` version {phantom['version']}, seed {phantom['seed']}, {len(phantom['cases'])} cases (AB, HN, TH), size `{phantom['size']}`; split: {len(splits['train'])} train, {len(splits['val'])} val; canonical grid `{grid_spec}`; MR and CT of every training case |
| settings | `configs/vae_standin.yaml` (resolved: `{json.dumps(report['config'], sort_keys=True)}`) |
| steps | {report['steps']} optimiser steps; kept: the EMA weights of step {report['selected_step']}, {report['selected_by']} |
| wall time | {args.wall} |
| machine | {args.machine}; precision `{report['mixed_precision']}` |
| git revision | {args.revision} |

## Commands

```bash
{args.commands}
```

A run stopped at any point continues with the same `latent vae fit` command plus `--resume`.

## Reconstruction figures (validation cases, canonical grid, inside the body mask)

| figure | value |
| --- | --- |
| CT MAE in the VAE window [-1000, 1000] HU | {figures['ct_mae_hu_window']:.1f} HU |
| CT MAE air / soft tissue / bone 250-1000 / above 1000 HU (against the full-range CT) | {figures['mae_air']:.1f} / {figures['mae_soft']:.1f} / {figures['mae_bone']:.1f} / {figures['mae_above_1000']:.1f} HU |
| CT bias air / soft tissue / bone (mean reconstruction - CT) | {figures['bias_air']:.1f} / {figures['bias_soft']:.1f} / {figures['bias_bone']:.1f} HU |
| MR L1 (MR normalised to its 99.5th percentile) | {figures['mr_l1_in_body']:.4f} |
| validation CT MAE during training (step: HU) | {val_history} |

On the demo's own test split (other phantoms, native grid, SynthRAD metrics) the floor of this VAE
is the `vae_floor` row of `benchmarks/results/demo_phantom_cpu.md`.
"""
    (TARGET / "PROVENANCE.md").write_text(text)
    print(f'weights_sha256="{weights}",\nconfig_sha256="{config}",')
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
