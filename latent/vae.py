"""Load the frozen VAE: the released MAISI weights from the hub, a local MAISI file, or our own.

One entry point, :func:`load_vae`, turns a spec into a :class:`LoadedVAE` (frozen, eval mode):

- ``"maisi-ct"`` / ``"maisi-mr"``: MONAI ``AutoencoderKlMaisi`` with NVIDIA's released weights,
  fetched through ``huggingface_hub.hf_hub_download`` at a pinned revision (honours
  ``HF_HUB_OFFLINE`` and ``cache_dir``) and checked by SHA-256 *before* ``torch.load``.
- a local ``.pt`` / ``.safetensors`` file of the MAISI architecture (its SHA-256 is recorded; a
  file whose hash matches a registry entry is named after that entry).
- a directory written by :func:`save_vae_dir` (``config.json`` + ``model.safetensors``), e.g.
  the small VAE that ``latent vae fit`` trains when no MAISI weights are available offline.

Every failure a user can fix is a one-line :class:`VAEError`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from latent.hashing import sha256_file
from latent.errors import WeightsError

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


@dataclass(frozen=True)
class HubWeights:
    """One released VAE on the Hugging Face hub, pinned by revision and content hash."""

    repo_id: str
    filename: str
    revision: str
    sha256: str
    license: str
    class_name: str = "AutoencoderKlMaisi"
    config: Mapping[str, Any] = field(default_factory=lambda: dict(MAISI_CONFIG))
    layout: str = LAYOUT_MAISI


#: The registry of released weights. Read-only: a caller (or a test) that needs another entry
#: passes its own mapping to ``load_vae(..., registry=...)`` instead of mutating this one.
HUB_VAES: Mapping[str, HubWeights] = MappingProxyType(
    {
        "maisi-ct": HubWeights(
            repo_id="nvidia/NV-Generate-CT",
            filename="models/autoencoder_v1.pt",
            # Commit hash quoted (with this file's sha256) in a public project that pins it; it
            # could not be confirmed against the hub from this offline machine. The sha256 below
            # is what guarantees the content whatever the revision resolves to.
            revision="a481248bbd6462129efb2a3514e142bb95f87b25",
            sha256="1f8a7a056d0ebc00486edc43c26768bf1c12eaa6df9dd172e34598003be95eb3",
            license="NVIDIA Open Model License",
        ),
        "maisi-mr": HubWeights(
            repo_id="nvidia/NV-Generate-MR",
            filename="models/autoencoder_v2.pt",
            # No commit hash of this repository could be found offline, so the branch is pinned;
            # the sha256 check refuses any content other than the released file.
            revision="main",
            sha256="b5ed556dc64872cae11ebe67cc33e84fbd05ebdf7e35e40c74d956404e7c1ef0",
            license="NVIDIA non-commercial license",
        ),
    }
)


@dataclass(frozen=True)
class ShippedVAE:
    """A small pretrained VAE that ships inside the package, pinned by the SHA-256 of its two files."""

    folder: str
    weights_sha256: str
    config_sha256: str


#: Folder of the shipped weights inside the package.
SHIPPED_ROOT = Path(__file__).resolve().parent / "weights"
#: Shipped VAEs by ``--vae`` name. ``standin``: the demo's frozen stand-in for MAISI, trained
#: once on phantoms of a seed no test or demo uses (latent/weights/standin_vae/PROVENANCE.md).
SHIPPED_VAES: Mapping[str, ShippedVAE] = MappingProxyType(
    {
        "standin": ShippedVAE(
            folder="standin_vae",
            weights_sha256="fd436c2efe6a489e51a24b4ac82e61773db74baddb130c5318a5a7bba26eefdb",
            config_sha256="2ca658cced5f48491b5ac49b55e2e4f8da1027ca6f5a9b84a1715070fddaca0f",
        ),
    }
)


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
    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for a corrupt file
        first = (str(exc).strip().splitlines() or [""])[0]
        raise VAEError(f"cannot read VAE weights {path}: {type(exc).__name__}: {first}") from exc
    if isinstance(state, Mapping) and STATE_DICT_WRAPPER_KEY in state:
        state = state[STATE_DICT_WRAPPER_KEY]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VAEError(f"{path} does not hold a state dict of tensors")
    return dict(state)


def _load_weights(network: nn.Module, path: Path) -> None:
    """Load ``path`` into ``network`` strictly, after the legacy key remap."""
    model_keys = set(network.state_dict())
    state = _remap_legacy_keys(_read_state_dict(path), model_keys)
    missing = sorted(model_keys - set(state))
    unexpected = sorted(set(state) - model_keys)
    if missing or unexpected:
        raise VAEError(
            f"{path} does not match the {type(network).__name__} architecture: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shape mismatch: another channel configuration
        first = str(exc).strip().splitlines()[-1].strip()
        raise VAEError(f"{path} does not match the configured architecture: {first}") from exc


def _freeze(network: nn.Module) -> nn.Module:
    network.eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return network


def _offline_mode() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    import huggingface_hub.constants as hub_constants

    value = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return value in {"1", "ON", "YES", "TRUE"} or bool(hub_constants.HF_HUB_OFFLINE)


def _fetch_hub_weights(name: str, entry: HubWeights, cache_dir: str | None) -> Path:
    """Path of the hub file: the local hub cache first, then (unless ``HF_HUB_OFFLINE``) one
    quick request to the hub, then the download; any failure becomes one VAEError that says what
    to do. The hub client's own retries (about a minute of them) never run."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache

    cached = try_to_load_from_cache(entry.repo_id, entry.filename, cache_dir=cache_dir, revision=entry.revision)
    if isinstance(cached, str):
        return Path(cached)
    where = cache_dir or "the default hub cache (HF_HUB_CACHE)"
    advice = (f"on a connected machine run `hf download {entry.repo_id} {entry.filename} --revision "
              f"{entry.revision}` (older clients: `huggingface-cli download ...`) and copy the hub cache "
              f"here, or pass --vae /path/to/{Path(entry.filename).name}")
    if _offline_mode():
        raise VAEError(f"VAE weights {name!r} ({entry.repo_id}/{entry.filename}@{entry.revision}) are not in "
                       f"{where} and HF_HUB_OFFLINE is set; {advice}")
    try:
        get_hf_file_metadata(hf_hub_url(entry.repo_id, entry.filename, revision=entry.revision), timeout=10)
        path = hf_hub_download(repo_id=entry.repo_id, filename=entry.filename, revision=entry.revision,
                               cache_dir=cache_dir)
    except Exception as exc:  # no network, DNS, proxy, HTTP status: the hub client raises many kinds
        raise VAEError(
            f"VAE weights {name!r} ({entry.repo_id}/{entry.filename}@{entry.revision}) are not in "
            f"{where} and could not be downloaded ({type(exc).__name__}); {advice}"
        ) from exc
    return Path(path)


def _check_sha256(path: Path, expected: str) -> str:
    actual = sha256_file(path)
    if actual != expected:
        raise VAEError(
            f"SHA-256 mismatch for {path}: expected {expected}, got {actual}; delete the cached copy "
            f"({path.resolve()}) so it is downloaded again, or point --vae at a local copy of the released file"
        )
    return actual


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
            ``.pt`` / ``.safetensors`` file of the MAISI architecture, or a directory holding
            ``config.json`` + ``model.safetensors``.
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
    path = Path(spec).expanduser()
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
        return _load_directory(path, device)
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
    from safetensors.torch import save_file

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
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if not out_dir.exists():
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        try:
            save_file(state, str(staging / WEIGHTS_FILENAME))
            (staging / CONFIG_FILENAME).write_text(text)
            os.replace(staging, out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return out_dir
    for filename, write in (
        (WEIGHTS_FILENAME, lambda p: save_file(state, str(p))),
        (CONFIG_FILENAME, lambda p: p.write_text(text)),
    ):
        handle, tmp_name = tempfile.mkstemp(prefix=f".{filename}.", dir=out_dir)
        os.close(handle)
        try:
            write(Path(tmp_name))
            os.replace(tmp_name, out_dir / filename)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
    return out_dir
