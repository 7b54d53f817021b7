"""Tiling plans for VAE encode / decode: the largest convolution of a shape, and the cheapest tiling under a limit.

PyTorch sends a convolution to cuDNN only while its input and output hold at most INT_MAX elements
per sample; beyond that it runs a slow 64-bit path (a 128 x 512 x 512 MAISI encode did not finish
in 400 s on an H100, 96 x 320 x 320 took 0.2 s). :func:`conv_activations` measures every
convolution tensor of a shape on the meta device (no compute); :func:`plan_tiles` picks, among
the tilings whose windows stay under the limit, the one that processes the fewest voxels
(docs/vae.md).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from latent.core.errors import BadConfigError
from latent.core.vae.loading import LAYOUT_CANONICAL, LAYOUT_MAISI, LoadedVAE, remove_group_norms

Part = Literal["encode", "decode"]

#: Per-sample elements at which a convolution leaves the fast kernels: PyTorch's
#: ``needs_64bit_indexing_no_split`` (aten/src/ATen/native/Convolution.cpp) refuses cuDNN when the
#: input or output of one sample holds more than INT_MAX = 2**31 - 1 elements (slow ``Slow3d`` path).
INT32_ELEMENTS = 2**31
#: Share of the limit a window may use: the hooks count exactly what reaches ``F.conv3d`` here, the
#: headroom covers other kernels' and other PyTorch/cuDNN versions' own counts (costs ~5 % per axis).
ACTIVATION_HEADROOM = 0.9
#: Image voxels that neighbouring automatic windows share (about; see :func:`plan_tiles`): 8 latent
#: voxels, weighed by the gaussian blending. Chosen by ``benchmarks/bench_encode.py --tiling``
#: (docs/vae.md: the seam error and the cost of each margin).
TILE_MARGIN = 32


def _unpack(vae: LoadedVAE | nn.Module) -> tuple[nn.Module, int, str, tuple[int, ...] | None]:
    """(network, downsample factor, layout, own window) of a LoadedVAE or a bare MONAI VAE."""
    if isinstance(vae, LoadedVAE):
        return vae.network, vae.downsample_factor, vae.layout, vae.inference_tile
    encoder = getattr(vae, "encoder", None)
    channels = getattr(encoder, "num_channels", None) or getattr(encoder, "channels", None)
    if channels is None:
        raise TypeError(f"expected a LoadedVAE or a MONAI AutoencoderKL-family module, got {type(vae).__name__}")
    return vae, 2 ** (len(channels) - 1), LAYOUT_CANONICAL, None


def _window_in_layout(window: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """A canonical (z, y, x) window size in the network's axis order."""
    return tuple(reversed(window)) if layout == LAYOUT_MAISI else tuple(window)


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
    channels: dict[str, int] = {}  # per part, on first use: a decode-only network has no encoder

    def probe(spatial: Sequence[int], part: Part) -> dict[str, int]:
        sizes.clear()
        if part not in channels:
            channels[part] = _input_channels(twin, part)
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


@dataclass(frozen=True)
class TilePlan:
    """A deterministic tiling of one volume: a window and how many windows each axis takes.

    Attributes:
        window: window size (z, y, x) in image voxels, multiples of the downsample factor.
        counts: windows per axis (z, y, x); neighbours share at least ``margin - factor`` voxels.
        steps: distance between window starts per axis (multiples of the factor); the last
            window of an axis ends at the volume's end (MONAI's placement).
    """

    window: tuple[int, int, int]
    counts: tuple[int, int, int]
    steps: tuple[int, int, int]

    def overlap(self) -> tuple[float, ...]:
        """Per-axis overlap fraction that makes MONAI step exactly :attr:`steps` (half a voxel of slack)."""
        return tuple(0.0 if n == 1 else max(0.0, 1.0 - (step + 0.5) / w)
                     for w, n, step in zip(self.window, self.counts, self.steps))

    def voxel_ratio(self, shape: Sequence[int]) -> float:
        """Voxels the windows process over the volume's voxels (1.0 for one pass)."""
        return math.prod(self.counts) * math.prod(self.window) / math.prod(int(s) for s in shape)


