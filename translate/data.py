"""Training and validation data for ``translate/train.py``, read from the latent cache.

Thin glue over :mod:`cache`: open the producer group a run names (or the only one), build
:class:`cache.LatentPairDataset` s of the split's cases with the arrays the model family needs,
and wrap them in loaders whose batches follow the contract in ``translate/models/base.py``:
float32 tensors with a channel axis, ``(B, 4, d, h, w)`` latents, ``(B, 1, D, H, W)`` pixels
and masks. The training order is a permutation seeded by ``(seed, epoch)`` so that a resumed
run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from latent.core.errors import BadConfigError
from latent.translate.models.base import TranslationModel

logger = logging.getLogger(__name__)

LATENT_KEYS = ("mr_mu", "ct_mu")
CHANNEL_KEYS = ("mask_latent", "mr_pixels", "ct_pixels", "mask_pixels")


def model_batch_keys(model_cls: type[TranslationModel], model_config: Any = None) -> tuple[str, ...]:
    """Cache arrays a family trains on: what its config asks for (``keys_for``, e.g. l2sct's
    residual head adds the MR pixels), else its ``batch_keys`` class attribute, else a default.

    Defaults: latent input -> ``mr_mu`` + ``ct_mu`` (latent output) or ``ct_pixels`` +
    ``mask_pixels`` (full-range output); pixel input -> ``mr_pixels``, ``ct_pixels``, ``mask_pixels``.
    """
    keys = model_cls.keys_for(model_config) if model_config is not None else None
    keys = keys or getattr(model_cls, "batch_keys", None)
    if keys:
        return tuple(keys)
    if model_cls.input_key == "mr_pixels":
        return ("mr_pixels", "ct_pixels", "mask_pixels")
    if model_cls.output_space == "ct_full":
        return (model_cls.input_key, "ct_pixels", "mask_pixels")
    return (model_cls.input_key, "ct_mu")


def resolve_producer(cache_path: str | Path, producer: str) -> tuple[str, dict]:
    """``(key, record)`` of the producer to train on; ``"auto"`` picks the store's only one
    (:func:`cache.pick_producer`, the one producer pick)."""
    from latent.cache import pick_producer

    return pick_producer(cache_path, producer, option="data.producer")


def split_ids(cache: Any, data: Any) -> tuple[list[str], list[str] | None]:
    """Training and validation case ids of a ``data`` section (``None``: no validation).

    Without ``data.fold`` these are the ``train_split`` and ``val_split`` of the split file;
    with ``data.fold = "k/K"`` the train + val cases are split into K folds stratified by the
    region and centre recorded in the cache, and fold k validates (:func:`latent.core.cases.fold_of_splits`).
    Every id of the splits used must be a complete case of the cache (:func:`latent.core.cases.check_split_ids`).
    """
    from latent.core.cases import check_split_ids, fold_of_splits, load_splits, read_split

    train = read_split(data.split_file, data.train_split)
    val = None if data.val_split is None else read_split(data.split_file, data.val_split)
    used = [name for name in (data.train_split, data.val_split) if name is not None]
    check_split_ids(data.split_file, load_splits(data.split_file), used, cache.case_ids(), data.cache)
    if data.fold is None:
        return train, val
    pool = train + (val or [])
    labels = {}
    for pid in pool:
        attrs = cache.case_attrs(pid)
        labels[pid] = (str(attrs.get("region") or "?"), str(attrs.get("centre") or "?"))
    try:
        return fold_of_splits(load_splits(data.split_file), pool, labels, data.fold, data.fold_seed)
    except BadConfigError as error:
        raise BadConfigError(f"data.fold: {error}") from None


def build_cache_datasets(data: Any, keys: Sequence[str], val_keys: Sequence[str], seed: int
                         ) -> tuple[Dataset, Dataset | None, dict]:
    """Train / validation datasets of a run's ``data`` section (a ``DataConfig``).

    Returns:
        ``(train_dataset, val_dataset or None, producer)`` where ``producer`` holds the key, the
        record and the latent statistics used to standardise (``producer.json`` of the run).
    """
    from latent.cache import LatentCache, LatentPairDataset

    if data.cache is None or data.split_file is None:
        missing = "data.cache" if data.cache is None else "data.split_file"
        raise BadConfigError(f"{missing}: required (or pass train_dataset to train())")
    key, record = resolve_producer(data.cache, data.producer)
    cache = LatentCache.open(data.cache, key, mode="r")
    train_ids, val_ids = split_ids(cache, data)
    if data.regions is not None:
        train_ids = in_regions(cache, train_ids, data)
        val_ids = None if val_ids is None else in_regions(cache, val_ids, data, required=False) or None
        if val_ids is None and data.val_split is not None:
            logger.warning("data.regions: no %s case is of %s; no validation", data.val_split, ", ".join(data.regions))
    excluded = excluded_slices(cache, data.exclude_slices, train_ids) if data.exclude_slices else {}
    train_dataset = LatentPairDataset(cache, train_ids, keys=tuple(keys), preload=data.preload, crop=data.crop,
                                      seed=seed, body_fraction=data.crop_body_fraction,
                                      exclude_z={pid: record["canonical_z"] for pid, record in excluded.items()})
    val_dataset = None
    if val_ids is not None:
        val_dataset = LatentPairDataset(cache, val_ids, keys=tuple(val_keys), preload=data.preload,
                                        crop=data.val_crop, seed=seed)
        if data.val_limit is not None:
            val_dataset = Subset(val_dataset, range(min(data.val_limit, len(val_dataset))))
    producer = {"producer_key": key, "record": record, "latent_stats": cache.latent_stats(),
                "cache": str(data.cache), "split_file": str(data.split_file),
                "train_split": data.train_split, "val_split": data.val_split}
    if data.regions is not None:
        producer.update(regions=list(data.regions), train_ids=train_ids, val_ids=val_ids)
    if data.fold is not None:
        producer.update(fold=data.fold, fold_seed=data.fold_seed, train_ids=train_ids, val_ids=val_ids)
    # which CT each training case's latents came from (an original root, or one `latent register` wrote)
    producer["ct_sources"] = {pid: (cache.case_attrs(pid).get("source_paths") or {}).get("ct") for pid in train_ids}
    qa_excluded = qa_excluded_cases(data.split_file)
    if qa_excluded or excluded:  # what QA kept out of training, recorded in the run
        producer["qa_exclusions"] = {"cases": qa_excluded, "slices_file": data.exclude_slices,
                                     "slices": {pid: record["native"] for pid, record in excluded.items()}}
    logger.info("data: producer %s, %d train / %d val cases", key, len(train_dataset),
                0 if val_dataset is None else len(val_dataset))
    return train_dataset, val_dataset, producer


def in_regions(cache: Any, pids: Sequence[str], data: Any, required: bool = True) -> list[str]:
    """The cases of ``pids`` whose region (recorded in the cache) is one of ``data.regions``.

    Raises:
        BadConfigError: naming ``data.regions`` when none is left and ``required``.
    """
    kept = [pid for pid in pids if str(cache.case_attrs(pid).get("region")) in data.regions]
    if not kept and pids and required:
        found = sorted({str(cache.case_attrs(pid).get("region")) for pid in pids})
        raise BadConfigError(f"data.regions: none of the {len(pids)} cases is of {', '.join(data.regions)} "
                             f"(their regions: {', '.join(found)})")
    return kept


def excluded_slices(cache: Any, path: str | Path, pids: Sequence[str]) -> dict[str, dict[str, list[int]]]:
    """``{pid: {"native": [...], "canonical_z": [...]}}`` of the training cases that ``slices.csv``
    (``latent qa``) flags: native axial slices mapped onto each case's canonical grid.

    Raises:
        BadFileError: a missing file, or one without the ``pid`` and ``slice`` columns.
    """
    import csv

    from latent.core.errors import BadFileError
    from latent.core.grid import GridMapping, canonical_slices

    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as error:
        raise BadFileError(f"data.exclude_slices: {path}: cannot be read ({error.strerror})") from None
    if rows and not {"pid", "slice"} <= set(rows[0]):
        raise BadFileError(f"data.exclude_slices: {path}: expected the columns pid and slice of latent qa's slices.csv")
    native: dict[str, set[int]] = {}
    for row in rows:
        try:
            native.setdefault(row["pid"], set()).add(int(row["slice"]))
        except ValueError:
            raise BadFileError(f"data.exclude_slices: {path}: slice {row['slice']!r} of {row['pid']} is not an "
                               "integer") from None
    out = {}
    for pid in (pid for pid in pids if pid in native):
        mapping = GridMapping.from_dict(cache.case_attrs(pid)["geometry"])
        out[pid] = {"native": sorted(native[pid]), "canonical_z": sorted(canonical_slices(mapping, native[pid]))}
    return out


def qa_excluded_cases(split_file: str | Path | None) -> list[str]:
    """The cases ``latent split --qa`` kept out of training and validation (``qa_excluded``)."""
    if split_file is None:
        return []
    from latent.core.cases import QA_EXCLUDED, load_splits

    return list(load_splits(split_file).get(QA_EXCLUDED, []))


def fits_each_case(producer: dict[str, Any]) -> bool:
    """True when the producer's canonical grid is the rule ``fit`` (every case its own shape)."""
    grid = (producer.get("record") or {}).get("grid") or {}
    return "shape" in grid and grid["shape"] is None


