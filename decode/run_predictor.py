"""Trained runs, ensembles and the VAE floor as predictors (:mod:`latent.decode.predictors`).

A trained run reads what the cache would hold for the case (:class:`CaseInputs`): from the cache
itself, or from the case's files, prepared once on the canonical grid (the one reader,
:func:`latent.core.prepare.prepare_case`) and encoded by the encode stage
(:func:`latent.encode.latents.encode_prepared`); this stage only translates and decodes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from latent.core.cases import Case, CaseError
from latent.decode.native import canonical_to_native_sct, std_to_native
from latent.decode.pipeline import CasePrediction, TrainedRun, combine_predictions, predict_canonical
from latent.decode.predictors import NativePrediction
from latent.encode.latents import encode_prepared
from latent.core.grid import CanonicalGrid, GridMapping
from latent.core.io import read_volume
from latent.core.prepare import prepare_case
from latent.core.standardise import standardise


@dataclass
class CaseInputs:
    """What the cache holds for one case (the arrays a model reads), its grid mapping and native mask."""

    arrays: dict[str, np.ndarray]
    mapping: GridMapping
    native_mask: np.ndarray | None
    seconds: dict[str, float] = field(default_factory=dict)


def inputs_from_cache(cache, pid: str, keys: Sequence[str]) -> CaseInputs:
    """The stored arrays ``keys`` of ``pid`` in a cache (no re-encoding) and its native mask."""
    if not cache.has_case(pid, need=list(keys)):
        raise CaseError(f"{pid}: no {', '.join(keys)} in the cache")
    attrs = cache.case_attrs(pid)
    mask_path = attrs.get("source_paths", {}).get("mask")
    native_mask = read_volume(mask_path)[0] if mask_path else None
    return CaseInputs(cache.read_case(pid, list(keys)), GridMapping.from_dict(attrs["geometry"]), native_mask,
                      {"encode": 0.0})


def inputs_from_files(case: Case, grid: CanonicalGrid, vae, keys: Sequence[str], allow_truncation: bool = False,
                      tile: Sequence[int] | None = None) -> CaseInputs:
    """A case's files prepared on ``grid`` and, when ``keys`` need latents, encoded by the encode stage."""
    prepared = prepare_case(case, grid, with_ct=False, allow_truncation=allow_truncation,
                            derive_mask=case.mask is None)
    started = time.perf_counter()
    if any(key.endswith("_mu") for key in keys):
        arrays = encode_prepared(vae, prepared, tile, bf16=False)
    else:
        arrays = {"mr_pixels": prepared.mr_unit, "mask_pixels": prepared.mask}
    return CaseInputs(arrays, prepared.mapping, prepared.native_mask, {"encode": time.perf_counter() - started})


def predict_inputs(run: TrainedRun, vae, inputs: CaseInputs, samples: int = 1, seed: int = 0,
                   tile: Sequence[int] | None = None, tta: str = "none") -> CasePrediction:
    """One run on one case's inputs: standardise the latents with the run's statistics, translate,
    decode and map to the native grid."""
    device = next(run.model.parameters()).device
    tensors = {}
    for key in run.model.input_keys:
        tensor = torch.from_numpy(np.ascontiguousarray(inputs.arrays[key], dtype=np.float32)).to(device)
        tensor = tensor[None] if tensor.ndim == 4 else tensor[None, None]
        if key == "mr_mu":
            mean, std = run.latent_stats("mr_mu")
            tensor = standardise(tensor, mean, std)
        tensors[key] = tensor
    hu, std_map, seconds = predict_canonical(run, vae, run.model.model_input(tensors), samples, seed, tile, tta)
    started = time.perf_counter()
    native = canonical_to_native_sct(hu, inputs.mapping, inputs.native_mask)
    native_std = None if std_map is None else std_to_native(std_map, inputs.mapping, inputs.native_mask)
    seconds["decode"] += time.perf_counter() - started
    return CasePrediction(native, native_std, {**inputs.seconds, **seconds})


#: One trained run and the VAE it predicts through (None for pixel models).
Member = tuple[TrainedRun, Any]


@dataclass
class RunPredictor:
    """A trained run, or several averaged in HU on the native grid (an ensemble, each member with
    its own VAE and statistics), with ``samples`` samples and flip TTA. Runs trained on some
    regions only predict the cases of those regions (:meth:`routed`): an ensemble of region runs
    routes each case to its region's run(s).

    ``cache``: read each case's inputs from this cache (each member's own producer group);
    otherwise from the case's files (prepared once per canonical grid).
    """

    members: list[Member]
    samples: int = 1
    seed: int = 0
    tta: str = "none"
    tile: Sequence[int] | None = None
    allow_truncation: bool = False
    cache: Any = None
    label: str = "predict"
    _caches: list[Any] = field(default_factory=list, repr=False)

    def _inputs(self, case: Case, index: int, prepared: dict[str, CaseInputs]) -> CaseInputs:
        run, vae = self.members[index]
        keys = list(run.model.input_keys)
        if self.cache is not None:
            from latent.cache import LatentCache

            if not self._caches:
                self._caches = [LatentCache.open(self.cache, member.record["producer_key"])
                                for member, _ in self.members]
            return inputs_from_cache(self._caches[index], case.pid, keys)
        key = f"{run.grid.spec()}|{id(vae)}|{','.join(keys)}"
        if key not in prepared:
            prepared[key] = inputs_from_files(case, run.grid, vae, keys, self.allow_truncation, self.tile)
        return prepared[key]

    def routed(self, case: Case) -> list[int]:
        """Indices of the members that predict ``case``: every member, except that a member trained
        on some regions only (``data.regions``, recorded in its run) predicts only their cases.

        Raises:
            CaseError: no member covers the case's region (naming the case, its region and theirs).
        """
        regions = [run.regions for run, _ in self.members]
        chosen = [index for index, covered in enumerate(regions) if covered is None or case.region in covered]
        if not chosen:
            listed = "; ".join(f"{run.run_dir.name}: {', '.join(run.regions)}" for run, _ in self.members)
            raise CaseError(f"{case.pid}: region {case.region!r} is covered by no run ({listed})")
        return chosen

    def predict(self, case: Case) -> NativePrediction:
        prepared: dict[str, CaseInputs] = {}
        predictions, mappings = [], []
        for index in self.routed(case):
            run, vae = self.members[index]
            inputs = self._inputs(case, index, prepared)
            mappings.append(inputs.mapping)
            predictions.append(predict_inputs(run, vae, inputs, self.samples, self.seed, self.tile, self.tta))
        combined = combine_predictions(predictions)
        return NativePrediction(combined.hu, mappings[0].native, combined.std, combined.seconds,
                                mappings[0].mask_fraction_outside)


@dataclass
class VAEFloorPredictor:
    """decode(cached CT latent) on the native grid: the floor of every latent-to-latent method with
    this VAE (or with an adapted decoder, ``latent vae adapt``)."""

    cache: Any
    vae: Any
    tile: Sequence[int] | None = None
    label: str = "vae floor"

    def predict(self, case: Case) -> NativePrediction:
        from latent.decode.sct import output_to_canonical_hu

        inputs = inputs_from_cache(self.cache, case.pid, ["ct_mu"])
        started = time.perf_counter()
        latent = torch.from_numpy(inputs.arrays["ct_mu"])[None]
        canonical = output_to_canonical_hu(latent, "ct_latent", self.vae, tile=self.tile)[0]
        native = canonical_to_native_sct(canonical, inputs.mapping, inputs.native_mask)
        return NativePrediction(native, inputs.mapping.native, seconds={"decode": time.perf_counter() - started})



