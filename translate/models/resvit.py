"""ResViT sCT baseline (Dalmaz et al. 2022): a conditional GAN whose generator bottleneck is a
stack of aggregated residual transformer (ART) blocks.

Generator (2D; ``k`` input slices as channels in 2.5D, the centre slice out)::

    stem conv 7x7 -> strided convs (channels[1:]) -> ART block 1 ... ART block n -> transposed convs
    -> zero-initialised 7x7 head + tanh (a fresh generator outputs water everywhere)

Each ART block is a ResNet block (two 3x3 convolutions and a skip). The blocks listed in
``vit_blocks`` (the paper's 1 and 6) first run a vision transformer on the block's features:
strided convolutions down by ``2 ** vit_downsampling``, MONAI ``PatchEmbeddingBlock`` (1x1 patches
with a learned position embedding on a ``vit_grid`` x ``vit_grid`` token grid, resized bilinearly
for other slice sizes), ``vit_layers`` MONAI ``TransformerBlock``s + LayerNorm (one transformer
shared by those blocks with ``share_transformer``, as in the paper; each keeps its own embedding),
transposed convolutions back up, and a residual "channel compression" of the concatenated
transformer and convolution features.

Generator loss (paired views), with the terms Pix2Pix has (``PairedGAN.paired_terms``)::

    lambda_l1 * L1_mask(sCT, CT) + lambda_gan * GAN(D(MR, sCT)) + lambda_bg * L1_outside_mask(sCT, air)
    + lambda_mse * MSE_mask(sCT, CT)

The discriminator is the project's conditional multi-scale PatchGAN (``disc_*`` fields).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, PatchEmbeddingBlock, TransformerBlock, UnetResBlock
from pydantic import Field, model_validator
from torch import nn

from latent.translate.models.gan_common import WATER_SIGNED, PairedGAN, PixelGANConfig, centre_channel, water_head
from latent.translate.models.gan_losses import AdversarialLoss

#: Side of the stem's and the head's convolutions (the paper's 7x7).
OUTER_KERNEL = 7


class ResViTConfig(PixelGANConfig):
    """ResViT recipe (defaults: the paper's generator; lr 2e-4, betas (0.5, 0.999), LSGAN).

    Shared with Pix2Pix (``PixelGANConfig``): sampling, ``mode`` (``"2d"`` or ``"2.5d"``; no 3D),
    the discriminator, ``norm`` and the inference fields. ``channels`` are the encoder's levels
    (the paper: 64, 128, 256; each step down is a stride-2 convolution, ``strides`` must be 2) and
    the ART blocks work at ``channels[-1]``. ``num_res_units`` is not used by this family.

    Attributes:
        art_blocks: ART blocks in the bottleneck (the paper: 9).
        vit_blocks: 1-based ART blocks with a transformer in front of the ResNet block (paper: 1, 6).
        share_transformer: one transformer (its weights) for every block in ``vit_blocks`` (paper).
        vit_downsampling: stride-2 convolutions between the bottleneck and the tokens (paper: 2;
            each doubles the channels).
        vit_grid: token grid side the position embedding is learned on (paper: 16, for 256 px slices).
        vit_hidden, vit_heads, vit_mlp, vit_layers, vit_dropout: the transformer (paper: ViT-B,
            768 / 12 / 3072 / 12 layers / 0.1).
        lambda_l1: weight of the L1 to the CT inside the body mask (paper: 100 on the whole image).
        lambda_gan: weight of the adversarial loss.
        lambda_bg: weight of the L1 to air (-1000 HU) outside the body mask.
        lambda_mse: weight of an optional squared error to the CT inside the mask (0: off).
    """

    family: Literal["resvit"] = "resvit"
    mode: Literal["2d", "2.5d"] = "2.5d"
    channels: tuple[int, ...] = (64, 128, 256)
    art_blocks: int = Field(9, ge=1)
    vit_blocks: tuple[int, ...] = (1, 6)
    share_transformer: bool = True
    vit_downsampling: int = Field(2, ge=0)
    vit_grid: int = Field(16, ge=1)
    vit_hidden: int = Field(768, ge=1)
    vit_heads: int = Field(12, ge=1)
    vit_mlp: int = Field(3072, ge=1)
    vit_layers: int = Field(12, ge=1)
    vit_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    lambda_l1: float = 100.0
    lambda_gan: float = 1.0
    lambda_bg: float = 20.0
    lambda_mse: float = 0.0

    @model_validator(mode="after")
    def _resvit_consistent(self) -> "ResViTConfig":
        if any(stride != 2 for stride in self.generator_strides):
            raise ValueError(f"strides: ResViT's encoder steps are stride-2 convolutions, got {list(self.strides)}")
        if len(set(self.vit_blocks)) != len(self.vit_blocks) or any(
                not 1 <= block <= self.art_blocks for block in self.vit_blocks):
            raise ValueError(f"vit_blocks: distinct ART block numbers in 1..art_blocks={self.art_blocks}, "
                             f"got {list(self.vit_blocks)}")
        if self.vit_hidden % self.vit_heads:
            raise ValueError(f"vit_hidden: {self.vit_hidden} must be a multiple of vit_heads={self.vit_heads}")
        return self

    @property
    def downsampling(self) -> int:
        """Factor the slices are padded to: the encoder's, times the transformer path's."""
        return math.prod(self.generator_strides) * 2 ** (self.vit_downsampling if self.vit_blocks else 0)


def _conv(config: ResViTConfig, in_channels: int, out_channels: int, stride: int = 1, kernel: int = 3,
          transposed: bool = False) -> Convolution:
    """MONAI conv + norm + ReLU (transposed: exact 2x upsampling)."""
    return Convolution(2, in_channels, out_channels, strides=stride, kernel_size=kernel, act="RELU",
                       norm=config.norm, is_transposed=transposed)


def _resnet_block(config: ResViTConfig, in_channels: int, out_channels: int) -> UnetResBlock:
    """conv-norm-ReLU-conv-norm plus a skip (a 1x1 convolution where the channels change), then ReLU."""
    return UnetResBlock(2, in_channels, out_channels, kernel_size=3, stride=1, norm_name=config.norm, act_name="RELU")


class VisionTransformer(nn.Module):
    """``vit_layers`` MONAI transformer blocks and a final LayerNorm on ``(N, tokens, hidden)``."""

    def __init__(self, config: ResViTConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TransformerBlock(config.vit_hidden, config.vit_mlp, config.vit_heads, dropout_rate=config.vit_dropout,
                             qkv_bias=True) for _ in range(config.vit_layers))
        self.norm = nn.LayerNorm(config.vit_hidden, eps=1e-6)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)


class ARTBlock(nn.Module):
    """One aggregated residual transformer block at the bottleneck (``channels`` features).

    With ``with_transformer``: down, embed, the transformer passed to :meth:`forward`, up, and the
    concatenation with the input compressed back to ``channels`` before the ResNet block.
    """

    def __init__(self, config: ResViTConfig, channels: int, with_transformer: bool) -> None:
        super().__init__()
        self.grid = config.vit_grid
        self.with_transformer = with_transformer
        if with_transformer:
            widths = [channels * 2 ** level for level in range(config.vit_downsampling + 1)]
            self.down = nn.Sequential(*(_conv(config, a, b, stride=2) for a, b in zip(widths, widths[1:])))
            self.embedding = PatchEmbeddingBlock(widths[-1], (self.grid, self.grid), 1, config.vit_hidden,
                                                 config.vit_heads, proj_type="conv", pos_embed_type="learnable",
                                                 dropout_rate=config.vit_dropout, spatial_dims=2)
            ups = [config.vit_hidden, *reversed(widths[:-1])]
            # Transposed convolutions back to the bottleneck (none to do: a 1x1 one to its channels).
            self.up = nn.Sequential(*(_conv(config, a, b, stride=2, transposed=True) for a, b in zip(ups, ups[1:]))
                                    ) if config.vit_downsampling else _conv(config, config.vit_hidden, channels, kernel=1)
            self.compress = _resnet_block(config, 2 * channels, channels)
        self.resnet = _resnet_block(config, channels, channels)

    def embed(self, features: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tokens ``(N, h * w, hidden)`` of ``(N, C, h, w)`` features; the learned position
        embedding is resized bilinearly when ``(h, w)`` is not the ``vit_grid`` it was learned on."""
        size = tuple(features.shape[2:])
        if size == (self.grid, self.grid):
            return self.embedding(features), size
        tokens = self.embedding.patch_embeddings(features).flatten(2).transpose(1, 2)
        position = self.embedding.position_embeddings
        grid = position.transpose(1, 2).reshape(1, -1, self.grid, self.grid)
        position = F.interpolate(grid, size=size, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
        return self.embedding.dropout(tokens + position), size

    def forward(self, x: torch.Tensor, transformer: nn.Module | None = None) -> torch.Tensor:
        if self.with_transformer:
            tokens, (height, width) = self.embed(self.down(x))
            tokens = transformer(tokens)
            context = self.up(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, height, width))
            x = self.compress(torch.cat([context, x], dim=1))
        return self.resnet(x)


class ResViTGenerator(nn.Module):
    """``(N, in, H, W)`` signed MR slices -> ``(N, 1, H, W)`` CT in (-1, 1); H, W multiples of
    ``config.downsampling``."""

    def __init__(self, config: ResViTConfig, in_channels: int, initial_output: float) -> None:
        super().__init__()
        widths = list(config.channels)
        self.stem = _conv(config, in_channels, widths[0], kernel=OUTER_KERNEL)
        self.encoder = nn.Sequential(*(_conv(config, a, b, stride=2) for a, b in zip(widths, widths[1:])))
        self.art = nn.ModuleList(ARTBlock(config, widths[-1], number in config.vit_blocks)
                                 for number in range(1, config.art_blocks + 1))
        shared = config.share_transformer
        transformers = (1 if shared else len(config.vit_blocks)) if config.vit_blocks else 0
        self.transformers = nn.ModuleList(VisionTransformer(config) for _ in range(transformers))
        #: Index into ``transformers`` of each ART block (None: no transformer).
        self.transformer_of = [None] * config.art_blocks
        for order, number in enumerate(sorted(config.vit_blocks)):
            self.transformer_of[number - 1] = 0 if shared else order
        ups = widths[::-1]
        self.decoder = nn.Sequential(*(_conv(config, a, b, stride=2, transposed=True) for a, b in zip(ups, ups[1:])))
        self.head = water_head(2, widths[0], 1, initial_output, kernel_size=OUTER_KERNEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(self.stem(x))
        for block, index in zip(self.art, self.transformer_of):
            features = block(features, None if index is None else self.transformers[index])
        return torch.tanh(self.head(self.decoder(features)))


class ResViT(PairedGAN):
    """Conditional GAN MR -> sCT on 2D slices or 2.5D stacks (k slices in, centre out)."""

    family: ClassVar[str] = "resvit"
    config_class = ResViTConfig

    def __init__(self, config: ResViTConfig) -> None:
        super().__init__(config)
        depth = config.stack_depth
        self.generator = ResViTGenerator(config, in_channels=depth, initial_output=WATER_SIGNED)
        # Conditional discriminator: sees the MR stack and a CT centre slice together.
        self.discriminator = self.make_discriminator(depth + 1)
        self.adversarial = AdversarialLoss(config.gan_criterion)
        self.output_channel = 0

    def _generator_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        config: ResViTConfig = self.config
        self.count_step()
        views = self.sample_views(batch, paired=True)
        condition, mask = views["mr"], centre_channel(views["mask"])
        target = centre_channel(views["ct"])
        self.check_view(condition)
        fake = self.generator(condition)
        terms = self.paired_terms(condition, fake, target, mask)
        inside = (mask > 0).to(fake.dtype)
        terms["mse"] = ((fake - target) ** 2 * inside).sum() / inside.sum().clamp_min(1.0)
        loss = (config.lambda_l1 * terms["l1"] + config.lambda_gan * terms["gan"] + config.lambda_bg * terms["background"]
                + config.lambda_mse * terms["mse"])
        self.stash(batch, condition=condition, target=target, fake=fake, warmup=torch.zeros(()))
        return {"loss": loss, **{name: value.detach() for name, value in terms.items()}}
