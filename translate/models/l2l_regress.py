"""Latent-to-latent regression: one deterministic UNet pass, MR latent -> CT latent.

The network is the same MONAI ``DiffusionModelUNet`` the diffusion families use, run at a fixed
timestep 0, so regression and diffusion differ only in their objective (the cheapest latent
baseline, and a fair one). Its output convolution starts at zero, i.e. at the latent mean.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from latent.translate.models.base import TranslationModel
from latent.translate.models.l2l_ddim import LatentUNetConfig, check_latent_size, diffusion_unet


class LatentRegressionConfig(LatentUNetConfig):
    """Config of :class:`LatentRegression`."""

    family: Literal["l2l_regress"] = "l2l_regress"
    loss: Literal["l1", "mse"] = "l1"
    #: Weight the loss with ``mask_latent``: 1 inside the body, ``background_weight`` outside.
    mask_loss: bool = False
    background_weight: float = 0.1


def weighted_error(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                   kind: str) -> torch.Tensor:
    """Mean L1 / squared error, weighted voxel-wise when ``weight`` (B, 1, ...) is given (float32)."""
    error = (prediction.float() - target.float())
    error = error.abs() if kind == "l1" else error.square()
    if weight is None:
        return error.mean()
    weight = weight.float().expand_as(error)
    return (error * weight).sum() / weight.sum().clamp_min(1.0)


class LatentRegression(TranslationModel):
    """UNet(MR latent, t=0) -> standardised CT latent."""

    family: ClassVar[str] = "l2l_regress"
    config_class: ClassVar[type[LatentRegressionConfig]] = LatentRegressionConfig
    input_key: ClassVar[str] = "mr_mu"
    output_space: ClassVar[str] = "ct_latent"
    stochastic: ClassVar[bool] = False
    batch_keys: ClassVar[tuple[str, ...]] = ("mr_mu", "ct_mu", "mask_latent")

    def __init__(self, config: LatentRegressionConfig) -> None:
        super().__init__(config)
        channels = config.latent_channels
        self.unet = diffusion_unet(config, in_channels=channels, out_channels=channels)

    def _predict(self, mr_latent: torch.Tensor) -> torch.Tensor:
        timesteps = torch.zeros(mr_latent.shape[0], dtype=torch.long, device=mr_latent.device)
        return self.unet(mr_latent, timesteps)

    def forward(self, batch: dict[str, torch.Tensor], phase: str = "main") -> dict[str, torch.Tensor]:
        """Regression loss of the predicted ``ct_mu`` (optionally weighted by ``mask_latent``)."""
        mr_latent, ct_latent = batch["mr_mu"], batch["ct_mu"]
        check_latent_size(mr_latent, self.config, "mr_mu")
        prediction = self._predict(mr_latent)
        weight = None
        if self.config.mask_loss:
            mask = batch["mask_latent"].float()
            weight = mask + self.config.background_weight * (1.0 - mask)
        losses = {"loss": weighted_error(prediction, ct_latent, weight, self.config.loss)}
        if weight is not None:
            losses["l1_unweighted"] = weighted_error(prediction.detach(), ct_latent, None, "l1")
        return losses

    @torch.no_grad()
    def translate(self, inputs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """CT latents (B, 4, d, h, w) for MR latents (B, 4, d, h, w); ``generator`` is unused."""
        check_latent_size(inputs, self.config, "mr_mu")
        return self._predict(inputs).float()
