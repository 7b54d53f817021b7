"""One case -> VAE latents: what the encode stage computes, without knowing where it is stored.

:func:`encode_prepared` turns a case already on the canonical grid into the arrays the cache
keeps; the loop over a data set that writes them (``latent encode``) is
:mod:`latent.app.encode_run`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from latent.core.errors import BadConfigError
from latent.core.cases import Case
from latent.core.grid import CanonicalGrid
from latent.core.hashing import sha256_file
from latent.core.prepare import PreparedCase, latent_mask
from latent.core.vae.loading import LoadedVAE
from latent.core.vae.inference import encode_mu


def grid_record(grid: CanonicalGrid) -> dict:
    """Canonical grid as stored in the producer record."""
    placement = "centred on body mask bounding box"
    if grid.is_fit:
        placement += f"; shape per case: the body's extent rounded up to multiples of {grid.multiple}"
    return {**grid.to_dict(), "direction": "identity (LPS)", "placement": placement}


def shard_cases(cases: Sequence[Case], index: int, count: int) -> list[Case]:
    """Every ``count``-th case starting at ``index`` (cases sorted by pid)."""
    if count < 1 or not 0 <= index < count:
        raise BadConfigError(f"shard {index}/{count}: need 0 <= i < n")
    return [case for position, case in enumerate(sorted(cases, key=lambda c: c.pid)) if position % count == index]


def source_hashes(case: Case) -> dict[str, str]:
    """SHA-256 of each source file of a case."""
    return {role: sha256_file(path) for role in ("mr", "ct", "mask") if (path := getattr(case, role)) is not None}


def encode_prepared(vae: LoadedVAE, prepared: PreparedCase, tile: Sequence[int] | None, bf16: bool) -> dict[str, np.ndarray]:
    """Cache arrays of one prepared case: latents (posterior means), masks and pixel volumes."""
    device = vae.device

    def encode(volume: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None].to(device)
        return encode_mu(vae, tensor, tile=tile, bf16=bf16)[0].cpu().numpy()

    arrays = {
        "mr_mu": encode(prepared.mr_unit),
        "mask_latent": latent_mask(prepared.mask, vae.downsample_factor),
        "mr_pixels": prepared.mr_unit,
        "mask_pixels": prepared.mask,
    }
    if prepared.ct_vae is not None:
        arrays["ct_mu"] = encode(prepared.ct_vae)
        arrays["ct_pixels"] = prepared.ct_full
    return arrays