def _axis_split(size: int, count: int, factor: int, margin: int) -> tuple[int, int, int] | None:
    """(window, count, step) covering ``size`` with ``count`` windows, neighbours sharing about
    ``margin`` voxels (more than ``margin - factor``, at least one; at most half of each window's share of the
    axis), or None when ``count`` windows cannot be placed so (a window would be the whole axis, or
    whole latent voxels leave too little shared)."""
    if count == 1:
        return size, 1, size
    margin = max(1, min(margin, -(-size // count) // 2))  # a small volume: at most half a window's share
    # count windows of w sharing m voxels pairwise cover count * w - (count - 1) * m voxels
    window = min(size, -(-(size + (count - 1) * margin) // (count * factor)) * factor)
    if window >= size:
        return None
    step = max(factor, -(-(-(-(size - window) // (count - 1))) // factor) * factor)
    if window - step < max(1, margin - factor + 1):  # whole latent voxels left too little shared
        return None
    actual = -(-(size - window) // step) + 1  # MONAI: the first d with d * step + window >= size, plus one
    return window, actual, step


def plan_tiles(
    vae: LoadedVAE | nn.Module,
    image_shape: Sequence[int],
    part: Part,
    *,
    limit: int = INT32_ELEMENTS,
    margin: int | None = None,
    max_windows_per_axis: int = 16,
) -> TilePlan | None:
    """The tiling that processes the fewest voxels while every convolution stays under ``limit``.

    Every combination of windows per axis is a candidate; each axis's window is its share of the
    volume plus ``margin`` voxels shared with a neighbour (gaussian blending weighs them). The
    candidates are tried from the cheapest (voxels processed, then fewer windows) until one fits
    (:func:`conv_activations` on the meta device; a window that does not fit rules out every
    larger one). Deterministic: one plan per shape, part and limit.

    Args:
        vae: as for :func:`encode_mu`.
        image_shape: canonical (z, y, x) volume size in image voxels (for ``"decode"``: the latent
            size times the factor), multiples of the factor.
        part: ``"encode"`` or ``"decode"`` (its windows are the plan's window / factor).
        limit: per-sample elements a convolution tensor must stay under (times
            :data:`ACTIVATION_HEADROOM`).
        margin: image voxels neighbouring windows share (default :data:`TILE_MARGIN`).
        max_windows_per_axis: the search's bound per axis.

    Returns:
        ``None`` when the whole volume fits (one pass), else the :class:`TilePlan`.

    Raises:
        BadConfigError: no plan within ``max_windows_per_axis`` fits.
    """
    network, factor, layout, _ = _unpack(vae)
    shape = tuple(int(s) for s in image_shape)
    margin = TILE_MARGIN if margin is None else int(margin)
    budget = int(limit * ACTIVATION_HEADROOM)
    if _activation_bound(network, shape) < budget:
        return None  # certainly fits: skip the meta pass (and its one-off start-up cost)
    probe = _activation_probe(network)
    scale = 1 if part == "encode" else factor
    failed: list[tuple[int, ...]] = []

    def fits(window: tuple[int, ...]) -> bool:
        if any(all(w >= f for w, f in zip(window, bad)) for bad in failed):
            return False
        if _activation_bound(network, window) >= budget:
            spatial = _window_in_layout(tuple(w // scale for w in window), layout)
            if max(probe(spatial, part).values()) >= budget:
                failed.append(window)
                return False
        return True

    if fits(shape):
        return None
    splits = [[split for n in range(1, max_windows_per_axis + 1) if (split := _axis_split(size, n, factor, margin))]
              for size in shape]
    candidates = {}
    for z, y, x in itertools.product(*splits):
        plan = TilePlan((z[0], y[0], x[0]), (z[1], y[1], x[1]), (z[2], y[2], x[2]))
        candidates[plan] = (plan.voxel_ratio(shape), math.prod(plan.counts))
    for plan in sorted(candidates, key=candidates.get):
        if fits(plan.window):
            return plan
    raise BadConfigError(f"no tiling of {shape} with at most {max_windows_per_axis} windows per axis keeps every "
                         f"convolution under {budget} elements")


def safe_tile(
    vae: LoadedVAE | nn.Module,
    image_shape: Sequence[int],
    part: Part,
    *,
    limit: int = INT32_ELEMENTS,
) -> tuple[int, int, int] | None:
    """The window of :func:`plan_tiles` (``None``: the whole volume fits one pass)."""
    plan = plan_tiles(vae, image_shape, part, limit=limit)
    return None if plan is None else plan.window
