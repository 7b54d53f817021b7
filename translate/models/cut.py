"""CUT (contrastive unpaired translation) sCT baseline: one generator, PatchNCE + GAN.

Views are unpaired as in CycleGAN (``PixelGAN.sample_views``). Generator loss::

    lambda_gan * GAN(D(G(mr))) + lambda_nce * (NCE(mr, G(mr)) + NCE(ct, G(ct))) / 2
    + lambda_bg * L1_outside_mask(G(mr), air)

NCE(x, y): the generator's own encoder (input and every level of the MONAI UNet's down path,
chosen by ``nce_layers``) encodes x and y; ``nce_patches`` random locations per layer go
through a per-layer MLP head and each output patch must identify the input patch at the
same location among the image's other locations (softmax at ``nce_temperature``). The second
term (``nce_identity``) is CUT's identity NCE on CT -> CT. In 2.5D the generator maps k slices
to k slices so outputs can be re-encoded; translation keeps the centre slice.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import model_validator

from latent.translate.models.gan_common import (
    AIR_SIGNED,
    WATER_SIGNED,
    PixelGAN,
    PixelGANConfig,
    TanhUNet,
)
from latent.translate.models.gan_losses import (
    NCE_TEMPERATURE,
    AdversarialLoss,
    PatchProjector,
    background_l1,
    discriminator_logits,
    frozen,
    intensity_drift,
    patch_nce_loss,
)


class CUTConfig(PixelGANConfig):
    """CUT recipe (lr 2e-4, betas (0.5, 0.999), LSGAN, lambda_nce 1, T 0.07, 256 patches).

    Attributes:
        nce_layers: encoder layers tapped (0 = input, i = output of the i-th down block;
            ``len(channels)`` is the bottom block).
        nce_patches: locations sampled per layer and image.
        nce_dim: MLP projection size.
        nce_identity: add the identity NCE on CT -> CT (CUT; FastCUT switches it off).
    """

    family: Literal["cut"] = "cut"
    lambda_gan: float = 1.0
    lambda_nce: float = 1.0
    lambda_bg: float = 0.0
    nce_layers: tuple[int, ...] = (0, 1, 2, 3, 4)
    nce_patches: int = 256
    nce_dim: int = 256
    nce_temperature: float = NCE_TEMPERATURE
    nce_identity: bool = True

    @model_validator(mode="after")
    def _layers_exist(self) -> "CUTConfig":
        deepest = len(self.channels)
        if not self.nce_layers or any(layer < 0 or layer > deepest for layer in self.nce_layers):
            raise ValueError(f"nce_layers: {list(self.nce_layers)} must be non-empty and within 0..{deepest} "
                             f"(the generator has {deepest} encoder blocks)")
        if len(set(self.nce_layers)) != len(self.nce_layers) or list(self.nce_layers) != sorted(self.nce_layers):
            raise ValueError(f"nce_layers: must be increasing without repeats, got {list(self.nce_layers)}")
        if self.nce_patches < 1:
            raise ValueError(f"nce_patches: must be >= 1, got {self.nce_patches}")
        return self


class CUT(PixelGAN):
    """Unpaired MR -> CT translation with patchwise contrastive learning."""

    family: ClassVar[str] = "cut"
    config_class = CUTConfig

    def __init__(self, config: CUTConfig) -> None:
        super().__init__(config)
        depth = config.stack_depth
        self.generator = TanhUNet(config, depth, depth, initial_output=WATER_SIGNED)
        self.projector = PatchProjector([self.generator.encoder_channels[layer] for layer in config.nce_layers],
                                        config.nce_dim)
        self.discriminator = self.make_discriminator(depth)
        self.adversarial = AdversarialLoss(config.gan_criterion)
        self.output_channel = depth // 2

    def phase_parameters(self, phase: str) -> list[torch.nn.Parameter]:
        """Generator + projection heads for ``"generator"``, the discriminator for ``"discriminator"``."""
        if phase == "generator":
            return [*self.generator.parameters(), *self.projector.parameters()]
        if phase == "discriminator":
            return list(self.discriminator.parameters())
        raise ValueError(f"unknown phase {phase!r}; CUT has {self.phases}")

    def forward(self, batch: dict[str, torch.Tensor], phase: str = "generator") -> dict[str, torch.Tensor]:
        """Losses of one phase; ``loss`` is back-propagated."""
        if phase == "generator":
            return self._generator_losses(batch)
        if phase == "discriminator":
            return self._discriminator_losses(batch)
        raise ValueError(f"unknown phase {phase!r}; CUT has {self.phases}")

    def nce(self, source: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """PatchNCE between a generator input and its output, averaged over ``nce_layers``."""
        config: CUTConfig = self.config
        with torch.no_grad():  # keys are detached in PatchNCE: no graph needed
            keys, ids = self.projector(self.generator.encode(source, config.nce_layers), config.nce_patches)
        queries, _ = self.projector(self.generator.encode(output, config.nce_layers), config.nce_patches, ids)
        losses = [patch_nce_loss(query, key, config.nce_temperature) for query, key in zip(queries, keys)]
        return torch.stack(losses).mean()

    def _generator_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        config: CUTConfig = self.config
        views = self.sample_views(batch, paired=False)
        mr, ct = views["mr"], views["ct"]
        self.check_view(mr)
        self.count_step()
        fake = self.generator(mr)
        with frozen(self.discriminator):
            gan = self.adversarial.generator(discriminator_logits(self.discriminator(fake)))
        nce = self.nce(mr, fake)
        logs = {"gan": gan.detach(), "nce": nce.detach(),
                **intensity_drift(fake, mr, views["mask"], ct, views["ct_mask"])}
        if config.nce_identity:
            nce_identity = self.nce(ct, self.generator(ct))
            logs["nce_identity"] = nce_identity.detach()
            nce = 0.5 * (nce + nce_identity)
        loss = config.lambda_gan * gan + config.lambda_nce * nce
        if config.lambda_bg > 0:
            background = background_l1(fake, views["mask"], AIR_SIGNED)
            loss = loss + config.lambda_bg * background
            logs["background"] = background.detach()
        self.stash(batch, ct=ct, fake=fake)
        return {"loss": loss, **logs}

    def _discriminator_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        stashed = self.stashed_or_regenerated(batch, lambda views: {"ct": views["ct"], "fake": self.generator(views["mr"])})
        loss = self.adversarial.discriminator(discriminator_logits(self.discriminator(stashed["ct"])),
                                              discriminator_logits(self.discriminator(stashed["fake"])))
        return {"loss": loss}
