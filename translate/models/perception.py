"""Anatomical perception loss: L1 between normalised features of a frozen segmentation network
applied to the CT and to the sCT, inside the body mask.

The weights are a folder holding ``config.json`` and ``model.safetensors`` (or ``model.pt``, a
plain state dict read with ``torch.load(weights_only=True)``). ``config.json``::

    {"class_name": "DynUNet",              # a MONAI network: DynUNet, SegResNet, UNet, BasicUNet
     "kwargs": {...},                      # its constructor arguments
     "input_range": [-1024, 3000],         # HU the CT is clipped to (default [-1024, 3000])
     "input_mean": null, "input_std": null,  # optional: z-score of the clipped HU (nnU-Net's CT
                                             # normalisation); without them the range maps onto [0, 1]
     "layers": ["input_block", "downsamples.0"]}  # default feature layers (module names)

Features are the outputs of the named modules (forward hooks), each normalised per sample and
channel over the patch (instance normalisation without affine) before the L1, which is a mean
over the voxels of the feature grid inside the body mask (nearest-resampled), averaged over layers.
The network is held outside the model's registered modules: it is not saved, not optimised and
never switched to training mode.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, field_validator, model_validator
from torch import nn

from latent.core.errors import BadConfigError, BadFileError, WeightsError, one_line
from latent.core.intensity import FULL_CT_MAX_HU, FULL_CT_MIN_HU
from latent.core.network_weights import freeze, load_strict, read_state_dict
from latent.translate.models.regress3d_parts import masked_mean, register_once

#: MONAI segmentation networks a weights folder may name.
SEGMENTATION_CLASSES = ("DynUNet", "SegResNet", "UNet", "BasicUNet")
#: Default HU window of the segmentation network's input.
DEFAULT_INPUT_RANGE = (-1024.0, 3000.0)
CONFIG_NAME = "config.json"
#: Weights file names looked up in the folder, in this order.
WEIGHTS_NAMES = ("model.safetensors", "model.pt")
#: Variance floor of the feature normalisation.
EPS = 1e-5


@dataclass(frozen=True)
class IntensityMap:
    """CT on [-1, 1] (the full range, [-1024, 3071] HU) -> the segmentation network's input.

    HU clipped to ``[low, high]``; then ``(hu - mean) / std`` when both are set, else mapped
    linearly onto [0, 1].
    """

    low: float = DEFAULT_INPUT_RANGE[0]
    high: float = DEFAULT_INPUT_RANGE[1]
    mean: float | None = None
    std: float | None = None

    def __call__(self, ct_unit: torch.Tensor) -> torch.Tensor:
        hu = FULL_CT_MIN_HU + (ct_unit.float() + 1.0) / 2.0 * (FULL_CT_MAX_HU - FULL_CT_MIN_HU)
        hu = hu.clamp(self.low, self.high)
        if self.mean is not None and self.std is not None:
            return (hu - self.mean) / self.std
        return (hu - self.low) / (self.high - self.low)


def instance_normalise(features: torch.Tensor) -> torch.Tensor:
    """Per sample and channel: zero mean, unit variance over the spatial axes (no affine)."""
    dims = tuple(range(2, features.ndim))
    mean = features.mean(dim=dims, keepdim=True)
    var = features.var(dim=dims, keepdim=True, unbiased=False)
    return (features - mean) / torch.sqrt(var + EPS)


class PerceptionNetwork(nn.Module):
    """A frozen segmentation network whose named layers give the features of the loss."""

    def __init__(self, network: nn.Module, layers: Sequence[str], intensity: IntensityMap, source: str) -> None:
        super().__init__()
        self.network = freeze(network)
        self.layers, self.intensity, self.source = tuple(layers), intensity, source
        self._captured: dict[str, torch.Tensor] = {}
        modules = dict(network.named_modules())
        for name in self.layers:
            modules[name].register_forward_hook(self._hook(name))

    def _hook(self, name: str) -> Any:
        """A forward hook keeping the output of layer ``name`` (the first tensor of a tuple)."""
        def capture(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self._captured[name] = output[0] if isinstance(output, (tuple, list)) else output
        return capture

    def train(self, mode: bool = True) -> "PerceptionNetwork":
        """Stays in eval mode (its normalisation layers keep their running statistics)."""
        return super().train(False)

    def features(self, ct_unit: torch.Tensor) -> list[torch.Tensor]:
        """Normalised features of the named layers for CT ``(N, 1, D, H, W)`` on [-1, 1]."""
        self._captured.clear()
        self.network(self.intensity(ct_unit))
        found = [self._captured.pop(name) for name in self.layers]
        return [instance_normalise(feature.float()) for feature in found]

    def loss(self, sct: torch.Tensor, ct: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over layers of the masked L1 between normalised features of ``sct`` and ``ct``."""
        with torch.no_grad():
            targets = self.features(ct)
        terms = []
        for output, target in zip(self.features(sct), targets):
            weight = F.interpolate(mask.float(), size=tuple(output.shape[2:]), mode="nearest")
            terms.append(masked_mean((output - target).abs(), weight.expand_as(output)))
        return torch.stack(terms).mean()


