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
INT_MAX elements per sample; beyond that it runs a slow 64-bit path (a 128 x 512 x 512 MAISI encode
did not finish in 400 s on an H100, 96 x 320 x 320 took 0.2 s). :func:`largest_activation`
measures the largest convolution tensor for a shape on the meta device (no compute), and with no
tile given, :func:`encode_mu` and :func:`decode` tile automatically with the largest window
:func:`safe_tile` finds under the limit.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from monai.inferers import SlidingWindowInferer
from torch import nn

from latent.errors import BadConfigError
from latent.vae import LAYOUT_CANONICAL, LAYOUT_MAISI, LoadedVAE, remove_group_norms

#: Gaussian blending sigma as a fraction of the window (MONAI's default): window borders,
#: where zero padding distorts the encoder, get little weight.
SIGMA_SCALE = 0.125

#: Per-sample elements at which a convolution leaves the fast kernels: PyTorch's
#: ``needs_64bit_indexing_no_split`` (aten/src/ATen/native/Convolution.cpp) refuses cuDNN when the
#: input or output of one sample holds more than INT_MAX = 2**31 - 1 elements (slow ``Slow3d`` path).
INT32_ELEMENTS = 2**31
#: Share of the limit a window may use: the hooks count exactly what reaches ``F.conv3d`` here, the
#: headroom covers other kernels' and other PyTorch/cuDNN versions' own counts (costs ~5 % per axis).
ACTIVATION_HEADROOM = 0.9
#: Overlap of automatically chosen windows: MAISI's published encode setting ([320, 320, 160], 0.4).
AUTO_OVERLAP = 0.4

Part = Literal["encode", "decode"]


def _unpack(vae: LoadedVAE | nn.Module) -> tuple[nn.Module, int, str, tuple[int, ...] | None]:
    """(network, downsample factor, layout, own window) of a LoadedVAE or a bare MONAI VAE."""
    if isinstance(vae, LoadedVAE):
        return vae.network, vae.downsample_factor, vae.layout, vae.inference_tile
    encoder = getattr(vae, "encoder", None)
    channels = getattr(encoder, "num_channels", None) or getattr(encoder, "channels", None)
    if channels is None:
        raise TypeError(f"expected a LoadedVAE or a MONAI AutoencoderKL-family module, got {type(vae).__name__}")
    return vae, 2 ** (len(channels) - 1), LAYOUT_CANONICAL, None


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


