"""Where an ``l2sct`` model's parts can start from: a VAE folder's decoder (scratch decoder), an
adapted decoder run (``latent vae adapt``, exact decoder) or a trained ``l2l_regress`` run's UNet
(the translator). The exact VAE decode path is
:mod:`latent.translate.models.vae_decoder`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from latent.core.errors import BadConfigError
from latent.core.model_folder import read_model_config, read_model_weights, trained_weights_folder

logger = logging.getLogger(__name__)

#: UNet sizes that must agree between an l2l_regress run and the trunk it starts.
UNET_FIELDS = ("latent_channels", "channels", "num_res_blocks", "attention_levels", "norm_num_groups",
               "num_head_channels", "resblock_updown")


def _kernel_from_ras(weight: torch.Tensor) -> torch.Tensor:
    """A 3D conv kernel trained on (x, y, z) RAS arrays -> the same filter on (z, y, x) LPS arrays.

    Mirrors ``latent.core.vae.inference.from_network_layout`` on the kernel's spatial axes (exact for
    odd kernels with symmetric padding).
    """
    return weight.flip(2, 3).permute(0, 1, 4, 3, 2) if weight.ndim == 5 else weight


def init_decoder_from_vae(decoder: nn.Module, vae_dir: str | Path) -> int:
    """Copy a VAE folder's decoder weights into a scratch ``decoder`` where shapes match.

    Matches by name (``decoder.<key>``); when names differ but the two decoders hold the same
    sequence of tensor shapes (e.g. MAISI's decoder, whose convolutions are wrapped once more),
    copies in order. Kernels of a VAE stored in the MAISI ``xyz_ras`` layout are converted.

    Returns:
        Number of tensors copied.

    Raises:
        FileNotFoundError, ValueError: missing folder files, or nothing matched.
    """
    vae_dir = Path(vae_dir)
    config_path, weights_path = vae_dir / "config.json", vae_dir / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"init_decoder_from: {path} missing (a VAE folder holds config.json "
                                    "and model.safetensors)")
    layout = json.loads(config_path.read_text()).get("layout", "zyx_lps")
    source = {k[len("decoder."):]: v for k, v in load_file(str(weights_path)).items() if k.startswith("decoder.")}
    if layout == "xyz_ras":
        source = {k: _kernel_from_ras(v) for k, v in source.items()}
    target = decoder.state_dict()
    updated = {k: source[k] for k, v in target.items() if k in source and source[k].shape == v.shape}
    if len(updated) < len(target):
        source_shapes = [v.shape for v in source.values()]
        if source_shapes == [v.shape for v in target.values()]:
            updated = dict(zip(target, source.values()))
    if not updated:
        raise ValueError(f"init_decoder_from: no decoder tensor of {vae_dir} matches this decoder's "
                         "shapes; set decoder_channels / decoder_res_blocks / norm_num_groups to the VAE's")
    if len(updated) < len(target):
        logger.warning("l2sct: only %d of %d decoder tensors matched %s", len(updated), len(target), vae_dir)
    decoder.load_state_dict({**target, **{k: v.to(target[k].dtype) for k, v in updated.items()}})
    return len(updated)


def _model_folder(source: str, field: str = "init_trunk_from") -> Path:
    """A run's ``best/`` (else ``final/``), or a model folder itself."""
    return trained_weights_folder(source, f"model.{field}")


def init_trunk_from_run(trunk: nn.Module, source: str, config: Any) -> int:
    """Copy a trained ``l2l_regress`` UNet into the UNet ``trunk``; returns the number of tensors.

    Raises:
        BadConfigError: ``source`` is not an l2l_regress model, or its UNet sizes differ from
            ``config``'s (the field is named).
    """
    if config.trunk != "unet":
        raise BadConfigError("model.init_trunk_from: needs trunk: unet (an l2l_regress UNet)")
    folder = _model_folder(source)
    saved = read_model_config(folder)
    if saved.get("family") != "l2l_regress":
        raise BadConfigError(f"model.init_trunk_from: {folder} holds a {saved.get('family')!r} model, not l2l_regress")
    ours = config.model_dump(mode="json")
    for field in UNET_FIELDS:
        if field in saved and saved[field] != ours.get(field):
            raise BadConfigError(f"model.{field}: {ours.get(field)!r} differs from {saved[field]!r} of the "
                                 f"l2l_regress run {folder} that init_trunk_from names")
    state = {k[len("unet."):]: v for k, v in read_model_weights(folder).items() if k.startswith("unet.")}
    own = trunk.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise BadConfigError(f"model.init_trunk_from: the UNet of {folder} does not fit the trunk")
    trunk.load_state_dict(state)
    logger.info("l2sct: trunk initialised from %s (%d tensors)", folder, len(state))
    return len(state)


def init_exact_decoder_from_adapted(decoder: nn.Module, source: str) -> int:
    """Copy an adapted decoder run's decode path into l2sct's exact ``decoder`` (same VAE).

    Raises:
        BadConfigError: ``source`` is not a ``decoder_adapt`` model, or adapts another VAE.
    """
    folder = _model_folder(source, "init_decoder_from")
    saved = read_model_config(folder)
    if saved.get("family") != "decoder_adapt":
        raise BadConfigError(f"model.init_decoder_from: {folder} holds a {saved.get('family')!r} model, not an adapted "
                             "decoder (latent vae adapt)")
    theirs = (saved.get("vae_decoder") or {}).get("weights_sha256")
    ours = decoder.record.weights_sha256
    if theirs != ours:
        raise BadConfigError(f"model.init_decoder_from: {folder} adapts the VAE {str(theirs)[:12]}..., this model "
                             f"decodes with {ours[:12]}...")
    state = {k[len("vae_decode."):]: v for k, v in read_model_weights(folder).items() if k.startswith("vae_decode.")}
    decoder.load_state_dict(state)
    logger.info("l2sct: exact decoder initialised from the adapted decoder %s", folder)
    return len(state)