def model_config_for_grid(model_config: Any, data: Any, model_cls: type[TranslationModel],
                          producer: dict[str, Any]) -> Any:
    """The model config to build: what the family takes from the producer
    (:meth:`TranslationModel.for_producer`, e.g. l2sct's VAE and latent statistics), and on a
    fitted grid, for a latent-input model, sliding windows of its training crop (``window`` =
    ``data.crop`` unless set).

    Raises:
        BadConfigError: a fitted grid without ``data.crop`` where whole cases cannot be batched
            (``batch_size`` > 1) or cannot pass a latent network (their shapes are not multiples of 8).
    """
    model_config = model_cls.for_producer(model_config, producer)
    if not fits_each_case(producer):
        return model_config
    if data.crop is None:
        if model_cls.input_key == "mr_mu" or data.batch_size > 1:
            raise BadConfigError(
                "data.crop: required on a cache whose grid fits each case (every case has its own shape); give "
                "the training crop in latent voxels, e.g. [16, 32, 32] (inference then uses sliding windows of it)")
        return model_config
    if model_cls.input_key != "mr_mu" or model_config.window is not None:
        return model_config
    crop = (data.crop,) * 3 if isinstance(data.crop, int) else tuple(data.crop)
    return model_config.model_copy(update={"window": crop})


