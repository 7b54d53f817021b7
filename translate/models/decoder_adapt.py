"""The VAE's decode path adapted to full-range CT: cached CT latent -> CT over [-1024, 3071] HU.

The frozen VAE decodes into its window ([-1000, 1000] HU) and blurs what its latent keeps. This
family fine-tunes only the decode path (``post_quant_conv`` + ``decoder``, the exact module of
:mod:`latent.translate.models.vae_decoder`) on the training split's cached CT latents against
the full-range CT, with the same fixed head as ``l2sct`` (VAE units -> full range, unclipped, so
bone above 1000 HU becomes reachable). The encoder and the cache are untouched, so every latent
route can decode through the result (``latent predict --decoder``), ``latent vae check
--decoder`` scores its floor, and ``l2sct`` can start from it (``init_decoder_from``).
``latent vae adapt`` trains it in the project's training loop.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from latent.translate.models.base import TranslationModel
from latent.translate.models.l2sct import VAE_TO_FULL_OFFSET, VAE_TO_FULL_SCALE, full_range_loss
from latent.translate.models.vae_decoder import ExactDecoder, ExactDecoderFields, producer_update, resolve_source


class DecoderAdaptConfig(ExactDecoderFields):
    """Config of :class:`DecoderAdapt` (the fields of ``l2sct``'s exact decoder and loss)."""

    family: Literal["decoder_adapt"] = "decoder_adapt"


class DecoderAdapt(TranslationModel):
    """Standardised CT latent -> full-range CT through the VAE's own (fine-tuned) decode path."""

    family: ClassVar[str] = "decoder_adapt"
    config_class: ClassVar[type[DecoderAdaptConfig]] = DecoderAdaptConfig
    input_key: ClassVar[str] = "ct_mu"
    output_space: ClassVar[str] = "ct_full"
    stochastic: ClassVar[bool] = False
    batch_keys: ClassVar[tuple[str, ...]] = ("ct_mu", "ct_pixels", "mask_pixels")

    def __init__(self, config: DecoderAdaptConfig) -> None:
        config, vae = resolve_source(config, "an adapted decoder")
        super().__init__(config)
        self.vae_decode = ExactDecoder(config.vae_decoder, config.ct_latent_mean, config.ct_latent_std, source=vae)

    @classmethod
    def for_producer(cls, config: DecoderAdaptConfig, producer: dict[str, Any]) -> DecoderAdaptConfig:
        """The cache's VAE, its weights hash and the ``ct_mu`` statistics."""
        update = producer_update(config, producer)
        return config.model_copy(update=update) if update else config

    def forward(self, batch: dict[str, torch.Tensor], phase: str = "main") -> dict[str, torch.Tensor]:
        """Masked L1 against the full-range ``ct_pixels`` + background (+ gradient) terms."""
        prediction = VAE_TO_FULL_SCALE * self.vae_decode(batch["ct_mu"]).float() + VAE_TO_FULL_OFFSET
        return full_range_loss(prediction, batch, self.config)

    @torch.no_grad()
    def translate(self, inputs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Full-range CT in [-1, 1] (clipped) for standardised CT latents, through the VAE's tiling plan."""
        return self.decode_raw_latent(self.vae_decode.raw_latent(inputs.float()))

    @torch.no_grad()
    def decode_raw_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Full-range CT in [-1, 1] for latents in the VAE's own scale (what the VAE's ``decode`` takes)."""
        vae_units = self.vae_decode.decode_volume(latent, standardised=False)
        return (VAE_TO_FULL_SCALE * vae_units + VAE_TO_FULL_OFFSET).clamp(-1.0, 1.0)