def build_segmentation_network(class_name: str, kwargs: Mapping[str, Any], where: Path) -> nn.Module:
    """A MONAI network of :data:`SEGMENTATION_CLASSES` from its constructor arguments."""
    import monai.networks.nets as nets

    if class_name not in SEGMENTATION_CLASSES:
        raise BadConfigError(f"{where}: class_name {class_name!r} is not one of {', '.join(SEGMENTATION_CLASSES)}")
    try:
        network = getattr(nets, class_name)(**kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise BadConfigError(f"{where}: cannot build {class_name} from kwargs: {one_line(exc)}") from None
    return register_once(network) if class_name == "DynUNet" else network


def _intensity(config: Mapping[str, Any], where: Path) -> IntensityMap:
    """The HU -> input mapping of a weights folder's ``config.json`` (``where``)."""
    bounds = config.get("input_range", DEFAULT_INPUT_RANGE)
    mean, std = config.get("input_mean"), config.get("input_std")
    try:
        low, high = (float(bound) for bound in bounds)
    except (TypeError, ValueError):
        low, high = 0.0, 0.0
    if not low < high:
        raise BadConfigError(f"{where}: input_range must be [low, high] HU with low < high, got {bounds!r}")
    if (mean is None) != (std is None) or (std is not None and float(std) <= 0):
        raise BadConfigError(f"{where}: input_mean and input_std go together, std > 0 (got {mean}, {std})")
    return IntensityMap(low, high, None if mean is None else float(mean),
                        None if std is None else float(std))


def load_perception_network(folder: str | Path, layers: Sequence[str] = ()) -> PerceptionNetwork:
    """Load the frozen segmentation network of a weights folder (module docstring).

    Args:
        folder: holds ``config.json`` and ``model.safetensors`` or ``model.pt``.
        layers: module names whose outputs are the features; empty: the config's ``layers``.

    Raises:
        BadFileError: the folder or a file is missing.
        BadConfigError: ``config.json`` is not valid, names an unknown class or layer.
        WeightsError: the weights cannot be read or do not fit the network.
    """
    folder = Path(folder).expanduser()
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise BadFileError(f"{config_path}: missing (a perception weights folder holds {CONFIG_NAME} and one of "
                           f"{', '.join(WEIGHTS_NAMES)})")
    weights = next((folder / name for name in WEIGHTS_NAMES if (folder / name).is_file()), None)
    if weights is None:
        raise BadFileError(f"{folder / WEIGHTS_NAMES[0]}: missing (or {WEIGHTS_NAMES[1]}) beside {CONFIG_NAME}")
    try:
        config = json.loads(config_path.read_text())
        class_name, kwargs = config["class_name"], dict(config["kwargs"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise BadConfigError(f"{config_path}: not a network config ({{'class_name', 'kwargs'}} expected): "
                             f"{one_line(exc)}") from None
    network = build_segmentation_network(class_name, kwargs, config_path)
    state = read_state_dict(weights, what="perception weights", error=WeightsError)
    if class_name == "DynUNet":  # a plain DynUNet state dict also holds every tensor under skip_layers.*
        state = {key: value for key, value in state.items() if not key.startswith("skip_layers.")}
    load_strict(network, state, weights)
    chosen = tuple(layers) or tuple(config.get("layers", ()))
    modules = dict(network.named_modules())
    if not chosen:
        raise BadConfigError(f"{config_path}: no feature layers (set model.perception_layers or 'layers' here)")
    unknown = [name for name in chosen if name not in modules or not name]
    if unknown:
        known = [name for name in modules if name and "." not in name]
        raise BadConfigError(f"{config_path}: {class_name} has no layer {unknown[0]!r} (perception_layers); "
                             f"top-level modules: {', '.join(known)}")
    return PerceptionNetwork(network, chosen, _intensity(config, config_path), str(folder))


class PerceptionSettings(BaseModel):
    """The perception-loss fields of a model config (a mixin of the families that offer the loss).

    Attributes:
        perception_weights: folder of a frozen segmentation network (module docstring); ``None``: off.
        perception_weight: weight of the perception loss (0: off).
        perception_layers: module names of the segmentation network whose features are compared;
            empty: the ``layers`` of the weights folder's ``config.json``.
        perception: derived, ``"on"`` with weights and a positive weight, else ``"off"``; recorded
            in the resolved config (a recipe may leave it out).
    """

    perception_weights: str | None = None
    perception_weight: float = 0.1
    perception_layers: tuple[str, ...] = ()
    perception: Literal["off", "on"] = "off"

    @field_validator("perception", mode="before")
    @classmethod
    def _yaml_switch(cls, value: object) -> object:
        """YAML reads an unquoted ``off`` / ``on`` as a boolean."""
        return {False: "off", True: "on"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _derive_perception(self) -> "PerceptionSettings":
        if self.perception_weight < 0:
            raise ValueError(f"perception_weight: must be >= 0, got {self.perception_weight}")
        derived = "on" if self.perception_weights and self.perception_weight > 0 else "off"
        if "perception" in self.model_fields_set and self.perception != derived:
            raise ValueError(f"perception: derived from perception_weights and perception_weight ({derived!r} "
                             f"here), got {self.perception!r}; leave it out")
        self.perception = derived
        return self


def network_spatial_dims(network: nn.Module) -> int:
    """2 or 3: the spatial dimensions of the first convolution of ``network``."""
    first = next((m for m in network.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))), None)
    return 2 if isinstance(first, nn.Conv2d) else 3


class PerceptionTerm:
    """The perception loss of a model with :class:`PerceptionSettings`, loaded once for training only.

    A plain object (not a module): the frozen network is not in the model's ``state_dict`` (the
    saved model), not in ``parameters()`` (the optimiser) and not switched by ``train()``.
    """

    def __init__(self, settings: PerceptionSettings, family: str, spatial_dims: int) -> None:
        self.settings, self.family, self.spatial_dims = settings, family, spatial_dims
        self._network: PerceptionNetwork | None = None
        logger = logging.getLogger(f"latent.translate.models.{family}")  # the family module's logger
        if settings.perception == "on":
            logger.info("%s: perception loss on (weight %g, weights %s, loaded for training only)", family,
                        settings.perception_weight, settings.perception_weights)
        else:
            logger.info("%s: perception loss off (no perception_weights)", family)

    def network(self) -> PerceptionNetwork | None:
        """The frozen segmentation network (loaded on the first call), or ``None`` when off.

        Raises:
            BadConfigError: also when the network's spatial dimensions differ from the model's outputs.
        """
        if self.settings.perception == "on" and self._network is None:
            network = load_perception_network(self.settings.perception_weights, self.settings.perception_layers)
            dims = network_spatial_dims(network.network)
            if dims != self.spatial_dims:
                raise BadConfigError(
                    f"model.perception_weights: {network.source} holds a {dims}D network; {self.family} compares "
                    f"{self.spatial_dims}D outputs (spatial_dims: {self.spatial_dims} in its config.json kwargs)")
            self._network = network
        return self._network

    def __call__(self, sct: torch.Tensor, ct: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """The unweighted loss on the batch's device, or ``None`` when off."""
        network = self.network()
        if network is None:
            return None
        network.to(sct.device)
        return network.loss(sct, ct, mask)
