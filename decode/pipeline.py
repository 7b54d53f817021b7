"""A trained run for prediction: loading it, checking it against its VAE, and translating one
model input to canonical HU (samples, flip TTA, ensembles combined).

The run records the cache producer it was trained on (VAE weights hash, VAE config, canonical
grid, normalisation) and the latent statistics; prediction from raw MR files re-creates exactly
that input (:mod:`latent.decode.run_predictor`) and refuses a VAE whose weights differ.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from latent.decode.combine import Moments, combine_volumes, flip_variants, mirror
from latent.decode.sct import output_to_canonical_hu
from latent.core.cases import Case
from latent.core.errors import BadConfigError
from latent.core.grid import CanonicalGrid
from latent.core.model_folder import resolve_folder
from latent.translate.models.base import TranslationModel, load_pretrained


logger = logging.getLogger(__name__)

#: What a translator maps from: the MR latent or the MR pixels (an adapted decoder maps ``ct_mu``).
TRANSLATOR_INPUTS = ("mr_mu", "mr_pixels")


class RunMismatchError(BadConfigError, ValueError):
    """The VAE or grid given for prediction differs from the one the run was trained on."""


@dataclass
class TrainedRun:
    """A run directory's model and the producer record it was trained on."""

    run_dir: Path
    model: TranslationModel
    producer: dict[str, Any]
    #: An adapted full-range decoder (``latent vae adapt``) replacing the VAE's decode of CT latents.
    decoder: TranslationModel | None = None

    @property
    def record(self) -> dict[str, Any]:
        """The cache producer record (VAE hash and config, grid, normalisation)."""
        return self.producer["record"]

    @property
    def grid(self) -> CanonicalGrid:
        """The canonical grid the run was trained on."""
        return CanonicalGrid.from_dict(self.record["grid"])

    def latent_stats(self, key: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Per-channel (mean, std) used to standardise ``mr_mu`` / ``ct_mu`` (None, None if unused)."""
        stats = (self.producer.get("latent_stats") or {}).get(key)
        if not stats:
            return None, None
        return torch.tensor(stats["mean"], dtype=torch.float32), torch.tensor(stats["std"], dtype=torch.float32)

    @property
    def regions(self) -> tuple[str, ...] | None:
        """The regions the run was trained on (``data.regions``), or None: every region."""
        regions = self.producer.get("regions")
        return None if regions is None else tuple(regions)

    @property
    def needs_vae(self) -> bool:
        """Latent input (MR encode) or latent output (CT decode) needs the run's VAE."""
        return self.model.input_key == "mr_mu" or self.model.output_space == "ct_latent"


def load_run(run_dir: str | os.PathLike, which: str = "best") -> TrainedRun:
    """Load ``run_dir/<which>`` and ``run_dir/producer.json``; a missing ``best/`` falls back to ``final/`` with a warning.

    ``run_dir`` is a folder or a run pushed to the hub (``hf://owner/name[@revision]``, ``latent push``).
    """
    run_dir = resolve_folder(run_dir)
    producer_path = run_dir / "producer.json"
    if not producer_path.is_file():
        raise FileNotFoundError(f"{producer_path}: missing; is {run_dir} a training run folder?")
    folder = run_dir / which
    if not folder.is_dir():
        fallback = run_dir / "final"
        if which == "final" or not fallback.is_dir():
            raise FileNotFoundError(f"{folder}: missing; is {run_dir} a finished training run?")
        logger.warning("%s: no %s/ model (the run never validated); using %s", run_dir, which, fallback)
        folder = fallback
    model = load_pretrained(folder)
    if model.input_key not in TRANSLATOR_INPUTS:
        raise BadConfigError(f"{run_dir}: a {model.config.family} model maps {model.input_key}, not the MR; an adapted "
                             "decoder is given with --decoder beside a latent-to-latent --model")
    return TrainedRun(run_dir, model, json.loads(producer_path.read_text()))


def load_adapted_decoder(decoder_dir: str | os.PathLike, producer_key: str | None) -> TranslationModel:
    """The adapted decoder of a ``latent vae adapt`` run (``best/``, else ``final/``).

    Raises:
        BadConfigError: ``decoder_dir`` is not an adapted decoder, or it was adapted on another
            cache producer than ``producer_key`` (another VAE, grid or normalisation).
    """
    folder = resolve_folder(decoder_dir)
    producer_path = folder / "producer.json"
    which = folder / "best" if (folder / "best").is_dir() else folder / "final"
    if not producer_path.is_file() or not which.is_dir():
        raise FileNotFoundError(f"--decoder: {folder} is not a finished run of latent vae adapt "
                                "(producer.json, best/ or final/)")
    decoder = load_pretrained(which)
    if decoder.input_key != "ct_mu" or not hasattr(decoder, "decode_raw_latent"):
        raise BadConfigError(f"--decoder: {folder} holds a {decoder.config.family} model, not an adapted decoder")
    theirs = json.loads(producer_path.read_text()).get("producer_key")
    if theirs != producer_key:
        raise RunMismatchError(f"--decoder: {folder} was adapted on the cache producer {theirs}, not on {producer_key}; "
                               "adapt a decoder on the same cache")
    return decoder


def attach_decoder(run: TrainedRun, decoder_dir: str | os.PathLike) -> TrainedRun:
    """``run`` decoding its CT latents through the adapted decoder of ``decoder_dir`` (same producer)."""
    if run.model.output_space != "ct_latent":
        raise BadConfigError(f"--decoder: {run.run_dir} predicts {run.model.output_space}, not a CT latent to decode")
    decoder = load_adapted_decoder(decoder_dir, run.producer.get("producer_key"))
    return TrainedRun(run.run_dir, run.model, run.producer, decoder.to(next(run.model.parameters()).device))


def check_vae_matches(run: TrainedRun, vae) -> None:
    """Refuse a VAE whose weights or architecture differ from the run's producer."""
    info = vae.producer_info()
    expected = run.record["vae_weights_sha256"]
    if info["weights_sha256"] != expected:
        raise RunMismatchError(
            f"VAE {getattr(vae, 'source', '') or info.get('name')} has weights sha256 {info['weights_sha256'][:12]}..., "
            f"but run {run.run_dir} was trained on latents of {expected[:12]}...; pass the run's VAE with --vae"
        )


def check_grid_matches(run: TrainedRun, grid: CanonicalGrid) -> None:
    """Refuse a canonical grid other than the run's."""
    if grid != run.grid:
        raise RunMismatchError(f"grid {grid.spec()} differs from the run's grid {run.grid.spec()}")


@dataclass
class CasePrediction:
    """Native-grid sCT (and std map over K > 1 samples, flips or ensemble members) with per-stage seconds."""

    hu: np.ndarray
    std: np.ndarray | None
    seconds: dict[str, float] = field(default_factory=dict)


def translate_input(run: TrainedRun, inputs: torch.Tensor, samples: int, seed: int = 0,
                    tta: str = "none") -> list[torch.Tensor]:
    """Outputs of the model: per flip variant of ``tta`` (:func:`latent.decode.combine.flip_variants` of the
    family's ``flip_axes``), ``samples`` outputs (one for deterministic models) seeded ``seed + k``.

    A flipped pass mirrors the input (latent or pixels) and mirrors the output back, so every
    output is in the input's orientation.
    """
    model = run.model
    count = samples if model.stochastic else 1
    outputs = []
    for dims in flip_variants(model.flip_axes, tta):
        flipped = model.mirror_input(inputs, dims)
        for index in range(count):
            if model.stochastic:
                generator = torch.Generator(device=inputs.device).manual_seed(seed + index)
                output = model.translate_volume(flipped, generator=generator)
            else:
                output = model.translate_volume(flipped)
            outputs.append(mirror(output, dims))
    return outputs


def predict_canonical(run: TrainedRun, vae, mr_input: torch.Tensor, samples: int = 1, seed: int = 0,
                      tile: Sequence[int] | None = None, tta: str = "none"
                      ) -> tuple[np.ndarray, np.ndarray | None, dict[str, float]]:
    """Model input (encoded MR latent already standardised, or MR pixels) -> canonical HU (+ std
    over samples and flips, None for a single output)."""
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    with torch.no_grad():
        outputs = translate_input(run, mr_input, samples, seed, tta)
    seconds["translate"] = time.perf_counter() - started
    started = time.perf_counter()
    mean, std = run.latent_stats("ct_mu")
    moments = Moments()
    decoder = vae if run.decoder is None else run.decoder
    for out in outputs:
        moments.add(output_to_canonical_hu(out, run.model.output_space, decoder, mean, std, tile=tile)[0])
    seconds["decode"] = time.perf_counter() - started
    hu, std_map = moments.result()
    return hu, std_map, seconds


def combine_predictions(predictions: Sequence[CasePrediction]) -> CasePrediction:
    """Ensemble of native-grid predictions: the members' mean HU (equal weights) and the std of
    the mixture of their outputs (across members, and each member's samples and flips); seconds add up."""
    if len(predictions) == 1:
        return predictions[0]
    hu, std = combine_volumes([p.hu for p in predictions], [p.std for p in predictions])
    seconds: dict[str, float] = {}
    for prediction in predictions:
        for stage, value in prediction.seconds.items():
            seconds[stage] = seconds.get(stage, 0.0) + value
    return CasePrediction(hu, std, seconds)


def case_from_files(mr: Path, mask: Path | None, pid: str | None = None) -> Case:
    """A :class:`Case` for a lone MR file (``--mr FILE [--mask FILE]``)."""
    from latent.core.io import strip_volume_suffix

    return Case(pid=pid or strip_volume_suffix(mr.name), region="?", centre="?", mr=mr, mask=mask)


__all__ = [
    "CasePrediction", "RunMismatchError", "TrainedRun", "case_from_files", "check_grid_matches", "combine_predictions",
    "check_vae_matches", "load_run", "predict_canonical",
]
