"""CT onto MR by a semantic (IMPACT-style) metric: local correlation of frozen network features.

Both images go through the first level of a frozen VAE encoder (the blocks before its first
downsampling: full resolution, local, trained on MR and CT alike), each after the project's own
normalisation for its modality; or through named layers of a frozen MONAI segmentation network
from a weights folder (``FeatureSettings.network``), upsampled to the image grid. The CT's feature maps are computed once and warped (IMPACT's
"static" mode) through a smooth displacement: a coarse grid of control points (every
``grid_spacing_mm``) upsampled trilinearly to a dense field, fitted with Adam, coarse to fine,
against 1 - the squared local correlation of the features in the dilated mask plus a
squared-gradient penalty on the grid. No itk here; elastix's rigid result may be the start.
"""

from __future__ import annotations

import json
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiffusionLoss, LocalNormalizedCrossCorrelationLoss
from monai.networks.blocks import Warp
from torch import nn

from latent.core.intensity import VAE_CT_MIN_HU, ct_to_vae, fit_mr_scaling, mr_to_unit
from latent.core.registration.elastix import dilate_mask, warp
from latent.core.registration.settings import FeatureSettings
from latent.core.registration.truth import compose_fields
from latent.core.segmentation_network import SegmentationNetwork, layer_outputs, load_segmentation_network
from latent.core.vae.loading import LAYOUT_MAISI, LoadedVAE, VAEError, load_vae


def feature_extractor(loaded: LoadedVAE) -> nn.Module:
    """The encoder's blocks before its first downsampling (frozen): the features at full resolution.

    Raises:
        VAEError: the network has no ``encoder.blocks`` or starts by downsampling.
    """
    blocks = getattr(getattr(loaded.network, "encoder", None), "blocks", None)
    if blocks is None:
        raise VAEError(f"--feature-vae {loaded.name}: a {loaded.class_name} has no encoder.blocks to take features from")
    level = []
    for block in blocks:
        if "Downsample" in type(block).__name__:
            break
        level.append(block)
    if not level:
        raise VAEError(f"--feature-vae {loaded.name}: its encoder downsamples in its first block; no full-resolution level")
    return nn.Sequential(*level).eval().requires_grad_(False)


def feature_maps(extractor: nn.Module, volume: np.ndarray, layout: str) -> torch.Tensor:
    """Features (1, C, z, y, x) of a normalised (z, y, x) volume; a MAISI-layout VAE sees (x, y, z)."""
    image = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    device = next(extractor.parameters()).device
    with torch.no_grad():
        if layout == LAYOUT_MAISI:
            return extractor(image.permute(0, 1, 4, 3, 2).to(device)).permute(0, 1, 4, 3, 2).cpu()
        return extractor(image.to(device)).cpu()


#: Each axis is edge-padded to a multiple of this before a segmentation network sees it (its
#: downsamplings and skip connections need divisible sizes; 2^5 covers five halvings).
NETWORK_MULTIPLE = 32


def network_feature_maps(loaded: SegmentationNetwork, image: torch.Tensor) -> torch.Tensor:
    """Features (1, C, z, y, x) of a network input (z, y, x): the outputs of ``loaded.layers``, each
    cropped to the image's share of the padded volume and trilinearly resized to the image grid,
    concatenated over channels."""
    shape = tuple(int(n) for n in image.shape)
    padding = [(-n) % NETWORK_MULTIPLE for n in shape]
    padded = F.pad(image[None, None], [p for pad in reversed(padding) for p in (0, pad)], mode="replicate")
    with torch.no_grad():
        outputs = layer_outputs(loaded.network, loaded.layers, padded)
    maps = []
    for output in outputs:
        kept = [max(1, round(m * n / (n + p))) for m, n, p in zip(output.shape[2:], shape, padding)]
        cropped = output[:, :, :kept[0], :kept[1], :kept[2]].float()
        maps.append(F.interpolate(cropped, size=shape, mode="trilinear", align_corners=False))
    return torch.cat(maps, dim=1)


def control_grid(shape: Sequence[int], spacing_zyx: Sequence[float], grid_spacing_mm: float) -> tuple[int, ...]:
    """Control points per axis: one every ``grid_spacing_mm`` or closer, corners included, at least 3."""
    return tuple(max(3, math.ceil((n - 1) * s / grid_spacing_mm) + 1) for n, s in zip(shape, spacing_zyx))


