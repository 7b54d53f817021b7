"""The contour map of ContourDiff: one operator for CT (training) and MR (inference).

Per axial slice (``(N, 1, H, W)``, any intensity scale; z, y, x order of the canonical grid):

1. **Body outline.** The slice is mapped to [0, 1] between its own 1st and 99th percentiles,
   smoothed (gaussian, sigma 1 pixel) and thresholded at ``body_threshold``; holes are filled
   in-plane (lungs, bowel gas and the MR's dark cortical bone stay inside) and a one-step opening
   removes specks of noise. The outline is the body's inner one-pixel boundary.
2. **Multi-scale edges.** The slice is replaced by its own ranks (each pixel: the share of the
   slice's pixels darker than it, a per-image histogram equalisation that makes the two
   modalities' contrasts comparable in size whatever their order), smoothed at each of
   ``edge_scales`` (gaussian sigmas in pixels); a pixel is an edge where the gradient magnitude
   is above the ``edge_quantile`` of the magnitudes in the body's interior. The interior is the
   body eroded by ``ceil(2 sigma)`` pixels: the air-to-skin step would otherwise take every
   edge of the slice, and the outline channel already holds it.

Channels of the map: the outline, then one edge map per scale, each in {0, 1}. Nothing of the
image's absolute intensity survives, which is what lets a model trained on CT maps read MR maps
(``benchmarks/bench_contour_agreement.py`` measures how well the two agree on the phantom).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import separable_filtering
from monai.networks.layers.convutils import gaussian_1d
from scipy import ndimage

from latent.translate.models.gan_losses import spatial_gradients

#: Percentiles of the body-outline normalisation.
BODY_PERCENTILES = (0.01, 0.99)
#: Gaussian sigma (pixels) before the body threshold.
BODY_SIGMA = 1.0


def unit_images(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two per-slice normalisations of ``(N, 1, H, W)`` slices, from one sort of each slice.

    Returns:
        ``(percentile, rank)``: the slice mapped to [0, 1] between its own 1st and 99th
        percentiles (clipped), and each pixel's share of the slice's pixels strictly darker.
    """
    flat = image.float().flatten(1).contiguous()
    ordered = flat.sort(dim=1).values
    count = flat.shape[1]
    low, high = (ordered[:, round(q * (count - 1))].view(-1, 1, 1, 1) for q in BODY_PERCENTILES)
    percentile = ((image.float() - low) / (high - low).clamp_min(1e-6)).clamp(0.0, 1.0)
    rank = (torch.searchsorted(ordered, flat, side="left").float() / count).view_as(image)
    return percentile, rank


def smooth(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of ``(N, 1, H, W)`` (MONAI separable filtering, 3 sigma, edges replicated)."""
    kernel = gaussian_1d(torch.tensor(float(sigma)), truncated=3.0).to(image)
    return separable_filtering(image, [kernel, kernel], mode="replicate")


def gradient_magnitude(image: torch.Tensor) -> torch.Tensor:
    """``(N, 1, H, W)`` forward-difference gradient magnitude, the last row / column repeated."""
    magnitude = spatial_gradients(image).pow(2).sum(dim=2).sqrt()
    return F.pad(magnitude, (0, 1, 0, 1), mode="replicate")


def body_mask(percentile: torch.Tensor, threshold: float) -> torch.Tensor:
    """Percentile-normalised ``(N, 1, H, W)`` slices -> float {0, 1} body of each (threshold,
    in-plane hole filling, opening)."""
    above = (smooth(percentile, BODY_SIGMA) > threshold)[:, 0].cpu().numpy()
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    # One filled slice above and below: slices 0 and N-1 are then no border of the array, and
    # the in-plane structure leaves every slice its own holes.
    padded = np.pad(above, ((1, 1), (0, 0), (0, 0)), constant_values=True)
    filled = ndimage.binary_fill_holes(padded, structure=in_plane)[1:-1]
    opened = ndimage.binary_opening(filled, structure=in_plane)
    return torch.from_numpy(opened)[:, None].to(device=percentile.device, dtype=torch.float32)


def contour_map(image: torch.Tensor, body_threshold: float = 0.1, edge_quantile: float = 0.8,
                edge_scales: tuple[float, ...] = (1.0, 2.0)) -> torch.Tensor:
    """The contour map of each slice (module docstring).

    Args:
        image: ``(N, 1, H, W)`` slices of one modality (CT in any HU scaling, MR in any units).
        body_threshold: body threshold on the percentile-normalised, smoothed slice.
        edge_quantile: share of the interior's gradient magnitudes below the edge threshold.
        edge_scales: gaussian sigmas (pixels) of the edge maps.

    Returns:
        ``(N, 1 + len(edge_scales), H, W)`` float maps in {0, 1}: outline, then edges per scale.
    """
    if image.dim() != 4 or image.shape[1] != 1:
        raise ValueError(f"contour_map takes (N, 1, H, W) slices, got {tuple(image.shape)}")
    percentile, ranks = unit_images(image.detach().float())
    body = body_mask(percentile, body_threshold)
    outline = body - (-F.max_pool2d(-body, 3, stride=1, padding=1))
    maps = [outline]
    for sigma in edge_scales:
        band = math.ceil(2 * sigma)
        interior = -F.max_pool2d(-body, 2 * band + 1, stride=1, padding=band)
        magnitude = gradient_magnitude(smooth(ranks, sigma)) * interior
        inside = torch.where(interior > 0, magnitude, torch.full_like(magnitude, float("nan"))).flatten(1)
        threshold = inside.nanquantile(edge_quantile, dim=1).nan_to_num(float("inf")).view(-1, 1, 1, 1)
        maps.append(((magnitude > threshold) & (magnitude > 0)).float())
    return torch.cat(maps, dim=1)


def map_dice(first: torch.Tensor, second: torch.Tensor, dilation: int = 1) -> float:
    """Dice of two ``(N, C, H, W)`` contour maps (channels merged) after a ``dilation``-pixel dilation.

    Returns 1.0 when both maps are empty.
    """
    size = 2 * dilation + 1
    grow = [F.max_pool2d(m.amax(dim=1, keepdim=True).float(), size, stride=1, padding=dilation) > 0
            for m in (first, second)]
    total = int(grow[0].sum() + grow[1].sum())
    return 1.0 if total == 0 else 2.0 * int((grow[0] & grow[1]).sum()) / total
