"""The VAE network itself: the MAISI architecture, the supported classes and layouts, building a
network from a config (optionally without GroupNorm), and reading weights into it. Loading a
VAE by spec is :mod:`latent.core.vae.loading`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from latent.core.errors import WeightsError
from latent.core.network_weights import freeze, load_strict, read_state_dict


#: Architecture of the released MAISI VAE (NV-Generate-CT / NV-Generate-MR), ~20.9 M parameters.
MAISI_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 1,
        "latent_channels": 4,
        "num_channels": [64, 128, 256],
        "num_res_blocks": [2, 2, 2],
        "norm_num_groups": 32,
        "norm_eps": 1e-6,
        "attention_levels": [False, False, False],
        "with_encoder_nonlocal_attn": False,
        "with_decoder_nonlocal_attn": False,
        "use_checkpointing": False,
        "use_convtranspose": False,
    }
)


#: MAISI constructor arguments that change how the network runs, not what it computes
#: (memory slab splitting, fp16 norm output, printing). Set by :func:`build_vae`, never stored
#: in a config or a cache key.
MAISI_RUNTIME_KEYS = frozenset({"num_splits", "dim_split", "norm_float16", "print_info", "save_mem"})


#: Runtime choice: fp16 norm output fails outside CUDA autocast; slab splitting (exact, saves
#: memory) crashed on small inputs with 8 slabs and was slower on CPU with 4, and the sliding
#: window is this project's memory strategy, so one slab. Not yet exercised on a GPU.
MAISI_RUNTIME = MappingProxyType(
    {"norm_float16": False, "num_splits": 1, "dim_split": 1, "print_info": False, "save_mem": False}
)


#: Array layouts a VAE's weights expect. Ours: the canonical (z, y, x) arrays in ITK's LPS world.
LAYOUT_CANONICAL = "zyx_lps"


#: MAISI was trained on MONAI-loaded NIfTI, i.e. (x, y, z) arrays oriented RAS.
LAYOUT_MAISI = "xyz_ras"


LAYOUTS = (LAYOUT_CANONICAL, LAYOUT_MAISI)


SUPPORTED_CLASSES = ("AutoencoderKlMaisi", "AutoencoderKL")


#: Normalisation layers of a VAE: MONAI's GroupNorm, or none. GroupNorm statistics depend on the
#: spatial extent, so a VAE trained on crops behaves differently on whole volumes and across
#: tiles (docs/vae.md); without normalisation a small VAE is fully convolutional: what it does to
#: a voxel does not depend on the size of the volume around it.
NORMS = ("group", "none")


CONFIG_FILENAME = "config.json"


WEIGHTS_FILENAME = "model.safetensors"


#: Key that some MAISI checkpoints wrap their state dict in.
STATE_DICT_WRAPPER_KEY = "unet_state_dict"


class VAEError(WeightsError, RuntimeError):
    """The VAE cannot be loaded or saved; the message says what to do about it."""


def _channels_of(config: Mapping[str, Any]) -> list[int]:
    """Channel list of either class (MAISI calls it ``num_channels``, MONAI ``channels``)."""
    channels = config.get("num_channels", config.get("channels"))
    if channels is None:
        raise VAEError("VAE config has neither 'num_channels' nor 'channels'")
    return list(channels)


def remove_group_norms(network: nn.Module) -> nn.Module:
    """Replace every ``nn.GroupNorm`` of ``network`` by ``nn.Identity`` (in place); returns it."""
    for module in list(network.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(module, name, nn.Identity())
    return network


def build_vae(class_name: str, config: Mapping[str, Any], device: str | torch.device = "cpu",
              norm: str = "group") -> nn.Module:
    """Build an untrained network of a supported class.

    Args:
        class_name: ``"AutoencoderKlMaisi"`` or ``"AutoencoderKL"``.
        config: constructor keyword arguments. For MAISI, runtime options are replaced by
            :data:`MAISI_RUNTIME`.
        device: where the parameters go.
        norm: ``"group"`` (as built by MONAI) or ``"none"`` (GroupNorm layers removed).

    Returns:
        The module in eval mode on ``device``.
    """
    device = torch.device(device)
    kwargs = {k: v for k, v in config.items() if k not in MAISI_RUNTIME_KEYS}
    if class_name == "AutoencoderKlMaisi":
        from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

        factory: Any = AutoencoderKlMaisi
        kwargs = {**kwargs, **MAISI_RUNTIME}
    elif class_name == "AutoencoderKL":
        from monai.networks.nets import AutoencoderKL

        factory = AutoencoderKL
    else:
        raise VAEError(f"unsupported VAE class {class_name!r}; expected one of {SUPPORTED_CLASSES}")
    if norm not in NORMS:
        raise VAEError(f"unknown VAE norm {norm!r}; expected one of {NORMS}")
    try:
        network = factory(**kwargs)
    except (TypeError, ValueError) as exc:
        raise VAEError(f"cannot build {class_name} from config {dict(config)}: {exc}") from exc
    if norm == "none":
        remove_group_norms(network)
    return network.to(device).eval()


def _remap_legacy_keys(state: Mapping[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Rename old-layout keys (``...conv.weight`` -> ``...conv.conv.weight``) the model lacks.

    Only keys absent from the model whose renamed form the model has are touched, so a
    checkpoint already in the new layout passes through unchanged.
    """
    remapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new_key = key
        if key not in model_keys:
            for suffix in (".weight", ".bias"):
                stem = key[: -len(suffix)]
                if key.endswith(suffix) and stem.endswith("conv") and f"{stem}.conv{suffix}" in model_keys:
                    new_key = f"{stem}.conv{suffix}"
                    break
        remapped[new_key] = value
    return remapped


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a plain state dict (``.pt`` with ``weights_only=True``, or ``.safetensors``)."""
    return read_state_dict(path, what="VAE weights", error=VAEError, wrapper_key=STATE_DICT_WRAPPER_KEY)


def _load_weights(network: nn.Module, path: Path) -> None:
    """Load ``path`` into ``network`` strictly, after the legacy key remap."""
    load_strict(network, _remap_legacy_keys(_read_state_dict(path), set(network.state_dict())), path, error=VAEError)


_freeze = freeze