def _level(tensor: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    return tensor if tuple(tensor.shape[2:]) == size else F.adaptive_avg_pool3d(tensor, size)


def optimise_displacement(fixed: torch.Tensor, moving: torch.Tensor, mask: np.ndarray, spacing_zyx: Sequence[float],
                          settings: FeatureSettings) -> np.ndarray:
    """The smooth field that best aligns the ``moving`` feature maps to the ``fixed`` ones in ``mask``.

    Args:
        fixed, moving: (1, C, z, y, x) feature maps on one grid.
        mask: (z, y, x) voxels where the similarity counts.
        spacing_zyx: voxel spacing in mm.

    Returns:
        The displacement (3, z, y, x) in mm, components (z, y, x): ``moving`` warped onto ``fixed``
        reads voxel ``p`` at ``p + field[:, p] / spacing`` (the convention of ``register_arrays``).
    """
    shape = tuple(int(n) for n in fixed.shape[2:])
    coarse = torch.zeros((1, 3, *control_grid(shape, spacing_zyx, settings.grid_spacing_mm)), requires_grad=True)
    fitted = torch.tensor([0.0 if settings.in_plane_only else 1.0, 1.0, 1.0]).view(1, 3, 1, 1, 1)
    optimiser = torch.optim.Adam([coarse], lr=settings.lr_mm)
    warper = Warp(mode="bilinear", padding_mode="border")
    similarity = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=settings.window, reduction="none")
    penalty = DiffusionLoss()
    inside = torch.from_numpy(np.asarray(mask > 0, dtype=np.float32))[None, None]
    finest = [max(1, round(settings.feature_spacing_mm / float(s))) for s in spacing_zyx]
    for level in range(settings.levels):
        size = tuple(max(1, math.ceil(n / (f * 2 ** (settings.levels - 1 - level)))) for n, f in zip(shape, finest))
        target, source = _level(fixed, size), _level(moving, size)
        weight = (_level(inside, size) > 0.5).float()[0, 0]
        weight = weight / weight.sum().clamp(min=1.0)
        voxel_mm = torch.tensor([s * (n - 1) / max(m - 1, 1) for s, n, m in zip(spacing_zyx, shape, size)],
                                dtype=torch.float32).view(1, 3, 1, 1, 1)
        for _ in range(settings.steps):
            optimiser.zero_grad()
            grid = coarse * fitted
            dense = F.interpolate(grid, size=size, mode="trilinear", align_corners=True)
            squared_correlation = -similarity(warper(source, dense / voxel_mm), target).mean(dim=1)[0]
            loss = (1.0 - (squared_correlation * weight).sum()
                    + settings.smoothness * penalty(grid / settings.grid_spacing_mm)
                    + settings.anchor * (grid / settings.grid_spacing_mm).square().mean())
            loss.backward()
            optimiser.step()
    with torch.no_grad():
        dense = F.interpolate(coarse * fitted, size=shape, mode="trilinear", align_corners=True)
    return np.ascontiguousarray(dense[0].numpy(), dtype=np.float32)


def feature_identity(settings: FeatureSettings) -> dict[str, str]:
    """What a feature registration depends on beyond the images: its settings and the VAE's weights.

    Raises:
        VAEError: the VAE does not load, or has no full-resolution encoder level.
        BadFileError, BadConfigError, WeightsError: the segmentation network's folder does not load.
    """
    record = {"feature:settings": json.dumps(settings.model_dump(), sort_keys=True)}
    if settings.network:
        return record | {"feature:network": _network(settings).weights_sha256}
    loaded = load_vae(settings.vae)
    feature_extractor(loaded)
    return record | {"feature:vae": loaded.weights_sha256}


def _network(settings: FeatureSettings) -> SegmentationNetwork:
    return load_segmentation_network(settings.network, settings.network_layers, layers_field="--feature-layers")


def register_feature(mr: np.ndarray, ct: np.ndarray, mask: np.ndarray, spacing_zyx: Sequence[float],
                     settings: FeatureSettings, initial: np.ndarray | None = None) -> np.ndarray:
    """Register ``ct`` (moving, HU) onto ``mr`` (fixed) by the frozen-feature metric.

    Args:
        mr, ct, mask: (z, y, x) arrays on one grid.
        spacing_zyx: voxel spacing in mm.
        initial: a field to start from (e.g. elastix's rigid result, same convention), or None.

    Returns:
        The displacement field (3, z, y, x) in mm, components (z, y, x), the start composed with
        the fitted smooth part: the CT value that lands on voxel ``p`` is read at ``p + field / spacing``.
    """
    start = ct if initial is None else warp(ct, initial, spacing_zyx, VAE_CT_MIN_HU)
    mr_unit = mr_to_unit(mr, fit_mr_scaling(mr, mask))
    if settings.network:  # the MR read as the network's CT window: the squared correlation ignores sign and gain
        network = _network(settings)
        fixed = network_feature_maps(network, network.intensity.from_unit(torch.from_numpy(np.ascontiguousarray(mr_unit, np.float32))))
        moving = network_feature_maps(network, network.intensity.from_hu(torch.from_numpy(np.ascontiguousarray(start, np.float32))))
    else:
        loaded = load_vae(settings.vae)
        extractor = feature_extractor(loaded)
        fixed = feature_maps(extractor, mr_unit, loaded.layout)
        moving = feature_maps(extractor, ct_to_vae(start), loaded.layout)
    smooth = optimise_displacement(fixed, moving, dilate_mask(mask, spacing_zyx), spacing_zyx, settings)
    return smooth if initial is None else compose_fields(smooth, initial, spacing_zyx)
