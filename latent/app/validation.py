"""Validation during training on what users are scored on: native-grid sCT, SynthRAD metrics.

Logged per validation: ``val/mae`` (which picks ``best/``), ``val/psnr``, ``val/ms_ssim`` and
``val/bone_dice`` (bone at >= 250 HU in the CT and in the sCT, docs/metrics.md), the curve that
shows when a model starts to put bone where the CT has it.

A recipe asks for it with ``train.validator: native``; :func:`train_run` passes it to
``latent.translate.train.train`` (the translate stage never loads it by name). Each validation
case's model output is decoded (the run's VAE for latent outputs), mapped back onto the case's
native grid and scored against its native CT inside its mask. The cache and the VAE are opened at
the first validation, so a run without validation cases never loads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from latent.decode.pipeline import predict_canonical
from latent.decode.native import canonical_to_native_sct
from latent.core.grid import GridMapping
from latent.core.io import read_volume
from latent.evaluation.metrics import bone_dice, image_metrics


class NativeValidator:
    """Mean MAE / PSNR / MS-SSIM / bone Dice over the validation cases on their native grids."""

    def __init__(self, config, samples: int = 1, seed: int = 0) -> None:
        self.config = config
        self.samples = samples
        self.seed = seed
        self.cache = self.producer = self.vae = None
        self._natives: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _open(self) -> None:
        """The run's cache, its producer record and (for latent outputs) its VAE, once."""
        if self.cache is None:
            self.cache, self.producer, self.vae = open_validation_sources(self.config)

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
        return f"val/mae: masked MAE in HU on the native grid ({through}train.validator: native)"

    @torch.no_grad()
    def __call__(self, model, val_batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        from latent.decode.pipeline import TrainedRun

        self._open()
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


def open_validation_sources(config) -> tuple[Any, dict[str, Any], Any]:
    """``(cache, producer, vae)`` of a training config: the VAE only for latent outputs (else None)."""
    from latent.cache import LatentCache
    from latent.translate.data import resolve_producer
    from latent.translate.models.base import model_class

    key, record = resolve_producer(config.data.cache, config.data.producer)
    cache = LatentCache.open(config.data.cache, key)
    vae = None
    if model_class(config.model.family).output_space == "ct_latent":
        from latent.core.vae.loading import load_vae

        location = record.get("vae_location", {})
        vae = load_vae(str(location.get("path") or location.get("name")))
    return cache, {"producer_key": key, "record": record, "latent_stats": cache.latent_stats()}, vae


def native_validator(config) -> NativeValidator:
    """The validator of ``train.validator: native`` for a training config (opened when first called)."""
    return NativeValidator(config, samples=config.train.val_samples, seed=config.train.seed)


def train_run(config, quiet: bool = False, overwrite: bool = False, resume_inexact: bool = False,
              on_validation=None) -> Path:
    """Train a translation recipe with the validator it asks for (``native``: built here);
    ``overwrite``, ``resume_inexact`` and ``on_validation`` as in ``latent.translate.train.train``."""
    from latent.translate.train import train

    validator = native_validator(config) if config.train.validator == "native" and config.data.cache else None
    return train(config, validator=validator, quiet=quiet, overwrite=overwrite, resume_inexact=resume_inexact,
                 on_validation=on_validation)