class EpochSampler(Sampler[int]):
    """A random permutation that depends only on ``(seed, epoch)`` (call :meth:`set_epoch`)."""

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())


def conform_item(item: dict[str, Any]) -> dict[str, Any]:
    """One dataset item -> the batch contract (float32, channel axis on masks and pixels)."""
    out = {}
    for key, value in item.items():
        if isinstance(value, torch.Tensor) or key in LATENT_KEYS + CHANNEL_KEYS:
            value = torch.as_tensor(value).float()
            if key in CHANNEL_KEYS and value.ndim == 3:
                value = value.unsqueeze(0)
            if key in LATENT_KEYS + CHANNEL_KEYS and value.ndim != 4:
                raise ValueError(f"{key}: item of shape {tuple(value.shape)}, expected (C, d, h, w)")
        out[key] = value
    return out


def collate_train(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack items into a training batch of tensors only (case ids are dropped)."""
    items = [conform_item(item) for item in items]
    return {key: torch.stack([item[key] for item in items]) for key in items[0]
            if isinstance(items[0][key], torch.Tensor)}


def collate_val(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack items into a validation batch; non-tensor entries (``pid``) become lists."""
    items = [conform_item(item) for item in items]
    return {key: torch.stack([item[key] for item in items]) if isinstance(items[0][key], torch.Tensor)
            else [item[key] for item in items] for key in items[0]}


def train_loader(dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0) -> DataLoader:
    """Loader in a ``(seed, epoch)``-seeded order; its sampler is reachable as ``loader.sampler``."""
    return DataLoader(dataset, batch_size=batch_size, sampler=EpochSampler(len(dataset), seed),
                      num_workers=num_workers, collate_fn=collate_train, drop_last=False,
                      persistent_workers=False, generator=torch.Generator().manual_seed(seed))


def val_loader(dataset: Dataset, batch_size: int = 1, num_workers: int = 0) -> DataLoader:
    """Loader of the validation cases in their split order."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate_val)
