"""Validation during training on what users are scored on: native-grid sCT, SynthRAD metrics.

Logged per validation: ``val/mae`` (which picks ``best/``), ``val/psnr``, ``val/ms_ssim`` and
``val/bone_dice`` (bone at >= 250 HU in the CT and in the sCT, docs/metrics.md), the curve that
shows when a model starts to put bone where the CT has it.

Plug into ``translate/train.py`` with ``train.validator: "latent.app.validation:native_validator"``.
Each validation case's model output is decoded (the run's VAE for latent outputs), mapped back
onto the case's native grid and scored against its native CT inside its mask.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch

from latent.decode.pipeline import predict_canonical
from latent.decode.native import canonical_to_native_sct
from latent.grid import GridMapping
from latent.io import read_volume
from latent.metrics import bone_dice, image_metrics


class NativeValidator:
    """Mean MAE / PSNR / MS-SSIM / bone Dice over the validation cases on their native grids."""

    def __init__(self, cache, producer: dict[str, Any], vae, samples: int = 1, seed: int = 0) -> None:
        self.cache = cache
        self.producer = producer
        self.vae = vae
        self.samples = samples
        self.seed = seed
        self._natives: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _native(self, pid: str) -> tuple[np.ndarray, np.ndarray]:
        if pid not in self._natives:
            paths = self.cache.case_attrs(pid)["source_paths"]
            ct = read_volume(paths["ct"], dtype=np.float32)[0]
            mask = read_volume(paths["mask"])[0] > 0
            self._natives[pid] = (ct, mask)
        return self._natives[pid]

    @staticmethod
    def describe(model) -> str:
        """What ``mae`` means (recorded beside ``best/``)."""
        through = "decoded by the run's VAE, " if model.output_space == "ct_latent" else ""
        return f"val/mae: masked MAE in HU on the native grid ({through}latent.app.validation:native_validator)"

    @torch.no_grad()
    def __call__(self, model, val_batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        from latent.decode.pipeline import TrainedRun

        run = TrainedRun(run_dir=None, model=model, producer=self.producer)
        device = next(model.parameters()).device
        scores = []
        for batch in val_batches:
            inputs = model.model_input(batch).to(device)
            for index, pid in enumerate(batch["pid"]):
                hu, _, _ = predict_canonical(run, self.vae, inputs[index:index + 1], self.samples, self.seed)
                mapping = GridMapping.from_dict(self.cache.case_attrs(pid)["geometry"])
                ct, mask = self._native(pid)
                sct = canonical_to_native_sct(hu, mapping, mask)
                scores.append({**image_metrics(ct, sct, mask), "bone_dice": bone_dice(ct, sct, mask)})
        if not scores:
            raise ValueError("validation saw no case")
        return {key: float(np.mean([s[key] for s in scores])) for key in ("mae", "psnr", "ms_ssim", "bone_dice")}


def native_validator(config) -> NativeValidator:
    """Factory for ``train.validator``: opens the run's cache and its VAE."""
    from latent.cache import LatentCache
    from latent.translate.data import resolve_producer

    key, record = resolve_producer(config.data.cache, config.data.producer)
    cache = LatentCache.open(config.data.cache, key)
    vae = None
    from latent.translate.models.base import model_class

    family = model_class(config.model.family)
    if family.output_space == "ct_latent":
        from latent.vae import load_vae

        location = record.get("vae_location", {})
        spec = location.get("path") or location.get("name")
        vae = load_vae(str(spec))
    producer = {"producer_key": key, "record": record, "latent_stats": cache.latent_stats()}
    return NativeValidator(cache, producer, vae, samples=config.train.val_samples, seed=config.train.seed)
