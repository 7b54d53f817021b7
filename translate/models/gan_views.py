"""Training views and whole-volume inference of the pixel-space GANs: slice stacks and patches
drawn inside the body, unpaired partners, padding, and slice-wise or sliding-window translation
(MONAI ``SlidingWindowInferer``). Layouts as in :mod:`latent.translate.models.gan_common`."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer

#: Pad value of every signed image: MR background (0) and CT pad (-1024 HU) both map to -1.
SIGNED_BACKGROUND = -1.0


# -- sampling ---------------------------------------------------------------------------------
def odd_context_slices(value: int) -> int:
    """Validator of a ``context_slices`` field: an odd count >= 1 (the centre slice is predicted)."""
    if value < 1 or value % 2 == 0:
        raise ValueError(f"context_slices must be an odd number >= 1 (the centre slice is predicted), got {value}")
    return value


def pad_to_multiple(x: torch.Tensor, multiple: int, value: float, axes: int = 2) -> torch.Tensor:
    """Pad the last ``axes`` dimensions at their end up to a multiple of ``multiple``."""
    pads: list[int] = []
    for size in reversed(x.shape[-axes:]):
        pads += [0, (-size) % multiple]
    return F.pad(x, pads, value=value) if any(pads) else x


def body_slices(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the axial slices of a ``(1, D, H, W)`` mask with body (all slices if none)."""
    present = (mask[0] > 0).flatten(1).any(dim=1)
    indices = torch.nonzero(present).flatten()
    return indices if indices.numel() else torch.arange(mask.shape[1], device=mask.device)


def sample_slices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """``(B, count)`` slice indices per volume of ``(B, 1, D, H, W)``: distinct while enough body slices."""
    rows = []
    for volume_mask in mask:
        valid = body_slices(volume_mask)
        if count <= valid.numel():
            rows.append(valid[torch.randperm(valid.numel(), device=valid.device)[:count]])
        else:
            rows.append(valid[torch.randint(valid.numel(), (count,), device=valid.device)])
    return torch.stack(rows)


def gather_stacks(volume: torch.Tensor, batch_index: torch.Tensor, z: torch.Tensor, depth: int) -> torch.Tensor:
    """Stacks of ``depth`` slices centred on ``z`` (edge slices repeated): ``(N, depth, H, W)``."""
    offsets = torch.arange(depth, device=volume.device) - depth // 2
    planes = (z.to(volume.device)[:, None] + offsets).clamp(0, volume.shape[2] - 1)
    return volume[:, 0][batch_index.to(volume.device)[:, None], planes]


def sample_patch_starts(mask: torch.Tensor, count: int, patch: tuple[int, int, int]) -> torch.Tensor:
    """``(B, count, 3)`` patch corners whose patches are centred on random body voxels (clamped inside)."""
    shape = torch.tensor(mask.shape[2:], device=mask.device)
    half, size = torch.tensor(patch, device=mask.device) // 2, torch.tensor(patch, device=mask.device)
    rows = []
    for volume_mask in mask:
        voxels = torch.nonzero(volume_mask[0] > 0)
        if voxels.numel():
            centres = voxels[torch.randint(voxels.shape[0], (count,), device=mask.device)]
        else:
            centres = (torch.rand(count, 3, device=mask.device) * shape).long()
        rows.append(torch.minimum((centres - half).clamp_min(0), (shape - size).clamp_min(0)))
    return torch.stack(rows)


def gather_patches(volume: torch.Tensor, batch_index: torch.Tensor, starts: torch.Tensor,
                   patch: tuple[int, int, int]) -> torch.Tensor:
    """``(N, 1, *patch)`` patches of ``(B, 1, D, H, W)`` at corners ``starts`` (N, 3)."""
    return torch.stack([volume[int(b), :, z:z + patch[0], y:y + patch[1], x:x + patch[2]]
                        for b, (z, y, x) in zip(batch_index.tolist(), starts.tolist())])


