"""Load the frozen VAE: the released MAISI weights from the hub, a local MAISI file, or our own.

One entry point, :func:`load_vae`, turns a spec into a :class:`LoadedVAE` (frozen, eval mode):

- ``"maisi-ct"`` / ``"maisi-mr"``: MONAI ``AutoencoderKlMaisi`` with NVIDIA's released weights,
  fetched through ``huggingface_hub.hf_hub_download`` at a pinned revision (honours
  ``HF_HUB_OFFLINE`` and ``cache_dir``) and checked by SHA-256 *before* ``torch.load``.
- a local ``.pt`` / ``.safetensors`` file of the MAISI architecture (its SHA-256 is recorded; a
  file whose hash matches a registry entry is named after that entry).
- a directory written by :func:`save_vae_dir` (``config.json`` + ``model.safetensors``, the
  project's one model format, :mod:`latent.core.model_folder`), e.g. the small VAE that
  ``latent vae fit`` trains when no MAISI weights are available offline, or such a folder
  pushed to the hub, as ``hf://owner/name[@revision]``.

Every failure a user can fix is a one-line :class:`VAEError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latent.core.hashing import sha256_file
from latent.core.model_folder import is_hub_spec, resolve_folder, write_model_folder
from latent.core.vae.network import (
    CONFIG_FILENAME, LAYOUT_CANONICAL, LAYOUT_MAISI, LAYOUTS, MAISI_CONFIG, MAISI_RUNTIME, MAISI_RUNTIME_KEYS, NORMS,
    STATE_DICT_WRAPPER_KEY, SUPPORTED_CLASSES, WEIGHTS_FILENAME, VAEError, _channels_of, _freeze, _load_weights,
    build_vae, remove_group_norms,
)
from latent.core.vae.sources import (
    HUB_VAES, SHIPPED_ROOT, SHIPPED_VAES, HubWeights, ShippedVAE, _check_sha256, _fetch_hub_weights,
)

#: Re-exported: the whole VAE API stays importable from ``latent.core.vae.loading``.
__all__ = [
    "CONFIG_FILENAME", "HUB_VAES", "LAYOUT_CANONICAL", "LAYOUT_MAISI", "LAYOUTS", "MAISI_CONFIG", "MAISI_RUNTIME",
    "MAISI_RUNTIME_KEYS", "NORMS", "SHIPPED_ROOT", "SHIPPED_VAES", "STATE_DICT_WRAPPER_KEY", "SUPPORTED_CLASSES",
    "WEIGHTS_FILENAME", "HubWeights", "LoadedVAE", "ShippedVAE", "VAEError", "build_vae", "load_vae",
    "remove_group_norms", "save_vae_dir", "sha256_file",
]
















@dataclass
class LoadedVAE:
    """A frozen, eval-mode VAE with what identifies it.

    Attributes:
        network: the ``AutoencoderKlMaisi`` / ``AutoencoderKL`` module (``encode`` returns
            ``(z_mu, z_sigma)``, ``decode`` maps a latent back to an image).
        name: registry name (``maisi-ct``), or a name for a local file / directory.
        class_name: network class name.
        config: architecture keyword arguments (runtime-only MAISI options excluded).
        weights_sha256: SHA-256 of the weights file the parameters came from.
        layout: array layout the weights expect (``zyx_lps`` or ``xyz_ras``).
        source: where the weights were read from.
        inference_tile: window (z, y, x) the VAE must be run with, for a VAE trained on crops
            of that size (its GroupNorm statistics are those of the window); ``None`` = any.
        norm: ``"group"`` (MONAI's GroupNorm layers) or ``"none"`` (removed: no statistics).
    """

    network: nn.Module
    name: str
    class_name: str
    config: dict[str, Any]
    weights_sha256: str
    layout: str = LAYOUT_CANONICAL
    source: str = ""
    inference_tile: tuple[int, int, int] | None = None
    norm: str = "group"

    @property
    def latent_channels(self) -> int:
        """Number of latent channels (4 for MAISI)."""
        return int(self.config["latent_channels"])

    @property
    def downsample_factor(self) -> int:
        """Image size / latent size along every axis."""
        return 2 ** (len(_channels_of(self.config)) - 1)

    @property
    def device(self) -> torch.device:
        """Device the parameters live on."""
        return next(self.network.parameters()).device

    def producer_info(self) -> dict[str, Any]:
        """What produced a latent: used by the latent cache to key its entries.

        Returns:
            JSON-serialisable dict with ``name``, ``class_name``, ``config`` (architecture),
            ``layout``, ``inference_tile`` and ``weights_sha256``.
        """
        info = {
            "name": self.name,
            "class_name": self.class_name,
            "config": json.loads(json.dumps(self.config)),
            "layout": self.layout,
            "inference_tile": None if self.inference_tile is None else list(self.inference_tile),
            "weights_sha256": self.weights_sha256,
            # Where the weights were read from: kept by the cache as location, not hashed, so a
            # trained run can reload its VAE without being told.
            "path": str(Path(self.source).resolve()) if self.source and Path(self.source).exists() else self.source,
        }
        if self.norm != "group":  # absent for GroupNorm VAEs, so their producer keys stay as they were
            info["norm"] = self.norm
        return info






















def _check_inference_tile(tile: Any, kwargs: Mapping[str, Any], where: object) -> tuple[int, int, int] | None:
    if tile is None:
        return None
    factor = 2 ** (len(_channels_of(kwargs)) - 1)
    if not (isinstance(tile, (list, tuple)) and len(tile) == 3 and all(isinstance(t, int) for t in tile)) or any(
        t <= 0 or t % factor for t in tile
    ):
        raise VAEError(f"{where}: inference_tile {tile!r} must be three positive multiples of {factor}")
    return (int(tile[0]), int(tile[1]), int(tile[2]))


def _load_shipped(name: str, entry: ShippedVAE, root: Path, device: str | torch.device) -> LoadedVAE:
    """Load a shipped VAE after checking both of its files against the pinned hashes."""
    directory = root / entry.folder
    for filename, expected in ((WEIGHTS_FILENAME, entry.weights_sha256), (CONFIG_FILENAME, entry.config_sha256)):
        path = directory / filename
        if not path.is_file():
            raise VAEError(f"shipped VAE {name!r}: {path} is missing; reinstall the package (or `git checkout` it)")
        actual = sha256_file(path)
        if actual != expected:
            raise VAEError(f"shipped VAE {name!r}: SHA-256 mismatch for {path} (expected {expected[:16]}..., got "
                           f"{actual[:16]}...): the file was altered or damaged; reinstall the package or `git checkout` it")
    loaded = _load_directory(directory, device)
    loaded.name = name
    return loaded


def _load_directory(directory: Path, device: str | torch.device) -> LoadedVAE:
    config_path, weights_path = directory / CONFIG_FILENAME, directory / WEIGHTS_FILENAME
    if not config_path.is_file() or not weights_path.is_file():
        raise VAEError(f"{directory} is not a VAE directory: it needs {CONFIG_FILENAME} and {WEIGHTS_FILENAME}")
    try:
        saved = json.loads(config_path.read_text())
        class_name, kwargs = saved["class_name"], dict(saved["kwargs"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise VAEError(f"{config_path} is not a VAE config ({{'class_name', 'kwargs'}} expected): {exc}") from exc
    layout = saved.get("layout", LAYOUT_CANONICAL)
    if layout not in LAYOUTS:
        raise VAEError(f"{config_path}: layout {layout!r} is not one of {LAYOUTS}")
    tile = _check_inference_tile(saved.get("inference_tile"), kwargs, config_path)
    norm = saved.get("norm", "group")
    if norm not in NORMS:
        raise VAEError(f"{config_path}: norm {norm!r} is not one of {NORMS}")
    network = build_vae(class_name, kwargs, device, norm=norm)
    _load_weights(network, weights_path)
    return LoadedVAE(
        network=_freeze(network),
        name=str(saved.get("name") or directory.resolve().name),
        class_name=class_name,
        config={k: v for k, v in kwargs.items() if k not in MAISI_RUNTIME_KEYS},
        weights_sha256=sha256_file(weights_path),
        layout=layout,
        source=str(directory),
        inference_tile=tile,
        norm=norm,
    )


def run_model_folder(path: Path) -> Path:
    """The model folder of a VAE directory: ``best/`` of a VAE run (``latent vae fit``, ``latent
    train`` on a VAE recipe), or the directory itself (a model folder, or a VAE fitted by an
    earlier version, whose weights sit at the top)."""
    if (path / "best" / CONFIG_FILENAME).is_file():
        return path / "best"
    return path


def load_vae(
    spec: str,
    *,
    cache_dir: str | None = None,
    device: str | torch.device = "cpu",
    config: Mapping[str, Any] | None = None,
    registry: Mapping[str, HubWeights] | None = None,
    shipped: Mapping[str, ShippedVAE] | None = None,
    shipped_root: Path | None = None,
) -> LoadedVAE:
    """Load a frozen VAE from a registry name, a shipped name, a local MAISI weights file or a VAE directory.

    Args:
        spec: ``"maisi-ct"``, ``"maisi-mr"`` (or another key of ``registry``), ``"standin"`` (a
            key of ``shipped``: the small pretrained VAE inside the package, SHA-256 checked), a
            ``.pt`` / ``.safetensors`` file of the MAISI architecture, a directory holding
            ``config.json`` + ``model.safetensors``, or a VAE run folder (its ``best/``).
        cache_dir: hub cache folder (default: huggingface_hub's, i.e. ``HF_HUB_CACHE``).
            ``HF_HUB_OFFLINE=1`` makes the hub path use the cache only.
        device: device for the network.
        config: MAISI architecture kwargs replacing the released ones (registry names and local
            files only; a directory carries its own).
        registry: hub entries to resolve names against (default :data:`HUB_VAES`).
        shipped / shipped_root: shipped entries and their folder (default :data:`SHIPPED_VAES`
            in :data:`SHIPPED_ROOT`).

    Returns:
        A :class:`LoadedVAE` in eval mode with gradients off.

    Raises:
        VAEError: unknown spec, weights not cached and not downloadable, SHA-256 mismatch, or
            weights that do not fit the architecture.
    """
    registry = HUB_VAES if registry is None else registry
    shipped = SHIPPED_VAES if shipped is None else shipped
    path = resolve_folder(spec, cache_dir) if is_hub_spec(spec) else Path(spec).expanduser()
    if spec in shipped:
        if config is not None:
            raise VAEError(f"the shipped VAE {spec!r} carries its own {CONFIG_FILENAME}; do not pass a config with it")
        return _load_shipped(spec, shipped[spec], SHIPPED_ROOT if shipped_root is None else shipped_root, device)
    if spec in registry:
        entry = registry[spec]
        weights_path = _fetch_hub_weights(spec, entry, cache_dir)
        digest = _check_sha256(weights_path, entry.sha256)
        class_name, kwargs, layout, name = entry.class_name, dict(config or entry.config), entry.layout, spec
    elif path.is_dir():
        if config is not None:
            raise VAEError(f"{path} carries its own {CONFIG_FILENAME}; do not pass a config with it")
        loaded = _load_directory(run_model_folder(path), device)
        if is_hub_spec(spec):  # runs record the hub spec, which works on any machine, not the cache path
            loaded = dataclasses.replace(loaded, source=str(spec))
        return loaded
    elif path.is_file() and (path.suffix == ".pt" or path.name.endswith(".safetensors")):
        weights_path, digest = path, sha256_file(path)
        known = [key for key, entry in registry.items() if entry.sha256 == digest]
        class_name, kwargs, layout = "AutoencoderKlMaisi", dict(config or MAISI_CONFIG), LAYOUT_MAISI
        name = known[0] if known else f"maisi-local-{digest[:12]}"
    else:
        what = "does not exist" if not path.exists() else "is neither a .pt/.safetensors file nor a VAE directory"
        raise VAEError(f"VAE spec {spec!r} {what}; use one of {sorted({*registry, *shipped})}, a weights file or a "
                       "VAE directory")
    network = build_vae(class_name, kwargs, device)
    _load_weights(network, weights_path)
    return LoadedVAE(
        network=_freeze(network),
        name=name,
        class_name=class_name,
        config={k: v for k, v in kwargs.items() if k not in MAISI_RUNTIME_KEYS},
        weights_sha256=digest,
        layout=layout,
        source=str(weights_path),
    )


def save_vae_dir(model: nn.Module, config: Mapping[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``model.safetensors`` so that ``load_vae(out_dir)`` rebuilds ``model``.

    Args:
        model: an ``AutoencoderKL`` / ``AutoencoderKlMaisi`` (unwrapped, any device).
        config: ``{"class_name": ..., "kwargs": {...}}`` plus optional ``"layout"`` (default
            ``zyx_lps``), ``"name"`` and ``"inference_tile"`` (the crop size a VAE was trained
            on); ``class_name`` must be the class of ``model``.
        out_dir: target directory. A new directory appears complete (written under a temporary
            name, then renamed); in an existing one each file is replaced atomically, weights
            first, config last.

    Returns:
        ``out_dir`` as a Path.
    """
    out_dir = Path(out_dir)
    class_name = config.get("class_name")
    if class_name != type(model).__name__:
        raise VAEError(f"config class_name {class_name!r} does not match the model class {type(model).__name__}")
    layout = config.get("layout", LAYOUT_CANONICAL)
    if layout not in LAYOUTS:
        raise VAEError(f"layout {layout!r} is not one of {LAYOUTS}")
    payload = {
        "class_name": class_name,
        "kwargs": {k: v for k, v in dict(config["kwargs"]).items() if k not in MAISI_RUNTIME_KEYS},
        "layout": layout,
    }
    tile = _check_inference_tile(config.get("inference_tile"), payload["kwargs"], "save_vae_dir")
    if tile is not None:
        payload["inference_tile"] = list(tile)
    if config.get("name"):
        payload["name"] = str(config["name"])
    norm = config.get("norm", "group")
    if norm not in NORMS:
        raise VAEError(f"norm {norm!r} is not one of {NORMS}")
    if norm != "group":
        payload["norm"] = norm
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    return write_model_folder(out_dir, payload, state)
