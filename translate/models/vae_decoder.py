"""The exact decode path of the VAE that produced a cache, as a trainable module.

A VAE decodes a latent with ``post_quant_conv`` and then its ``decoder``. :class:`ExactDecoder`
holds exactly those two modules, built by the VAE's own class (``AutoencoderKL`` or
``AutoencoderKlMaisi``) from its own configuration, normalisation (GroupNorm or none) and array
layout, with the VAE's weights copied in, and nothing of the encoder. Fed the cache's
standardised CT latent it returns what ``latent.core.vae.inference.decode`` returns for the
destandardised latent (docs/models.md, "l2sct"): the point of the latent route is to start from
what the foundation model already knows.

:class:`DecoderRecord` is what a saved model keeps of the VAE (architecture, layout, weights
hash, where it came from): enough to rebuild the module before its state dict is loaded, so a
trained model never needs the VAE's files again.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from latent.core.errors import BadConfigError
from latent.translate.models.base import ModelConfig
from latent.core.vae.loading import LoadedVAE, build_vae, load_vae
from latent.core.vae.inference import decode as tiled_decode
from latent.core.vae.inference import from_network_layout, to_network_layout

#: Parts of an AutoencoderKL-family network that only encoding uses (dropped from the copy).
ENCODER_PARTS = ("encoder", "quant_conv_mu", "quant_conv_log_sigma")


class DecoderRecord(BaseModel):
    """What a model keeps of the VAE whose decode path it holds."""

    model_config = ConfigDict(extra="forbid")
    class_name: str
    kwargs: dict[str, Any]
    norm: str = "group"
    layout: str = "zyx_lps"
    weights_sha256: str
    #: The spec the weights were read from (provenance only; the weights travel in the state dict).
    source: str = ""
    inference_tile: tuple[int, int, int] | None = None


class ExactDecoderFields(ModelConfig):
    """Config fields of a family on the exact decode path, and its full-range pixel loss."""

    #: VAE whose decode path to copy (any --vae spec); None = the cache producer's VAE.
    vae: str | None = None
    #: Weights SHA-256 the VAE must have (the cache producer's; set by training).
    vae_sha256: str | None = None
    #: The copied VAE's architecture and provenance (set when built; the weights are in the state dict).
    vae_decoder: DecoderRecord | None = None
    #: Per-channel statistics the cache standardised ``ct_mu`` with (set by training from the cache).
    ct_latent_mean: tuple[float, ...] | None = None
    ct_latent_std: tuple[float, ...] | None = None
    #: Weight of the L1 to air outside the body mask.
    background_weight: float = Field(0.1, ge=0.0)
    #: Weight of the L1 between finite-difference gradients of sCT and CT inside the mask.
    gradient_weight: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _check_stats(self) -> "ExactDecoderFields":
        if (self.ct_latent_mean is None) != (self.ct_latent_std is None):
            raise ValueError("ct_latent_std: give both ct_latent_mean and ct_latent_std, or neither")
        return self


def record_of(vae: LoadedVAE) -> DecoderRecord:
    """The :class:`DecoderRecord` of a loaded VAE."""
    info = vae.producer_info()
    return DecoderRecord(class_name=vae.class_name, kwargs=dict(vae.config), norm=vae.norm, layout=vae.layout,
                         weights_sha256=vae.weights_sha256, source=str(info.get("path") or vae.source or vae.name),
                         inference_tile=vae.inference_tile)


def load_decoder_source(spec: str, expected_sha256: str | None = None) -> LoadedVAE:
    """Load the VAE ``spec`` (any ``--vae`` form: ``standin``, ``maisi-ct``, a file, a folder, ``hf://``).

    Raises:
        BadConfigError: the spec cannot be loaded, or its weights differ from ``expected_sha256``
            (the cache's producer), naming the field ``model.vae``.
    """
    try:
        vae = load_vae(spec)
    except (OSError, ValueError, RuntimeError) as error:
        raise BadConfigError(f"model.vae: {error}") from None
    if expected_sha256 and vae.weights_sha256 != expected_sha256:
        raise BadConfigError(f"model.vae: {spec} has weights sha256 {vae.weights_sha256[:12]}..., but the cache's "
                             f"latents were encoded by {expected_sha256[:12]}...; decode with the cache's own VAE")
    return vae


def producer_update(config: Any, producer: dict[str, Any]) -> dict[str, Any]:
    """Config fields a family on the exact decode path takes from the cache's producer: the VAE
    (``vae``, unless set), its weights hash (``vae_sha256``) and the ``ct_mu`` statistics."""
    if config.vae_decoder is not None:
        return {}
    record = producer.get("record") or {}
    location = record.get("vae_location") or {}
    update: dict[str, Any] = {}
    if config.vae is None:
        update["vae"] = location.get("path") or location.get("name")
    if config.vae_sha256 is None and record.get("vae_weights_sha256"):
        update["vae_sha256"] = record["vae_weights_sha256"]
    stats = (producer.get("latent_stats") or {}).get("ct_mu")
    if stats and config.ct_latent_mean is None:
        update.update(ct_latent_mean=tuple(stats["mean"]), ct_latent_std=tuple(stats["std"]))
    return update


def resolve_source(config: Any, what: str) -> tuple[Any, LoadedVAE | None]:
    """``(config with vae_decoder recorded, the loaded VAE)`` when the weights are still to be copied
    from ``config.vae``; ``(config, None)`` when the config already records them (a saved model).

    Raises:
        BadConfigError: no VAE named (``model.vae``).
    """
    if config.vae_decoder is not None:
        return config, None
    if config.vae is None:
        raise BadConfigError(f"model.vae: {what} needs the VAE that encoded the latents (train on a cache, which "
                             "names it, or set model.vae)")
    vae = load_decoder_source(config.vae, config.vae_sha256)
    return config.model_copy(update={"vae_decoder": record_of(vae)}), vae


class ExactDecoder(nn.Module):
    """``post_quant_conv`` + ``decoder`` of a VAE: standardised latent -> VAE units (unclipped).

    Args:
        record: the VAE's architecture, normalisation and layout.
        mean / std: per-channel statistics the latents were standardised with (``None``: the
            latents are raw VAE latents).
        source: a loaded VAE whose decode weights to copy (its record must be ``record``).
    """

    def __init__(self, record: DecoderRecord, mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None, source: LoadedVAE | None = None) -> None:
        super().__init__()
        self.record = record
        network = build_vae(record.class_name, record.kwargs, norm=record.norm)
        for part in ENCODER_PARTS:
            if getattr(network, part, None) is not None:
                setattr(network, part, None)
        self.network = network
        channels = int(record.kwargs["latent_channels"])
        mean_t = torch.zeros(channels) if mean is None else torch.tensor(mean, dtype=torch.float32)
        std_t = torch.ones(channels) if std is None else torch.tensor(std, dtype=torch.float32)
        if mean_t.numel() != channels or std_t.numel() != channels:
            raise BadConfigError(f"model.ct_latent_stats: {mean_t.numel()} statistics for {channels} latent channels")
        self.register_buffer("latent_mean", mean_t.reshape(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("latent_std", std_t.reshape(1, -1, 1, 1, 1), persistent=False)
        if source is not None:
            self.copy_from(source)

    def copy_from(self, vae: LoadedVAE) -> int:
        """Copy the VAE's ``post_quant_conv`` and ``decoder`` weights; returns the number of tensors."""
        own = self.network.state_dict()
        theirs = {k: v for k, v in vae.network.state_dict().items() if k in own}
        missing = sorted(set(own) - set(theirs))
        if missing:
            raise BadConfigError(f"model.vae: {vae.name} lacks decode tensors {missing[:3]}...")
        self.network.load_state_dict({k: v.detach().clone().to(own[k].dtype) for k, v in theirs.items()})
        return len(theirs)

    def raw_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Standardised latent -> the latent the VAE decodes."""
        return latent * self.latent_std.to(latent.dtype) + self.latent_mean.to(latent.dtype)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, C, d, h, w) standardised latent, canonical layout -> (B, 1, 4d, 4h, 4w) VAE units."""
        layout = self.record.layout
        image = self.network.decode(to_network_layout(self.raw_latent(latent), layout))
        return from_network_layout(image, layout)

    def as_loaded_vae(self) -> LoadedVAE:
        """This decode path as a :class:`LoadedVAE` (for ``latent.core.vae.inference.decode``'s tiling)."""
        record = self.record
        return LoadedVAE(network=self.network, name="exact-decoder", class_name=record.class_name,
                         config=dict(record.kwargs), weights_sha256=record.weights_sha256, layout=record.layout,
                         source=record.source, inference_tile=record.inference_tile, norm=record.norm)

    @torch.no_grad()
    def decode_volume(self, latent: torch.Tensor, standardised: bool = True) -> torch.Tensor:
        """Whole-volume decode through the tiling plan of ``latent.core.vae.inference.decode`` (no
        convolution over the 32-bit activation limit at full size); same values as :meth:`forward`.
        ``standardised=False``: ``latent`` is already in the VAE's own scale (a cached ``ct_mu``)."""
        latent = latent.float()
        return tiled_decode(self.as_loaded_vae(), self.raw_latent(latent) if standardised else latent)
