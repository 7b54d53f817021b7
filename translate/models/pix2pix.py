"""Pix2Pix sCT baseline: residual U-Net generator + conditional multi-scale PatchGAN.

Generator loss (paired views)::

    lambda_l1 * L1_mask(sCT, CT) + lambda_ngf * NGF_mask(sCT, MR) + lambda_gan * GAN(D(MR, sCT))
    + lambda_bg * L1_outside_mask(sCT, air)

NGF (``gan_losses.ngf_loss``) compares gradient directions of the sCT and the MR; the MR's edge
parameter is relative to its own intensity range, the sCT's to the range of the CT it should
become (a fresh generator's output is nearly flat, and a self-relative eps would turn its faint
gradients into full-strength edges and let NGF block learning). 2D/2.5D views use 2D NGF on
the centre slice, 3D patches 3D NGF.

Warm-up: for the first ``warmup_steps`` generator steps the target is the input MR itself
(``2 mr - 1`` clipped to [-1, 1], whole view) and the adversarial terms are off, so the
generator first learns to reproduce the anatomy (the published recipe's 2-epoch warm-up;
give it in steps: 2 x steps per epoch). The step count is the buffer ``generator_steps``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from latent.translate.models.gan_common import WATER_SIGNED, PairedGAN, PixelGANConfig, TanhUNet, centre_channel
from latent.translate.models.gan_losses import NGF_EPS, AdversarialLoss, ngf_loss, robust_range


class Pix2PixConfig(PixelGANConfig):
    """Pix2Pix recipe (defaults: the published L1 + NGF + GAN recipe; lr 2e-4, betas (0.5, 0.999)).

    Attributes:
        lambda_l1: weight of the L1 to the CT inside the body mask.
        lambda_ngf: weight of the NGF structure loss between sCT and MR (inside the mask).
        lambda_gan: weight of the adversarial loss.
        lambda_bg: weight of the L1 to air (-1000 HU) outside the body mask.
        ngf_eps: NGF edge parameter, relative to intensity ranges (see ``ngf_loss``): the MR's own
            and, for the sCT, the target's (the CT; the MR during warm-up).
        ngf_relative_eps: False for an absolute eps in [-1, 1] units (not scale invariant).
        warmup_steps: generator steps with the MR as target and no GAN (0: no warm-up).
    """

    family: Literal["pix2pix"] = "pix2pix"
    lambda_l1: float = 140.0
    lambda_ngf: float = 20.0
    lambda_gan: float = 1.0
    lambda_bg: float = 20.0
    ngf_eps: float = NGF_EPS
    ngf_relative_eps: bool = True
    warmup_steps: int = 0


class Pix2Pix(PairedGAN):
    """Conditional GAN MR -> sCT on 2D slices, 2.5D stacks (k slices in, centre out) or 3D patches."""

    family: ClassVar[str] = "pix2pix"
    config_class = Pix2PixConfig

    def __init__(self, config: Pix2PixConfig) -> None:
        super().__init__(config)
        depth = config.stack_depth
        self.generator = TanhUNet(config, in_channels=depth, out_channels=1, initial_output=WATER_SIGNED)
        # Conditional discriminator: sees the MR stack and a CT centre slice (or patch) together.
        self.discriminator = self.make_discriminator(depth + 1)
        self.adversarial = AdversarialLoss(config.gan_criterion)
        self.output_channel = 0

    def in_warmup(self, step: int) -> bool:
        """Whether generator step ``step`` (0-based) is a warm-up (identity) step."""
        return step < self.config.warmup_steps

    def _generator_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        config: Pix2PixConfig = self.config
        views = self.sample_views(batch, paired=True)
        condition, mask = views["mr"], centre_channel(views["mask"])
        mr_centre = centre_channel(condition)
        warmup = self.in_warmup(self.count_step())
        fake = self.generator(condition)
        if warmup:
            identity_target = mr_centre.clamp(-1.0, 1.0)
            l1 = (fake - identity_target).abs().mean()
            ngf = ngf_loss(fake, mr_centre, config.ngf_eps, relative_eps=config.ngf_relative_eps,
                           prediction_range=robust_range(identity_target))
            self.stash(batch, warmup=torch.ones(()))
            return {"loss": config.lambda_l1 * l1 + config.lambda_ngf * ngf, "l1": l1.detach(),
                    "ngf": ngf.detach(), "warmup": torch.ones(())}
        target = centre_channel(views["ct"])
        self.check_view(condition)
        terms = self.paired_terms(condition, fake, target, mask)
        ngf = ngf_loss(fake, mr_centre, config.ngf_eps, mask=mask, relative_eps=config.ngf_relative_eps,
                       prediction_range=robust_range(target))
        loss = (config.lambda_l1 * terms["l1"] + config.lambda_ngf * ngf + config.lambda_gan * terms["gan"]
                + config.lambda_bg * terms["background"])
        self.stash(batch, condition=condition, target=target, fake=fake, warmup=torch.zeros(()))
        return {"loss": loss, **{name: value.detach() for name, value in terms.items()}, "ngf": ngf.detach(),
                "warmup": torch.zeros(())}
