"""``latent push``: a trained run or a VAE folder to the Hugging Face hub, with a model card.

What goes up is chosen by :func:`latent.core.model_folder.publishable_files` (the model folders and
the records prediction needs; no checkpoints or logs). The card says what the model is, what it
was trained on as far as the folder records it, how to use it, and what it is not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from latent.core.model_folder import HUB_PREFIX, publishable_files, push_folder


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def model_card(folder: Path, repo_id: str) -> str:
    """The README.md of the hub repository for ``folder`` (a run or a model folder)."""
    files = publishable_files(folder)
    lines = ["---", "library_name: latent-sct", "tags: [medical-imaging, synthetic-ct, mri, radiotherapy]", "---", ""]
    if (folder / "producer.json").is_file():
        recipe, producer = _read_json(folder / "config.json"), _read_json(folder / "producer.json")
        family = recipe.get("model", {}).get("family", "unknown")
        validation = _read_json(folder / "best" / "validation.json")
        lines += [f"# {repo_id}: `{family}` MR -> synthetic CT", "",
                  f"A `{family}` run trained with latent-sct (one training loop, `latent train`).", "",
                  "| | |", "| --- | --- |",
                  f"| family | `{family}` |",
                  f"| VAE weights (sha256) | `{producer.get('vae_weights_sha256', 'n/a')}` |",
                  f"| canonical grid | `{json.dumps(producer.get('grid', 'n/a'))}` |",
                  f"| recipe | `config.json` (resolved, as trained) |"]
        if validation:
            lines.append(f"| selected | step {validation.get('step')}: validation MAE {validation.get('mae', float('nan')):.1f} HU "
                         f"({validation.get('selected_by', 'validation')}) |")
        lines += ["", "## Use", "", "```bash",
                  f"latent predict --model {HUB_PREFIX}{repo_id} --data ROOT --out preds   # add --vae SPEC if needed",
                  "```", ""]
    else:
        config = _read_json(folder / "config.json")
        lines += [f"# {repo_id}: a `{config.get('class_name', 'model')}` VAE for latent-sct", "",
                  "| | |", "| --- | --- |", f"| class | `{config.get('class_name')}` |",
                  f"| layout | `{config.get('layout', 'n/a')}` |", f"| norm | `{config.get('norm', 'group')}` |",
                  "", "## Use", "", "```bash",
                  f"latent encode --vae {HUB_PREFIX}{repo_id} --data ROOT --cache runs/cache.zarr --grid GRID", "```", ""]
    lines += ["## Files", "", *(f"- `{name}`" for name in files), "",
              "## Limits", "",
              "Research software, not a medical device. The accuracy of this model on your patients is "
              "unknown until you measure it on your own data (`latent evaluate`).", ""]
    return "\n".join(lines)


def push(folder: Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Push ``folder`` to ``repo_id`` with its model card; return the commit URL."""
    return push_folder(folder, repo_id, card=model_card(folder, repo_id), private=private, token=token)
