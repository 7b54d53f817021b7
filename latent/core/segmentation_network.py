"""A frozen MONAI segmentation network from a weights folder, and its features.

The folder holds ``config.json`` and ``model.safetensors`` (or ``model.pt``, a plain state dict
read with ``torch.load(weights_only=True)``). ``config.json``::

    {"class_name": "DynUNet",              # a MONAI network: DynUNet, SegResNet, UNet, BasicUNet
     "kwargs": {...},                      # its constructor arguments
     "input_range": [-1024, 3000],         # HU the CT is clipped to (default [-1024, 3000])
     "input_mean": null, "input_std": null,  # optional: z-score of the clipped HU (nnU-Net's CT
                                             # normalisation); without them the range maps onto [0, 1]
     "layers": ["input_block", "downsamples.0"]}  # default feature layers (module names)

Two users: the perception loss of the translation families (``translate/models/perception.py``)
and ``latent register --method feature --feature-network`` (``latent.core.registration.feature``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latent.core.errors import BadConfigError, BadFileError, WeightsError, one_line
from latent.core.network_weights import freeze, load_strict, read_state_dict

#: MONAI segmentation networks a weights folder may name.
SEGMENTATION_CLASSES = ("DynUNet", "SegResNet", "UNet", "BasicUNet")
#: Default HU window of the segmentation network's input.
DEFAULT_INPUT_RANGE = (-1024.0, 3000.0)
CONFIG_NAME = "config.json"
#: Weights file names looked up in the folder, in this order.
WEIGHTS_NAMES = ("model.safetensors", "model.pt")


def register_once(network: nn.Module) -> nn.Module:
    """Unregister DynUNet's ``skip_layers`` tree, whose blocks are also registered by name.

    MONAI registers every block twice (``input_block``, ``downsamples``, ... and again inside the
    recursive ``skip_layers``), so its state dict holds each tensor under two keys, which
    safetensors refuses to save. The tree stays a plain attribute (``forward`` calls it); every
    block it holds is still registered once, so ``.to()``, ``train()`` and the optimizer reach it.
    """
    object.__setattr__(network, "skip_layers", network._modules.pop("skip_layers"))
    return network


@dataclass(frozen=True)
class IntensityMap:
    """HU -> the segmentation network's input: clipped to ``[low, high]``; then ``(hu - mean) / std``
    when both are set, else mapped linearly onto [0, 1]."""

    low: float = DEFAULT_INPUT_RANGE[0]
    high: float = DEFAULT_INPUT_RANGE[1]
    mean: float | None = None
    std: float | None = None

    def from_hu(self, hu: torch.Tensor) -> torch.Tensor:
        """The network input of a CT in HU."""
        hu = hu.float().clamp(self.low, self.high)
        if self.mean is not None and self.std is not None:
            return (hu - self.mean) / self.std
        return (hu - self.low) / (self.high - self.low)

    def from_unit(self, unit: torch.Tensor) -> torch.Tensor:
        """The network input of an image on [0, 1] read as the window ``[low, high]`` (an MR after the
        project's normalisation, for a network that only knows CT)."""
        return self.from_hu(self.low + unit.float() * (self.high - self.low))


@dataclass(frozen=True)
class SegmentationNetwork:
    """A frozen network, the layers whose outputs are its features, its input map, where it came
    from and the SHA-256 of its weights file."""

    network: nn.Module
    layers: tuple[str, ...]
    intensity: IntensityMap
    source: str
    weights_sha256: str


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


def load_segmentation_network(folder: str | Path, layers: Sequence[str] = (), *,
                              layers_field: str = "layers") -> SegmentationNetwork:
    """Load the frozen network of a weights folder (module docstring).

    Args:
        folder: holds ``config.json`` and ``model.safetensors`` or ``model.pt``.
        layers: module names whose outputs are the features; empty: the config's ``layers``.
        layers_field: the user's field that sets ``layers``, named in errors.

    Raises:
        BadFileError: the folder or a file is missing.
        BadConfigError: ``config.json`` is not valid, names an unknown class or layer.
        WeightsError: the weights cannot be read or do not fit the network.
    """
    folder = Path(folder).expanduser()
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise BadFileError(f"{config_path}: missing (a segmentation weights folder holds {CONFIG_NAME} and one of "
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
    state = read_state_dict(weights, what="segmentation weights", error=WeightsError)
    if class_name == "DynUNet":  # a plain DynUNet state dict also holds every tensor under skip_layers.*
        state = {key: value for key, value in state.items() if not key.startswith("skip_layers.")}
    load_strict(network, state, weights)
    chosen = tuple(layers) or tuple(config.get("layers", ()))
    modules = dict(network.named_modules())
    if not chosen:
        raise BadConfigError(f"{config_path}: no feature layers (set {layers_field} or 'layers' here)")
    unknown = [name for name in chosen if name not in modules or not name]
    if unknown:
        known = [name for name in modules if name and "." not in name]
        raise BadConfigError(f"{config_path}: {class_name} has no layer {unknown[0]!r} ({layers_field}); "
                             f"top-level modules: {', '.join(known)}")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    return SegmentationNetwork(freeze(network), chosen, _intensity(config, config_path), str(folder), digest)


def layer_outputs(network: nn.Module, layers: Sequence[str], image: torch.Tensor) -> list[torch.Tensor]:
    """Run ``network`` on ``image`` and return the outputs of the named modules (the first tensor of
    a tuple), in the order of ``layers``; the hooks are removed afterwards."""
    captured: dict[str, torch.Tensor] = {}
    modules = dict(network.named_modules())

    def hook(name: str) -> Any:
        def capture(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured[name] = output[0] if isinstance(output, (tuple, list)) else output
        return capture

    handles = [modules[name].register_forward_hook(hook(name)) for name in layers]
    try:
        network(image)
    finally:
        for handle in handles:
            handle.remove()
    return [captured[name] for name in layers]
