"""Anatomical perception loss: L1 between normalised features of a frozen segmentation network
applied to the CT and to the sCT, inside the body mask.

The weights are a folder read by :mod:`latent.core.segmentation_network` (``config.json`` with the
MONAI class, its arguments, the HU window and the default ``layers``, and ``model.safetensors`` or
``model.pt``). Features are the outputs of the named modules, each normalised per sample and
channel over the patch (instance normalisation without affine) before the L1, which is a mean
over the voxels of the feature grid inside the body mask (nearest-resampled), averaged over layers.
The network is held outside the model's registered modules: it is not saved, not optimised and
never switched to training mode.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, field_validator, model_validator
from torch import nn

from latent.core.errors import BadConfigError
from latent.core.intensity import FULL_CT_MAX_HU, FULL_CT_MIN_HU
from latent.core.segmentation_network import IntensityMap, layer_outputs, load_segmentation_network
from latent.translate.models.regress3d_parts import masked_mean

#: Variance floor of the feature normalisation.
EPS = 1e-5


def instance_normalise(features: torch.Tensor) -> torch.Tensor:
    """Per sample and channel: zero mean, unit variance over the spatial axes (no affine)."""
    dims = tuple(range(2, features.ndim))
    mean = features.mean(dim=dims, keepdim=True)
    var = features.var(dim=dims, keepdim=True, unbiased=False)
    return (features - mean) / torch.sqrt(var + EPS)


def unit_to_hu(ct_unit: torch.Tensor) -> torch.Tensor:
    """CT on [-1, 1] (the full range, [-1024, 3071] HU) -> HU."""
    return FULL_CT_MIN_HU + (ct_unit.float() + 1.0) / 2.0 * (FULL_CT_MAX_HU - FULL_CT_MIN_HU)


class PerceptionNetwork(nn.Module):
    """A frozen segmentation network whose named layers give the features of the loss."""

    def __init__(self, network: nn.Module, layers: Sequence[str], intensity: IntensityMap, source: str) -> None:
        super().__init__()
        self.network = network
        self.layers, self.intensity, self.source = tuple(layers), intensity, source

    def train(self, mode: bool = True) -> "PerceptionNetwork":
        """Stays in eval mode (its normalisation layers keep their running statistics)."""
        return super().train(False)

    def features(self, ct_unit: torch.Tensor) -> list[torch.Tensor]:
        """Normalised features of the named layers for CT ``(N, 1, D, H, W)`` on [-1, 1]."""
        found = layer_outputs(self.network, self.layers, self.intensity.from_hu(unit_to_hu(ct_unit)))
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


def load_perception_network(folder: str | Path, layers: Sequence[str] = ()) -> PerceptionNetwork:
    """Load the frozen segmentation network of a weights folder
    (:func:`latent.core.segmentation_network.load_segmentation_network`, its errors)."""
    loaded = load_segmentation_network(folder, layers, layers_field="model.perception_layers")
    return PerceptionNetwork(loaded.network, loaded.layers, loaded.intensity, loaded.source)


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