def pad_volume_to(volume: torch.Tensor, size: tuple[int, int, int], value: float) -> torch.Tensor:
    """Pad a ``(B, C, D, H, W)`` volume at its end so every axis is at least ``size``."""
    pads: list[int] = []
    for have, want in zip(reversed(volume.shape[2:]), reversed(size)):
        pads += [0, max(0, want - have)]
    return F.pad(volume, pads, value=value) if any(pads) else volume


def unpaired_partner(batch_size: int) -> torch.Tensor:
    """Batch index whose CT pairs with each MR in unpaired training: ``roll`` by one case.

    With two or more cases per batch an MR view never meets its own case's CT; with one case
    the caller must draw different slices / positions instead (:func:`avoid_same`).
    """
    return torch.roll(torch.arange(batch_size), shifts=1)


def avoid_same(drawn: torch.Tensor, forbidden: torch.Tensor, redraw: Callable[[], torch.Tensor],
               attempts: int = 20) -> torch.Tensor:
    """Redraw the rows of ``drawn`` equal to ``forbidden`` (same slice / corner as the MR view)."""
    for _ in range(attempts):
        clash = (drawn == forbidden).reshape(drawn.shape[0], drawn.shape[1], -1).all(dim=-1)
        if not clash.any():
            break
        drawn = torch.where(clash.reshape(clash.shape + (1,) * (drawn.dim() - 2)), redraw(), drawn)
    return drawn


# -- inference --------------------------------------------------------------------------------
def slicewise_translate(volume: torch.Tensor, predictor: Callable[[torch.Tensor], torch.Tensor], depth: int,
                        batch_size: int, multiple: int, output_channel: int = 0,
                        pad_value: float = SIGNED_BACKGROUND) -> torch.Tensor:
    """Run a 2D network over every axial slice (2.5D: over edge-padded k-slice stacks).

    Args:
        volume: ``(B, 1, D, H, W)`` network-scale input.
        predictor: ``(n, depth, H', W') -> (n, C, H', W')`` with H', W' multiples of ``multiple``.
        output_channel: channel of the prediction kept for each slice (the centre one for k -> k nets).

    Returns:
        ``(B, 1, D, H, W)``; in-plane padding (at the end, ``pad_value``) is cropped off.
    """
    batch, _, slices, height, width = volume.shape
    output = volume.new_empty(volume.shape)
    for b in range(batch):
        for start in range(0, slices, batch_size):
            z = torch.arange(start, min(slices, start + batch_size), device=volume.device)
            stack = gather_stacks(volume, torch.full_like(z, b), z, depth)
            prediction = predictor(pad_to_multiple(stack, multiple, pad_value))
            output[b, 0, start:start + z.numel()] = prediction[:, output_channel, :height, :width]
    return output


def make_inferer(roi_size: tuple[int, ...], overlap: float = 0.5, sw_batch_size: int = 4,
                 sigma_scale: float = 0.125, pad_value: float = SIGNED_BACKGROUND) -> SlidingWindowInferer:
    """MONAI sliding-window inferer with gaussian blending (seam-free) and constant padding."""
    return SlidingWindowInferer(roi_size=roi_size, sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian",
                                sigma_scale=sigma_scale, padding_mode="constant", cval=pad_value)


def sliding_window_translate(volume: torch.Tensor, predictor: Callable[[torch.Tensor], torch.Tensor],
                             inferer: SlidingWindowInferer) -> torch.Tensor:
    """``(B, C, D, H, W)`` -> the predictor's blended output over the whole volume (plain tensor)."""
    output = inferer(volume, predictor)
    return output.as_tensor() if hasattr(output, "as_tensor") else output


# -- the shared model skeleton ----------------------------------------------------------------
def centre_channel(stack: torch.Tensor) -> torch.Tensor:
    """The centre slice of ``(N, k, ...)`` stacks, keeping the channel axis: ``(N, 1, ...)``."""
    middle = stack.shape[1] // 2
    return stack[:, middle:middle + 1]
