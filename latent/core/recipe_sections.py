"""The sections every training recipe shares, whatever its model: ``data`` (where the training
data come from), ``train`` (budget, schedule, precision, checkpoints, validation, resume). A
recipe is these two, a ``model`` section validated by its family's config class (the VAE's is
:class:`latent.core.vae.fit_config.VAEModelConfig`) and ``run_dir``; the translation stage's
``TrainConfig`` puts them together. Unknown fields are refused with their dotted name."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from latent.core.accelerator import MixedPrecision
from latent.core.cases import REGION_CODES, parse_fold


class Section(BaseModel):
    # nan and inf are refused in every float field (named with its dotted path).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class DataConfig(Section):
    """Where the training data come from: the latent cache (translation models), or the data set's
    volumes (the VAE, which makes the latents)."""

    #: Latent cache store (zarr directory).
    cache: str | None = None
    #: Data set root (SynthRAD layout): the VAE trains on its volumes (translation models read ``cache``).
    root: str | None = None
    #: Canonical grid the VAE trains at (use the same one to encode): a preset, SXxSYxSZ:DxHxW, or auto.
    grid: str = "auto"
    #: Producer key inside the store, or "auto" for the store's only producer.
    producer: str = "auto"
    #: JSON ``{"train": [...], "val": [...], ...}`` of case ids.
    split_file: str | None = None
    train_split: str = "train"
    #: None: no validation data.
    val_split: str | None = "val"
    batch_size: int = Field(1, ge=1)
    val_batch_size: int = Field(1, ge=1)
    #: Random training crop in latent voxels (int or (d, h, w)); None = whole volumes.
    crop: int | tuple[int, int, int] | None = None
    #: Share of training crops centred on a body voxel (nnU-Net oversamples foreground a third of
    #: the time); the rest are uniform over the case.
    crop_body_fraction: float = Field(0.0, ge=0.0, le=1.0)
    #: Validation crop (None: whole volumes, what inference sees).
    val_crop: int | tuple[int, int, int] | None = None
    preload: bool = False
    #: Cache arrays added to the validation batches (e.g. ct_pixels for a decode-based validator).
    extra_val_keys: tuple[str, ...] = ()
    #: Validate on the first N validation cases only.
    val_limit: int | None = Field(None, ge=1)
    #: "k/K": split the train + val cases of ``split_file`` into K folds stratified by region and
    #: centre, train on the other K - 1 and validate on fold k (the test split is never used).
    fold: str | None = None
    #: Seed of the fold assignment (keep it fixed across the K runs of one cross-validation).
    fold_seed: int = 0
    #: ``slices.csv`` of ``latent qa`` (columns pid, slice, reason; native axial slice indices):
    #: training crops and body-slice samplers keep clear of these slices; validation and test
    #: always see whole volumes. Recorded in the run's ``producer.json``.
    exclude_slices: str | None = None
    #: Train and validate only on the cases of these regions (e.g. [AB, TH] for a region fine-tune
    #: after a run on every region, see ``init_from``); None: every region. Recorded in the run's
    #: ``producer.json`` (``regions``): an ensemble of region runs routes each case to its region's.
    regions: tuple[str, ...] | None = None

    @field_validator("crop", "val_crop", mode="before")
    @classmethod
    def _crop(cls, value: Any) -> Any:
        sizes = value if isinstance(value, (list, tuple)) else [value]
        if value is not None and any(isinstance(v, (int, float)) and not isinstance(v, bool) and v < 1 for v in sizes):
            shown = list(value) if isinstance(value, (list, tuple)) else value
            raise ValueError(f"every size must be at least 1 voxel, got {shown}")
        return value

    @field_validator("regions")
    @classmethod
    def _regions(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return value
        unknown = [region for region in value if region not in REGION_CODES]
        if unknown or not value:
            raise ValueError(f"unknown region {unknown[0]!r}; known: {', '.join(REGION_CODES)}" if unknown
                             else "give at least one region, or leave the field out for every region")
        return tuple(dict.fromkeys(value))

    @field_validator("fold", mode="before")
    @classmethod
    def _fold(cls, value: Any) -> Any:
        if value is not None:
            parse_fold(value)
        return value


#: Names of ``train.validator`` in recipes and runs of earlier versions.
VALIDATOR_ALIASES = {"default": "canonical", "latent.app.validation:native_validator": "native"}


class TrainSection(Section):
    """Budget, schedule, precision, checkpoints."""

    seed: int = 0
    max_steps: int = Field(1000, ge=1)
    #: Wall-clock budget of this invocation's loop (seconds; a resumed run gets a new one); None = steps only.
    max_seconds: float | None = Field(None, gt=0)
    lr_schedule: Literal["none", "cosine"] = "none"
    warmup_steps: int = Field(0, ge=0)
    #: Cosine floor as a fraction of the model's lr.
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    #: EMA of the weights (decay per optimiser step, ramped up over the first steps); when set,
    #: validation scores the EMA and ``best/`` / ``final/`` hold it. None = off.
    ema_decay: float | None = Field(None, gt=0, lt=1)
    optimizer: Literal["adamw", "adam"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    #: Gradient-norm clip per phase; None = off.
    grad_clip: float | None = Field(1.0, gt=0)
    #: "auto": bf16 where the hardware runs it fast (CUDA with bf16; CPU with AVX512-BF16 or AMX), else "no".
    mixed_precision: MixedPrecision = "no"
    grad_accum: int = Field(1, ge=1)
    num_workers: int = Field(0, ge=0)
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    #: Also a checkpoint once this many seconds have passed since the last one (a run under a
    #: wall-clock limit loses at most this much); None = by steps only.
    checkpoint_seconds: float | None = Field(None, gt=0)
    #: Checkpoints kept (oldest removed first).
    keep_checkpoints: int = Field(2, ge=1)
    #: Validation period in steps; None = only at the end.
    val_every: int | None = Field(500, ge=1)
    #: Samples averaged per case by the default validator for stochastic models.
    val_samples: int = Field(1, ge=1)
    #: "canonical": the stage's own validator (MAE on the canonical grid, latent units for latent
    #: outputs); "native": masked MAE in HU on each case's native grid, after decoding, which the
    #: application layer passes in (``latent train``). Earlier spellings load as these two.
    validator: Literal["canonical", "native"] = "canonical"
    #: False: fresh run; True: continue from the latest checkpoint in run_dir (fresh if none);
    #: a path: continue from that checkpoint folder.
    resume: bool | str = False
    tensorboard: bool = True

    @field_validator("validator", mode="before")
    @classmethod
    def _earlier_validator_names(cls, value: Any) -> Any:
        return VALIDATOR_ALIASES.get(value, value) if isinstance(value, str) else value


