"""Periodic validation during training: the :class:`Validator` protocol and a canonical-grid default.

``translate/train.py`` calls a validator every ``train.val_every`` steps on the main process, with
the unwrapped model in eval mode and the validation batches (an iterable of batch dicts on the CPU,
one case per batch by default, ``"pid"`` a list of case ids). The returned metrics are logged and
``metrics["mae"]`` (lower is better) selects ``run_dir/best/``.

The validator on what users are scored on (decode -> native grid -> SynthRAD metrics) needs the
VAE and the decode stage, which come after this one: a recipe asks for it with ``train.validator:
native`` and the application layer passes it in (``train(config, validator=...)``, what
``latent train`` does). This stage loads no code by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Protocol, runtime_checkable

import torch

from latent.core.errors import BadConfigError
from latent.core.intensity import FULL_CT_MAX_HU, FULL_CT_MIN_HU
from latent.translate.models.base import TranslationModel

if TYPE_CHECKING:
    from latent.translate.train_config import TrainConfig

#: [-1, 1] full-range units -> HU differences.
HU_PER_UNIT = (FULL_CT_MAX_HU - FULL_CT_MIN_HU) / 2.0


@runtime_checkable
class Validator(Protocol):
    """``validator(model, val_batches) -> {"mae": float, ...}`` (lower ``mae`` is better)."""

    def __call__(self, model: TranslationModel, val_batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        ...


def predict(model: TranslationModel, inputs: torch.Tensor, num_samples: int = 1, seed: int = 0) -> torch.Tensor:
    """``model.translate`` (mean of ``num_samples`` seeded samples for a stochastic model)."""
    if not model.stochastic:
        return model.translate_volume(inputs)
    samples = []
    for index in range(num_samples):
        generator = torch.Generator(device=inputs.device).manual_seed(seed + index)
        samples.append(model.translate_volume(inputs, generator=generator).float())
    return torch.stack(samples).mean(0)


class CanonicalValidator:
    """Built-in validator on the canonical grid (no VAE, no native files).

    - ``output_space == "ct_full"``: ``mae`` is the HU MAE inside ``mask_pixels``.
    - ``output_space == "ct_latent"``: ``mae`` is the mean absolute error of the standardised CT
      latent (latent units, not HU: a proxy until the decode-based validator is plugged in).

    Args:
        num_samples: samples averaged for stochastic models.
        seed: generator seed of the first sample (the same every validation, so rounds compare).
    """

    def __init__(self, num_samples: int = 1, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.seed = seed

    @staticmethod
    def describe(model: TranslationModel) -> str:
        """What ``mae`` means for ``model`` (recorded beside ``best/``)."""
        if model.output_space == "ct_full":
            return "val/mae: masked MAE in HU on the canonical grid (latent.translate.validation.CanonicalValidator)"
        return ("val/mae: mean absolute error of the standardised CT latent, a latent-space proxy, not HU "
                "(latent.translate.validation.CanonicalValidator)")

    @torch.no_grad()
    def __call__(self, model: TranslationModel, val_batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        device = next(model.parameters()).device
        total, count = 0.0, 0.0
        for batch in val_batches:
            inputs = model.model_input(batch).to(device)
            prediction = predict(model, inputs, self.num_samples, self.seed).float()
            if model.output_space == "ct_full":
                target = batch["ct_pixels"].to(device).float()
                mask = batch["mask_pixels"].to(device).float()
                total += float(((prediction - target).abs() * mask).sum()) * HU_PER_UNIT
                count += float(mask.sum())
            else:
                target = batch["ct_mu"].to(device).float()
                total += float((prediction - target).abs().sum())
                count += target.numel()
        if count == 0:
            raise ValueError("validation saw no voxels (empty validation set or empty masks)")
        return {"mae": total / count}


def describe_validator(validator: Validator, model: TranslationModel) -> str:
    """One line saying which metric a validator's ``mae`` is (its ``describe(model)`` when it has one)."""
    describe = getattr(validator, "describe", None)
    if callable(describe):
        return describe(model)
    return f"val/mae of the validator {getattr(validator, '__qualname__', type(validator).__qualname__)}"


def builtin_validator(config: "TrainConfig") -> Validator:
    """The validator this stage builds itself for ``train.validator``: :class:`CanonicalValidator`.

    Raises:
        BadConfigError: ``native``, which only the application layer can build (it decodes).
    """
    if config.train.validator == "native":
        raise BadConfigError("train.validator: native decodes each validation case to its native grid, which "
                             "needs the VAE and the decode stage: train with `latent train --config ...` (or pass "
                             "train(config, validator=...)), or set train.validator=canonical")
    return CanonicalValidator(num_samples=config.train.val_samples, seed=config.train.seed)
