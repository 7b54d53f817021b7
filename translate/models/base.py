"""The contract every translation model follows, and its save/load format.

A model is an ``nn.Module`` built from a typed (pydantic) config. The training loop in
``translate/train.py`` knows nothing about a model's maths: for each of the model's
``phases`` (``("main",)``, or e.g. ``("discriminator", "generator")`` for GANs) it zeroes that
phase's optimizer, calls ``model(batch, phase=...)`` through the Accelerate-wrapped module,
back-propagates ``losses["loss"]`` and steps. Inference calls
:meth:`TranslationModel.translate_volume`: :meth:`TranslationModel.translate` in one pass, or in
gaussian-blended sliding windows of ``config.window`` (set by training on a fitted grid, where
every case has its own shape; docs/grids.md).

Batches are dicts of float32 tensors from the latent cache (``latent.cache.dataset``):
``mr_mu`` / ``ct_mu`` (B, 4, d, h, w) standardised latents, ``mr_pixels`` (B, 1, D, H, W)
normalised MR, ``ct_pixels`` (B, 1, D, H, W) CT on the full range mapped to [-1, 1],
``mask_pixels`` (B, 1, D, H, W) and ``mask_latent`` (B, 1, d, h, w) in {0, 1}.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from latent.core.errors import BadConfigError, one_line
from latent.core.model_folder import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_state_fits,
    read_model_config,
    read_model_weights,
    resolve_folder,
    write_model_folder,
)

#: The package whose modules are the families: a family is the module ``<family>.py`` of this
#: package that defines a :class:`TranslationModel` subclass whose ``family`` is that name
#: (registering a family means writing its file; it is imported only when used).
FAMILY_PACKAGE = "latent.translate.models"
OutputSpace = Literal["ct_latent", "ct_full"]
#: A rate (learning rate, ...): a finite number above 0; nan, inf, 0 and negatives are refused.
PositiveRate = Annotated[float, Field(gt=0, allow_inf_nan=False)]
#: A size in voxels: a whole number of at least 1.
Size = Annotated[int, Field(ge=1)]
#: A (d, h, w) size in voxels.
Size3 = tuple[Size, Size, Size]


class ModelConfig(BaseModel):
    """Base of every model config: unknown fields are refused with their name."""

    # nan and inf are refused in every float field of every family (named with its dotted path).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    family: str
    lr: PositiveRate = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    #: Sliding window (d, h, w) in input voxels for :meth:`TranslationModel.translate_volume`;
    #: None = one pass over the whole input. Training fills it with ``data.crop`` on fitted grids.
    window: Size3 | None = None
    #: Overlap of neighbouring windows (gaussian blending, MONAI ``SlidingWindowInferer``).
    window_overlap: float = Field(0.25, ge=0.0, lt=1.0)


class TranslationModel(nn.Module):
    """Base class: subclasses set the class variables and implement forward and translate."""

    #: The family name: the name of the module that defines the class (see :data:`FAMILY_PACKAGE`).
    family: ClassVar[str] = ""
    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    #: Batch key the model translates from (``mr_mu`` for latent models, ``mr_pixels`` for pixel ones).
    input_key: ClassVar[str] = "mr_mu"
    #: What :meth:`translate` returns: a standardised CT latent or CT in [-1, 1] (full HU range).
    output_space: ClassVar[OutputSpace] = "ct_latent"
    #: Optimisation phases, each with its own optimizer, run in this order every step.
    phases: ClassVar[tuple[str, ...]] = ("main",)
    #: Whether :meth:`translate` is stochastic (diffusion): then K samples give an uncertainty map.
    stochastic: ClassVar[bool] = False
    #: Canonical axes (``"z"``, ``"y"``, ``"x"``) that flip test-time augmentation may mirror.
    #: The canonical grid has the identity direction in LPS, so ``x`` is left-right, the one
    #: mirror under which anatomy stays plausible; head-feet and front-back are not symmetric.
    flip_axes: ClassVar[tuple[str, ...]] = ("x",)
    #: ``(recipe, config field)``: the demo and the bench train the recipe ``<recipe>_<size>`` first
    #: (a family's, or one stage of a family) and pass its run folder in that field (l2sct's
    #: translator starts from an l2l_regress run, the ControlNet from its prior); None: no start.
    starts_from: ClassVar[tuple[str, str] | None] = None

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    def phase_parameters(self, phase: str) -> list[nn.Parameter]:
        """Parameters optimised in ``phase`` (default: all trainable ones)."""
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def input_keys(self) -> tuple[str, ...]:
        """Batch keys :meth:`model_input` reads at inference (default: ``input_key`` alone)."""
        return (self.input_key,)

    def model_input(self, arrays: dict[str, torch.Tensor]) -> torch.Tensor:
        """The one tensor :meth:`translate` takes, from batch-contract arrays (``input_keys``)."""
        return arrays[self.input_key]

    def mirror_input(self, inputs: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        """``inputs`` mirrored along the tensor ``dims`` (flip TTA); its own inverse."""
        return torch.flip(inputs, dims) if dims else inputs

    @classmethod
    def keys_for(cls, config: ModelConfig) -> tuple[str, ...] | None:
        """Cache arrays a run of ``config`` trains on (None: the class's ``batch_keys``)."""
        return None

    def optimizer_groups(self, phase: str) -> list[dict[str, Any]]:
        """Parameter groups of ``phase``'s optimizer. A group may carry ``lr_scale`` (times the
        scheduled lr) and ``frozen_steps`` (lr 0 before that optimizer step). Default: one group."""
        return [{"params": self.phase_parameters(phase)}]

    @classmethod
    def for_producer(cls, config: ModelConfig, producer: dict[str, Any]) -> ModelConfig:
        """The config to build on a cache's producer (its record and latent statistics, as in a
        run's ``producer.json``); default: unchanged."""
        return config

    def prepare_training(self) -> None:
        """Load what only training needs (e.g. a frozen network of a loss term) before the first
        step, so that its errors come at once; prediction never calls it. Default: nothing."""

    def forward(self, batch: dict[str, torch.Tensor], phase: str = "main") -> dict[str, torch.Tensor]:
        """Losses of one phase; ``"loss"`` is back-propagated, the others are logged."""
        raise NotImplementedError

    @torch.no_grad()
    def translate(self, inputs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Translate a batch of inputs (``batch[input_key]``) into ``output_space``."""
        raise NotImplementedError

    @torch.no_grad()
    def translate_volume(self, inputs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """:meth:`translate` over a whole case: one pass, or sliding windows of ``config.window``.

        Windows are blended with gaussian weights; a case smaller than the window is padded by
        repeating its edge (air at the border of a fitted box). An output on a finer grid (l2sct:
        pixels, 4x the latent) is placed at the matching scale.
        """
        window = self.config.window
        if window is None:
            return self.translate(inputs, generator=generator)
        from monai.inferers import SlidingWindowInferer

        inferer = SlidingWindowInferer(roi_size=tuple(window), sw_batch_size=1, overlap=self.config.window_overlap,
                                       mode="gaussian", padding_mode="replicate")
        return inferer(inputs, lambda patch: self.translate(patch, generator=generator))

    # -- persistence ------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` atomically (the project's one model format)."""
        return write_model_folder(directory, self.config.model_dump(mode="json"), self.state_dict())


def family_class(name: str) -> type[TranslationModel] | None:
    """The family class defined by module ``name`` of :data:`FAMILY_PACKAGE` (None: no family there)."""
    module_name = f"{FAMILY_PACKAGE}.{name}"
    if not name.isidentifier() or importlib.util.find_spec(module_name) is None:
        return None
    module = importlib.import_module(module_name)
    return next((value for value in vars(module).values()
                 if isinstance(value, type) and issubclass(value, TranslationModel)
                 and value.__module__ == module_name and value.__dict__.get("family") == name), None)


def model_families() -> dict[str, type[TranslationModel]]:
    """Every family of :data:`FAMILY_PACKAGE`, by name (imports each module of the package)."""
    package = importlib.import_module(FAMILY_PACKAGE)
    names = sorted(info.name for info in pkgutil.iter_modules(package.__path__))
    return {name: cls for name in names if (cls := family_class(name)) is not None}


def translating_families() -> list[str]:
    """The families that translate an MR into a CT (what ``latent bench`` can train and compare)."""
    return [name for name, cls in model_families().items() if cls.input_key.startswith("mr_")]


def model_class(family: str) -> type[TranslationModel]:
    """The model class of a family name.

    Raises:
        BadConfigError: unknown family (lists the known ones).
    """
    cls = family_class(family) if isinstance(family, str) else None
    if cls is None:
        raise BadConfigError(f"unknown model family {family!r}; known: {', '.join(model_families())}")
    return cls


def build_model(config: dict[str, Any] | ModelConfig) -> TranslationModel:
    """Build a model from a config dict (validated by the family's config class) or object."""
    family = config.family if isinstance(config, ModelConfig) else config.get("family")
    if family is None:
        raise BadConfigError("model config has no 'family' field")
    cls = model_class(family)
    typed = config if isinstance(config, cls.config_class) else cls.config_class.model_validate(
        config.model_dump() if isinstance(config, ModelConfig) else config)
    return cls(typed)


def load_pretrained(directory: str | os.PathLike, map_location: str = "cpu") -> TranslationModel:
    """Load a model saved by :meth:`TranslationModel.save_pretrained` (a folder or ``hf://owner/name``)."""
    directory = resolve_folder(directory)
    try:
        model = build_model(read_model_config(directory))
    except (BadConfigError, ValidationError) as error:  # an unknown family or field: name the file
        raise BadConfigError(f"{directory / CONFIG_NAME}: {one_line(error)}") from None
    state = read_model_weights(directory, map_location)
    check_state_fits(state, model.state_dict(),
                     f"{directory / WEIGHTS_NAME}: does not fit the model of {directory / CONFIG_NAME}")
    model.load_state_dict(state)
    return model.eval()
