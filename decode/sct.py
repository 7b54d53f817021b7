"""Model output -> HU on the canonical grid.

Two output spaces exist (docs/intensities.md):

- ``"ct_full"``: pixel-space models and the direct latent-to-sCT decoder predict CT normalised
  over the full SynthRAD range [-1024, 3071] HU -> [-1, 1]; mapped back with
  :func:`latent.core.intensity.full_to_ct`.
- ``"ct_latent"``: latent-to-latent models predict (standardised) CT latents; they are
  destandardised, decoded by the frozen VAE, clipped to [0, 1] and mapped back with
  :func:`latent.core.intensity.vae_to_ct`. The VAE's CT window is [-1000, 1000] HU, so this route
  **cannot represent anything above 1000 HU** (cortical bone, teeth, metal saturate at 1000).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from latent.core.standardise import destandardise
from latent.core.intensity import full_to_ct, vae_to_ct
from latent.core.vae.inference import decode as vae_decode

OutputSpace = Literal["ct_latent", "ct_full"]
OUTPUT_SPACES = ("ct_latent", "ct_full")


def destandardise_latent(
    latent: torch.Tensor, latent_mean: torch.Tensor | None, latent_std: torch.Tensor | None
) -> torch.Tensor:
    """(B, C, d, h, w) standardised latents -> float32 latents in the VAE's own scale
    (:func:`latent.core.standardise.destandardise`; both statistics ``None`` = identity)."""
    return destandardise(latent.float(), latent_mean, latent_std)


def output_to_canonical_hu(
    output: torch.Tensor,
    output_space: OutputSpace,
    vae: torch.nn.Module | None = None,
    latent_mean: torch.Tensor | None = None,
    latent_std: torch.Tensor | None = None,
    tile: Sequence[int] | None = None,
    overlap: float = 0.25,
) -> np.ndarray:
    """Map a model output to HU on the canonical grid.

    ``"ct_latent"`` outputs go through the frozen VAE decoder and saturate at 1000 HU: the
    MAISI CT window is [-1000, 1000], so bone above 1000 HU and metal cannot be represented.

    Args:
        output: (B, C, d, h, w) tensor. ``"ct_full"``: C = 1, values in [-1, 1] (clipped).
            ``"ct_latent"``: C = latent channels (4), standardised when mean/std are given.
        output_space: ``"ct_full"`` or ``"ct_latent"``.
        vae: the frozen VAE (a ``LoadedVAE`` or a MONAI AutoencoderKL-family module), or an
            adapted full-range decoder (a ``decoder_adapt`` model: ``decode_raw_latent``, output
            over the full range, no window); required for ``"ct_latent"``.
        latent_mean, latent_std: (C,) per-channel statistics the latents were standardised with.
        tile: decoder window (z, y, x) in image voxels, multiples of the VAE factor; ``None`` =
            one whole-volume pass.
        overlap: decoder window overlap fraction.

    Returns:
        float32 array (B, D, H, W) in HU; for ``"ct_latent"`` D, H, W = factor x (d, h, w)
        and values lie in [-1000, 1000]; for ``"ct_full"`` in [-1024, 3071].
    """
    if output_space not in OUTPUT_SPACES:
        raise ValueError(f"output_space {output_space!r}: expected one of {', '.join(OUTPUT_SPACES)}")
    if output.ndim != 5:
        raise ValueError(f"model output must be (B, C, d, h, w), got shape {tuple(output.shape)}")
    output = output.detach()
    if output_space == "ct_full":
        if output.shape[1] != 1:
            raise ValueError(f"ct_full output must have 1 channel, got {output.shape[1]}")
        return full_to_ct(output[:, 0].float().cpu().numpy()).astype(np.float32, copy=False)
    if vae is None:
        raise ValueError("output_space 'ct_latent' needs the VAE to decode the latents")
    latent = destandardise_latent(output, latent_mean, latent_std)
    adapted = getattr(vae, "decode_raw_latent", None)
    if adapted is not None:  # an adapted full-range decoder (latent vae adapt): no 1000 HU window
        return full_to_ct(adapted(latent)[:, 0].float().cpu().numpy()).astype(np.float32, copy=False)
    image = vae_decode(vae, latent, tile, overlap)
    if image.shape[1] != 1:
        raise RuntimeError(f"VAE decoder returned {image.shape[1]} channels, expected 1")
    # Decoder outputs are unbounded: clip to the VAE's [0, 1] range before mapping to HU.
    normalised = image[:, 0].clamp(0.0, 1.0).cpu().numpy()
    return vae_to_ct(normalised).astype(np.float32, copy=False)