def _window_in_layout(window: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """A canonical (z, y, x) window size in the network's axis order."""
    return tuple(reversed(window)) if layout == LAYOUT_MAISI else tuple(window)


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


def _convolutions(network: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every convolution of ``network`` (``nn.Conv3d`` and friends, inside MONAI's wrappers too)."""
    return [(name, m) for name, m in network.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]


def _meta_twin(network: nn.Module) -> nn.Module:
    """A copy of ``network`` on the meta device (shapes only, no data copied), GroupNorms removed.

    Norms keep shapes, so removing them changes no convolution's tensors. MAISI's GroupNorm fails on
    meta (for a side >= 500 it concatenates through ``.cpu()``) and its per-group loop made a meta
    encode ~50x slower (0.6 s instead of 0.01 s).
    """
    memo: dict[int, Any] = {}
    for tensor in (*network.parameters(), *network.buffers()):
        meta = tensor.detach().to("meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return remove_group_norms(copy.deepcopy(network, memo)).eval()


def _input_channels(network: nn.Module, part: Part) -> int:
    """Channels of what ``network.encode`` (the image) or ``network.decode`` (the latent) takes."""
    if part == "decode" and getattr(network, "latent_channels", None):
        return int(network.latent_channels)
    coder = getattr(network, "encoder" if part == "encode" else "decoder", network)
    convs = _convolutions(coder)
    if not convs:
        raise TypeError(f"{type(network).__name__} has no convolutions in its {part} path")
    return int(convs[0][1].in_channels)


def _activation_probe(network: nn.Module) -> Callable[[Sequence[int], Part], dict[str, int]]:
    """``probe(spatial, part)`` -> {conv name: largest per-sample input/output numel}, on a meta twin.

    ``spatial`` is in the network's own axis order; one twin serves every call.
    """
    twin = _meta_twin(network)
    sizes: dict[str, int] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            # per sample, as PyTorch's check: it splits a batch into 32-bit-sized pieces itself
            largest = max(inputs[0].numel() // inputs[0].shape[0], output.numel() // output.shape[0])
            sizes[name] = max(sizes.get(name, 0), largest)

        return hook

    for name, module in _convolutions(twin):
        module.register_forward_hook(record(name))
    channels = {part: _input_channels(twin, part) for part in ("encode", "decode")}

    def probe(spatial: Sequence[int], part: Part) -> dict[str, int]:
        sizes.clear()
        x = torch.empty(1, channels[part], *(int(s) for s in spatial), device="meta")
        with torch.no_grad():
            if part == "encode":
                twin.encode(x)
            else:
                twin.decode(x)
        return dict(sizes)

    return probe


def conv_activations(vae: LoadedVAE | nn.Module, spatial_shape: Sequence[int], part: Part) -> dict[str, int]:
    """Per convolution, the larger per-sample element count of its input and output, for one input.

    Nothing is computed: the network is copied to the meta device and run on a meta tensor of
    shape (1, C, *spatial_shape), with forward hooks on every convolution.

    Args:
        vae: a :class:`LoadedVAE` or a bare MONAI ``AutoencoderKL``/``AutoencoderKlMaisi``.
        spatial_shape: canonical (z, y, x) size of the part's input: image voxels for
            ``"encode"``, latent voxels for ``"decode"``.
        part: which half of the VAE to run.

    Returns:
        {module name: elements}, in call order.
    """
    network, _, layout, _ = _unpack(vae)
    return _activation_probe(network)(_window_in_layout(tuple(spatial_shape), layout), part)


def largest_activation(vae: LoadedVAE | nn.Module, spatial_shape: Sequence[int], part: Part) -> tuple[int, str]:
    """(elements, module name) of the largest convolution input or output; see :func:`conv_activations`."""
    sizes = conv_activations(vae, spatial_shape, part)
    name = max(sizes, key=lambda key: sizes[key])
    return sizes[name], name


def _activation_bound(network: nn.Module, image_shape: Sequence[int]) -> int:
    """Cheap upper bound of :func:`largest_activation`, valid for the AutoencoderKL family.

    No convolution of these networks has more channels than the widest one, nor sees more voxels
    than the image padded by one voxel per axis (the encoder's downsampling pad).
    """
    widest = max((max(m.in_channels, m.out_channels) for _, m in _convolutions(network)), default=0)
    return widest * math.prod(int(s) + 1 for s in image_shape)


def safe_tile(
    vae: LoadedVAE | nn.Module,
    image_shape: Sequence[int],
    part: Part,
    *,
    limit: int = INT32_ELEMENTS,
) -> tuple[int, int, int] | None:
    """Largest window whose every convolution stays under ``limit`` x :data:`ACTIVATION_HEADROOM`.

    The window caps every axis at one length L (a multiple of the downsample factor) and takes the
    largest such L that fits: the longest axes (in-plane, usually) shrink first and the others keep
    their full extent, so the volume gets as few seams as the limit allows. Deterministic: a
    binary search over L, each step measured on the meta device (:func:`conv_activations`).

    Args:
        vae: as for :func:`encode_mu`.
        image_shape: canonical (z, y, x) volume size in image voxels (for ``"decode"``: the
            latent size times the factor), multiples of the factor.
        part: ``"encode"`` (windows of the image) or ``"decode"`` (windows of the latent, here
            given in image voxels: latent window = window / factor).
        limit: per-sample elements a convolution tensor must stay under (:data:`INT32_ELEMENTS`).

    Returns:
        ``None`` when the whole volume fits (one pass), else the window (z, y, x) in image voxels.
    """
    network, factor, layout, _ = _unpack(vae)
    shape = tuple(int(s) for s in image_shape)
    budget = int(limit * ACTIVATION_HEADROOM)
    if _activation_bound(network, shape) < budget:
        return None  # certainly fits: skip the meta pass (and its one-off start-up cost)
    probe = _activation_probe(network)
    scale = 1 if part == "encode" else factor

    def fits(window: tuple[int, ...]) -> bool:
        spatial = _window_in_layout(tuple(w // scale for w in window), layout)
        return max(probe(spatial, part).values()) < budget

    def capped(steps: int) -> tuple[int, int, int]:
        return tuple(min(s, steps * factor) for s in shape)  # type: ignore[return-value]

    if fits(shape):
        return None
    low, high = 1, max(shape) // factor  # capped(low) must fit, capped(high) is the whole volume
    if not fits(capped(low)):
        raise BadConfigError(f"even a {capped(low)} window exceeds {budget} elements in a convolution")
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(capped(middle)) else (low, middle)
    return capped(low)


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
    overlap: float,
    step_multiple: int,
    progress: bool,
) -> torch.Tensor:
    """Whole-volume call, or a gaussian-blended sliding window when the volume exceeds ``window``."""
    spatial = tuple(inputs.shape[2:])
    if window is None or all(s <= w for s, w in zip(spatial, window)):
        return network_fn(inputs)
    # Never pad: a window larger than the volume along an axis shrinks to the volume.
    roi = tuple(min(w, s) for w, s in zip(window, spatial))
    inferer = SlidingWindowInferer(
        roi_size=roi,
        sw_batch_size=1,
        overlap=window_overlap(roi, overlap, step_multiple),
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
) -> torch.Tensor:
    """Posterior mean ``z_mu`` of a normalised volume (no sampling: deterministic).

    Args:
        vae: a :class:`LoadedVAE`, or a bare MONAI ``AutoencoderKL``/``AutoencoderKlMaisi``
            (treated as canonical layout).
        volume: (B, 1, z, y, x) float tensor, canonical layout; every spatial size a multiple of
            the downsample factor (4).
        tile: window (z, y, x) in image voxels, multiples of the factor; ``None`` = the VAE's
            own ``inference_tile`` (a VAE trained on crops), else one whole-volume pass, or, when
            a convolution of that pass would reach ``activation_limit``, the window of
            :func:`safe_tile` at overlap :data:`AUTO_OVERLAP`.
        overlap: wanted window overlap fraction (rounded down to whole latent voxels) of a given
            or own tile.
        bf16: run the network under bfloat16 autocast: about 2x faster on CUDA and on CPUs
            with AMX / avx512_bf16, but far slower on CPUs without native bf16 (AVX2 only: a
            32^3 MAISI encode took minutes instead of seconds).
        progress: tqdm bar over the windows.
        activation_limit: per-sample elements no convolution tensor may reach
            (:data:`INT32_ELEMENTS`: cuDNN's limit).

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
        tile = safe_tile(vae, volume.shape[2:], "encode", limit=activation_limit)
        overlap = overlap if tile is None else AUTO_OVERLAP
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
) -> torch.Tensor:
    """Decode latents to normalised image intensities (unbounded: clip before mapping to HU).

    Args:
        vae: as for :func:`encode_mu`.
        latent: (B, latent_channels, z, y, x) tensor, canonical layout.
        tile: window (z, y, x) in *image* voxels (latent window = tile / factor); ``None`` = the
            VAE's own ``inference_tile``, else one whole-volume pass, or the window of
            :func:`safe_tile` (as for :func:`encode_mu`).
        overlap: wanted window overlap fraction of a given or own tile.
        bf16: bfloat16 autocast (see :func:`encode_mu`).
        progress: tqdm bar over the windows.
        activation_limit: as for :func:`encode_mu`.

    Returns:
        (B, 1, z*f, y*f, x*f) float32 tensor on ``latent``'s device, canonical layout.
    """
    network, factor, layout, own_tile = _unpack(vae)
    tile = own_tile if tile is None else tile
    if latent.ndim != 5:
        raise ValueError(f"latent must be (B, C, z, y, x), got shape {tuple(latent.shape)}")
    if tile is None:
        image_shape = tuple(s * factor for s in latent.shape[2:])
        tile = safe_tile(vae, image_shape, "decode", limit=activation_limit)
        overlap = overlap if tile is None else AUTO_OVERLAP
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
