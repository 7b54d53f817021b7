"""Deterministic VAE encode (posterior mean) and decode, whole-volume or tiled.

Both functions take and return tensors in the canonical layout, (B, C, z, y, x) in ITK's LPS
world. A VAE whose weights expect another layout (MAISI: (x, y, z) arrays oriented RAS) is
converted to it and back here, at the VAE boundary, so callers never see it.

Tiling uses MONAI's ``SlidingWindowInferer`` with gaussian blending. The encoder's output is
``factor`` (4) times smaller than its input and the decoder's ``factor`` times larger; MONAI
scales the window placement by the output/input size ratio, so window starts must be multiples
of ``factor`` for the latent windows to land on whole latent voxels: :func:`window_overlap`
rounds the requested overlap to make them so (one fixed, deterministic tiling per shape).

Large volumes: PyTorch sends a convolution to cuDNN only while its input and output hold at most
INT_MAX elements per sample; beyond that it runs a slow 64-bit path (``latent.core.vae.tiling``:
:func:`largest_activation` measures the largest convolution tensor for a shape on the meta
device, no compute). With no tile given, :func:`encode_mu` and :func:`decode` tile automatically with the plan of
:func:`plan_tiles`: of the windows under the limit, the tiling that processes the fewest voxels,
neighbours sharing about :data:`TILE_MARGIN` voxels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from monai.inferers import SlidingWindowInferer
from torch import nn

from latent.core.errors import BadConfigError
from latent.core.vae.loading import LAYOUT_CANONICAL, LAYOUT_MAISI, LoadedVAE
from latent.core.vae.tiling import (  # noqa: F401 - re-exported: the tiling API lives beside encode/decode
    ACTIVATION_HEADROOM, INT32_ELEMENTS, TILE_MARGIN, Part, TilePlan, _unpack, _window_in_layout, conv_activations,
    largest_activation, plan_tiles, safe_tile,
)

#: Gaussian blending sigma as a fraction of the window (MONAI's default): window borders,
#: where zero padding distorts the encoder, get little weight.
SIGMA_SCALE = 0.125


def to_network_layout(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """Canonical (B, C, z, y, x) LPS -> the layout the weights expect (exact: permute + flips)."""
    if layout == LAYOUT_CANONICAL:
        return tensor
    if layout == LAYOUT_MAISI:
        # (z, y, x) -> (x, y, z); LPS -> RAS flips the x (L->R) and y (P->A) index directions.
        return tensor.permute(0, 1, 4, 3, 2).flip(2, 3).contiguous()
    raise ValueError(f"unknown layout {layout!r}")


def from_network_layout(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """Inverse of :func:`to_network_layout`."""
    if layout == LAYOUT_CANONICAL:
        return tensor
    if layout == LAYOUT_MAISI:
        return tensor.flip(2, 3).permute(0, 1, 4, 3, 2).contiguous()
    raise ValueError(f"unknown layout {layout!r}")


def window_overlap(window: Sequence[int], overlap: float, step_multiple: int) -> tuple[float, ...]:
    """Per-axis overlap, at most ``overlap``, whose window step is a multiple of ``step_multiple``.

    MONAI steps by ``int(window * (1 - overlap))``; the returned overlap makes that exactly
    ``floor(window * (1 - overlap) / step_multiple) * step_multiple`` (at least ``step_multiple``),
    with half a voxel of slack against float rounding.
    """
    if not 0 <= overlap < 1:
        raise BadConfigError(f"overlap must be in [0, 1), got {overlap}")
    result = []
    for size in window:
        step = max(step_multiple, int(size * (1 - overlap)) // step_multiple * step_multiple)
        step = min(step, size)
        result.append(max(0.0, 1.0 - (step + 0.5) / size))
    return tuple(result)


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _check_tile(tile: Sequence[int], factor: int) -> tuple[int, int, int]:
    tile = tuple(int(t) for t in tile)
    if len(tile) != 3 or any(t <= 0 or t % factor for t in tile):
        raise BadConfigError(f"tile {tile} must be three positive multiples of {factor} (z, y, x)")
    return tile  # type: ignore[return-value]


def _run(
    network_fn: Any,
    inputs: torch.Tensor,
    window: tuple[int, ...] | None,
    overlap: float | tuple[float, ...],
    step_multiple: int,
    progress: bool,
) -> torch.Tensor:
    """Whole-volume call, or a gaussian-blended sliding window when the volume exceeds ``window``.

    ``overlap``: a wanted fraction (rounded by :func:`window_overlap`), or exact per-axis fractions
    (a :class:`TilePlan`'s, in the network's axis order).
    """
    spatial = tuple(inputs.shape[2:])
    if window is None or all(s <= w for s, w in zip(spatial, window)):
        return network_fn(inputs)
    # Never pad: a window larger than the volume along an axis shrinks to the volume.
    roi = tuple(min(w, s) for w, s in zip(window, spatial))
    inferer = SlidingWindowInferer(
        roi_size=roi,
        sw_batch_size=1,
        overlap=overlap if isinstance(overlap, tuple) else window_overlap(roi, overlap, step_multiple),
        mode="gaussian",
        sigma_scale=SIGMA_SCALE,
        progress=progress,
    )
    return inferer(inputs, network_fn)


def encode_mu(
    vae: LoadedVAE | nn.Module,
    volume: torch.Tensor,
    tile: Sequence[int] | None = None,
    overlap: float = 0.25,
    *,
    bf16: bool = False,
    progress: bool = False,
    activation_limit: int = INT32_ELEMENTS,
    tile_margin: int | None = None,
) -> torch.Tensor:
    """Posterior mean ``z_mu`` of a normalised volume (no sampling: deterministic).

    Args:
        vae: a :class:`LoadedVAE`, or a bare MONAI ``AutoencoderKL``/``AutoencoderKlMaisi``
            (treated as canonical layout).
        volume: (B, 1, z, y, x) float tensor, canonical layout; every spatial size a multiple of
            the downsample factor (4).
        tile: window (z, y, x) in image voxels, multiples of the factor; ``None`` = the VAE's
            own ``inference_tile`` (a VAE trained on crops), else one whole-volume pass, or, when
            a convolution of that pass would reach ``activation_limit``, the windows of
            :func:`plan_tiles` (fewest voxels processed).
        overlap: wanted window overlap fraction (rounded down to whole latent voxels) of a given
            or own tile.
        bf16: run the network under bfloat16 autocast: about 2x faster on CUDA and on CPUs
            with AMX / avx512_bf16, but far slower on CPUs without native bf16 (AVX2 only: a
            32^3 MAISI encode took minutes instead of seconds).
        progress: tqdm bar over the windows.
        activation_limit: per-sample elements no convolution tensor may reach
            (:data:`INT32_ELEMENTS`: cuDNN's limit).
        tile_margin: voxels automatic windows share (default :data:`TILE_MARGIN`).

    Returns:
        (B, latent_channels, z/f, y/f, x/f) float32 tensor on ``volume``'s device, canonical layout.
    """
    network, factor, layout, own_tile = _unpack(vae)
    tile = own_tile if tile is None else tile
    if volume.ndim != 5:
        raise ValueError(f"volume must be (B, 1, z, y, x), got shape {tuple(volume.shape)}")
    if any(s % factor for s in volume.shape[2:]):
        raise ValueError(f"volume spatial shape {tuple(volume.shape[2:])} must be multiples of {factor}; pad it first")
    if tile is None:
        plan = plan_tiles(vae, volume.shape[2:], "encode", limit=activation_limit, margin=tile_margin)
        if plan is not None:
            tile, overlap = plan.window, _window_in_layout(plan.overlap(), layout)
    device = next(network.parameters()).device
    window = None if tile is None else _check_tile(tile, factor)
    inputs = to_network_layout(volume.to(device, torch.float32), layout)
    if window is not None:
        window = _window_in_layout(window, layout)

    def network_fn(patch: torch.Tensor) -> torch.Tensor:
        with _autocast(device, bf16):
            return network.encode(patch)[0].float()

    with torch.no_grad():
        z_mu = _run(network_fn, inputs, window, overlap, factor, progress)
    expected = tuple(s // factor for s in inputs.shape[2:])
    if tuple(z_mu.shape[2:]) != expected:
        raise RuntimeError(f"encoder returned latent {tuple(z_mu.shape)}, expected spatial {expected}")
    return from_network_layout(z_mu, layout).to(volume.device).contiguous()


def decode(
    vae: LoadedVAE | nn.Module,
    latent: torch.Tensor,
    tile: Sequence[int] | None = None,
    overlap: float = 0.25,
    *,
    bf16: bool = False,
    progress: bool = False,
    activation_limit: int = INT32_ELEMENTS,
    tile_margin: int | None = None,
) -> torch.Tensor:
    """Decode latents to normalised image intensities (unbounded: clip before mapping to HU).

    Args:
        vae: as for :func:`encode_mu`.
        latent: (B, latent_channels, z, y, x) tensor, canonical layout.
        tile: window (z, y, x) in *image* voxels (latent window = tile / factor); ``None`` = the
            VAE's own ``inference_tile``, else one whole-volume pass, or the windows of
            :func:`plan_tiles` (as for :func:`encode_mu`).
        overlap: wanted window overlap fraction of a given or own tile.
        bf16: bfloat16 autocast (see :func:`encode_mu`).
        progress: tqdm bar over the windows.
        activation_limit, tile_margin: as for :func:`encode_mu`.

    Returns:
        (B, 1, z*f, y*f, x*f) float32 tensor on ``latent``'s device, canonical layout.
    """
    network, factor, layout, own_tile = _unpack(vae)
    tile = own_tile if tile is None else tile
    if latent.ndim != 5:
        raise ValueError(f"latent must be (B, C, z, y, x), got shape {tuple(latent.shape)}")
    if tile is None:
        image_shape = tuple(s * factor for s in latent.shape[2:])
        plan = plan_tiles(vae, image_shape, "decode", limit=activation_limit, margin=tile_margin)
        if plan is not None:  # the same plan in latent voxels: windows and steps divided by the factor
            latent_plan = TilePlan(tuple(w // factor for w in plan.window), plan.counts,  # type: ignore[arg-type]
                                   tuple(step // factor for step in plan.steps))  # type: ignore[arg-type]
            tile, overlap = plan.window, _window_in_layout(latent_plan.overlap(), layout)
    device = next(network.parameters()).device
    window = None
    if tile is not None:
        window = _window_in_layout(tuple(t // factor for t in _check_tile(tile, factor)), layout)
    inputs = to_network_layout(latent.to(device, torch.float32), layout)

    def network_fn(patch: torch.Tensor) -> torch.Tensor:
        with _autocast(device, bf16):
            return network.decode(patch).float()

    with torch.no_grad():
        image = _run(network_fn, inputs, window, overlap, 1, progress)
    expected = tuple(s * factor for s in inputs.shape[2:])
    if tuple(image.shape[2:]) != expected:
        raise RuntimeError(f"decoder returned {tuple(image.shape)}, expected spatial {expected}")
    return from_network_layout(image, layout).to(latent.device).contiguous()
