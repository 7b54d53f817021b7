"""CycleGAN sCT baseline: two residual U-Net generators, two PatchGANs, unpaired views.

Views are unpaired on purpose (see ``PixelGAN.sample_views``): every MR view meets the CT of
another case of the batch (``torch.roll``), or other slices / places of the same case when the
batch holds one case, so the objective never sees an aligned pair. Generator loss::

    lambda_gan * (GAN_ct(G(mr)) + GAN_mr(F(ct)))
    + lambda_cycle * (|F(G(mr)) - mr| + |G(F(ct)) - ct|)
    + lambda_cycle * lambda_identity * (|G(ct) - ct| + |F(mr) - mr|)
    + lambda_bg * L1_outside_mask(G(mr), air)

with G: MR -> CT, F: CT -> MR, LSGAN by default. In 2.5D both generators map k slices to k
slices (so cycles and discriminators see whole stacks); translation keeps the centre slice.
MR targets are clipped to [-1, 1] (tanh range), so the MR discriminator cannot tell real from
fake by the few voxels above the 99.5th percentile. No image history pool (a simplification
of the original recipe).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from latent.translate.models.gan_common import (
    AIR_SIGNED,
    WATER_SIGNED,
    PixelGAN,
    PixelGANConfig,
    TanhUNet,
)
from latent.translate.models.gan_losses import (
    AdversarialLoss,
    background_l1,
    discriminator_logits,
    frozen,
    intensity_drift,
)


class CycleGANConfig(PixelGANConfig):
    """CycleGAN recipe (lr 2e-4, betas (0.5, 0.999), LSGAN, cycle weight 10).

    Attributes:
        lambda_gan: weight of each adversarial term.
        lambda_cycle: weight of each cycle-consistency L1.
        lambda_identity: identity L1 weight relative to ``lambda_cycle`` (0 switches it off).
        lambda_bg: weight of the L1 to air outside the MR's own body mask (unpaired-safe; 0: off).
    """

    family: Literal["cyclegan"] = "cyclegan"
    lambda_gan: float = 1.0
    lambda_cycle: float = 10.0
    lambda_identity: float = 0.5
    lambda_bg: float = 0.0


class CycleGAN(PixelGAN):
    """Unpaired MR <-> CT translation; :meth:`translate` runs the MR -> CT generator."""

    family: ClassVar[str] = "cyclegan"
    config_class = CycleGANConfig

    def __init__(self, config: CycleGANConfig) -> None:
        super().__init__(config)
        depth = config.stack_depth
        self.generator = TanhUNet(config, depth, depth, initial_output=WATER_SIGNED)
        self.generator_ct_to_mr = TanhUNet(config, depth, depth, initial_output=0.0)
        self.discriminator_ct = self.make_discriminator(depth)
        self.discriminator_mr = self.make_discriminator(depth)
        self.adversarial = AdversarialLoss(config.gan_criterion)
        self.output_channel = depth // 2

    def phase_parameters(self, phase: str) -> list[torch.nn.Parameter]:
        """Both generators for ``"generator"``, both discriminators for ``"discriminator"``."""
        if phase == "generator":
            return [*self.generator.parameters(), *self.generator_ct_to_mr.parameters()]
        if phase == "discriminator":
            return [*self.discriminator_ct.parameters(), *self.discriminator_mr.parameters()]
        raise ValueError(f"unknown phase {phase!r}; CycleGAN has {self.phases}")

    def forward(self, batch: dict[str, torch.Tensor], phase: str = "generator") -> dict[str, torch.Tensor]:
        """Losses of one phase; ``loss`` is back-propagated."""
        if phase == "generator":
            return self._generator_losses(batch)
        if phase == "discriminator":
            return self._discriminator_losses(batch)
        raise ValueError(f"unknown phase {phase!r}; CycleGAN has {self.phases}")

    def _generator_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        config: CycleGANConfig = self.config
        views = self.sample_views(batch, paired=False)
        mr, ct = views["mr"], views["ct"]
        self.check_view(mr)
        mr_target = mr.clamp(-1.0, 1.0)
        self.count_step()
        fake_ct = self.generator(mr)
        fake_mr = self.generator_ct_to_mr(ct)
        with frozen(self.discriminator_ct), frozen(self.discriminator_mr):
            gan = (self.adversarial.generator(discriminator_logits(self.discriminator_ct(fake_ct)))
                   + self.adversarial.generator(discriminator_logits(self.discriminator_mr(fake_mr))))
        cycle = ((self.generator_ct_to_mr(fake_ct) - mr_target).abs().mean()
                 + (self.generator(fake_mr) - ct).abs().mean())
        loss = config.lambda_gan * gan + config.lambda_cycle * cycle
        logs = {"gan": gan.detach(), "cycle": cycle.detach(),
                **intensity_drift(fake_ct, mr, views["mask"], ct, views["ct_mask"])}
        if config.lambda_identity > 0:
            identity = ((self.generator(ct) - ct).abs().mean()
                        + (self.generator_ct_to_mr(mr) - mr_target).abs().mean())
            loss = loss + config.lambda_cycle * config.lambda_identity * identity
            logs["identity"] = identity.detach()
        if config.lambda_bg > 0:
            background = background_l1(fake_ct, views["mask"], AIR_SIGNED)
            loss = loss + config.lambda_bg * background
            logs["background"] = background.detach()
        self.stash(batch, mr=mr_target, ct=ct, fake_ct=fake_ct, fake_mr=fake_mr)
        return {"loss": loss, **logs}

    def _discriminator_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        stashed = self.stashed_or_regenerated(batch, lambda views: {
            "mr": views["mr"].clamp(-1.0, 1.0), "ct": views["ct"],
            "fake_ct": self.generator(views["mr"]), "fake_mr": self.generator_ct_to_mr(views["ct"])})
        loss_ct = self.adversarial.discriminator(discriminator_logits(self.discriminator_ct(stashed["ct"])),
                                                 discriminator_logits(self.discriminator_ct(stashed["fake_ct"])))
        loss_mr = self.adversarial.discriminator(discriminator_logits(self.discriminator_mr(stashed["mr"])),
                                                 discriminator_logits(self.discriminator_mr(stashed["fake_mr"])))
        return {"loss": loss_ct + loss_mr, "d_ct": loss_ct.detach(), "d_mr": loss_mr.detach()}
