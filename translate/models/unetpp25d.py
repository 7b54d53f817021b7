"""2.5D U-Net++ with a ResNet encoder MR -> sCT (the third-placed SynthRAD2025 method, KonfAI / IMPACT-Synth).

Network: MONAI's ``ResNetEncoder`` (``resnet34`` by default, 2D, the ``context_slices``
neighbouring axial slices as input channels; features at strides 2, 4, 8, 16, 32) and a nested
U-Net++ decoder built here from MONAI's ``UpCat`` blocks (upsample, concatenate, two
convolutions): node ``(i, j)`` at encoder level ``i`` takes the upsampled node ``(i + 1, j - 1)``
and every earlier node of its level. MONAI offers U-Net++ only as ``BasicUNetPlusPlus`` (its own
plain encoder) and ResNet encoders only under ``FlexibleUNet``'s plain U-Net decoder, hence this
composition. A last upsampling block brings stride 2 back to full resolution, and a 1x1 head,
zero-initialised with its bias at water, predicts the centre slice (linear, clipped at inference).

No ImageNet weights are downloaded (the project runs offline): the encoder starts from random
weights unless ``encoder_weights`` names a local file (:func:`load_encoder_weights`).

Loss: masked L1 on the predicted centre slices inside the body (the project's ``masked_l1``),
``background_weight`` x L1 to air outside, plus the optional perception loss of a frozen 2D
segmentation network (:mod:`latent.translate.models.perception`). Training draws
``slices_per_volume`` body slices per case; inference runs slice-wise over the whole volume.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar, Literal

import torch
from monai.networks.nets.basic_unet import TwoConv, UpCat
from monai.networks.nets.resnet import ResNetEncoder
from monai.networks.blocks import UpSample
from pydantic import Field, field_validator
from torch import nn

from latent.core.errors import WeightsError
from latent.core.network_weights import read_state_dict
from latent.translate.models.base import ModelConfig, PositiveRate, TranslationModel
from latent.translate.models.gan_losses import background_l1, masked_l1
from latent.translate.models.gan_views import (gather_stacks, odd_context_slices, pad_to_multiple, sample_slices,
                                               slicewise_translate)
from latent.translate.models.l2sct import AIR_VALUE, START_VALUE
from latent.translate.models.perception import PerceptionNetwork, PerceptionSettings, PerceptionTerm

#: Encoder levels (strides 2 ... 32): in-plane sizes are padded to a multiple of the last.
ENCODER_STRIDE = 32
#: Pad values: MR background, CT -1024 HU, no body.
MR_PAD, CT_PAD = 0.0, -1.0
#: Decoder blocks: MONAI's U-Net conventions (batch norm, ReLU, bias-free convolutions).
ACT, NORM = ("relu", {"inplace": True}), ("batch", {"eps": 1e-3, "momentum": 0.1})
#: Keys of an encoder weights file that are not used: a classifier head, and the projection
#: shortcuts of torchvision-style ResNet-18/34 (MONAI's use identity shortcuts, type "A").
IGNORED_PREFIXES = ("fc.",)
IGNORED_PARTS = (".downsample.",)

logger = logging.getLogger(__name__)


class UNetPP25DConfig(PerceptionSettings, ModelConfig):
    """Config of :class:`UNetPP25D`.

    Attributes:
        context_slices: k (odd) neighbouring axial slices in, the centre one predicted.
        backbone: MONAI ResNet encoder (the paper: ResNet-34).
        decoder_channels: channels of the decoder nodes at strides 16, 8, 4, 2 and of the final
            full-resolution block (segmentation_models_pytorch's U-Net++ default).
        encoder_weights: a local file of encoder weights (``.safetensors`` or a ``.pt`` state dict)
            loaded when the model is built; recorded as ``encoder_initialised_from`` and cleared
            (the saved model carries the weights).
        slices_per_volume: training slices drawn per case and step, among slices with body.
        background_weight: weight of the L1 to air outside the body mask.
        inference_batch_size: slices per network call in slice-wise inference.
        perception_*: the optional perception loss; its network must be 2D (:class:`PerceptionSettings`).
    """

    family: Literal["unetpp25d"] = "unetpp25d"
    lr: PositiveRate = 2e-4
    context_slices: int = 5
    backbone: Literal["resnet10", "resnet18", "resnet34"] = "resnet34"
    decoder_channels: tuple[int, int, int, int, int] = (256, 128, 64, 32, 16)
    encoder_weights: str | None = None
    encoder_initialised_from: str | None = None
    slices_per_volume: int = Field(8, ge=1)
    background_weight: float = Field(0.1, ge=0)
    inference_batch_size: int = Field(16, ge=1)

    _odd_context = field_validator("context_slices")(odd_context_slices)

    @field_validator("decoder_channels")
    @classmethod
    def _positive_channels(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(channels < 1 for channels in value):
            raise ValueError(f"decoder_channels: every entry must be >= 1, got {list(value)}")
        return value


class UNetPlusPlusResNet(nn.Module):
    """ResNet encoder + nested U-Net++ decoder (2D): ``(N, k, H, W)`` -> ``(N, 1, H, W)``, H, W multiples of 32."""

    def __init__(self, in_channels: int, backbone: str, decoder_channels: tuple[int, ...]) -> None:
        super().__init__()
        self.encoder = ResNetEncoder(backbone, pretrained=False, spatial_dims=2, in_channels=in_channels)
        encoder = ResNetEncoder.num_channels_per_output()[ResNetEncoder.backbone_names.index(backbone)]
        levels = len(encoder) - 1  # skip levels 0..3 (strides 2..16); level 4 is the bottleneck
        # decoder channels per skip level: decoder_channels lists them from stride 16 down to 2
        self.level_channels = [decoder_channels[levels - 1 - i] for i in range(levels)]

        def channels(level: int, column: int) -> int:
            return encoder[level] if column == 0 else self.level_channels[level]

        self.nodes = nn.ModuleDict()
        for column in range(1, levels + 1):
            for level in range(levels - column + 1):
                self.nodes[f"{level}_{column}"] = UpCat(
                    2, channels(level + 1, column - 1), encoder[level] + (column - 1) * self.level_channels[level],
                    self.level_channels[level], ACT, NORM, bias=False, upsample="nontrainable", pre_conv=None,
                    interp_mode="nearest", align_corners=None, halves=False)
        self.levels = levels
        self.final_up = UpSample(2, self.level_channels[0], self.level_channels[0], 2, mode="nontrainable",
                                 pre_conv=None, interp_mode="nearest", align_corners=None)
        self.final_block = TwoConv(2, self.level_channels[0], decoder_channels[-1], ACT, NORM, bias=False)
        self.head = nn.Conv2d(decoder_channels[-1], 1, kernel_size=1)
        nn.init.zeros_(self.head.weight)  # a fresh network predicts water everywhere, and learns from there
        nn.init.constant_(self.head.bias, START_VALUE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        grid: dict[tuple[int, int], torch.Tensor] = {(level, 0): feature for level, feature in enumerate(features)}
        for column in range(1, self.levels + 1):
            for level in range(self.levels - column + 1):
                skips = torch.cat([grid[(level, c)] for c in range(column)], dim=1)
                grid[(level, column)] = self.nodes[f"{level}_{column}"](grid[(level + 1, column - 1)], skips)
        return self.head(self.final_block(self.final_up(grid[(0, self.levels)])))


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> int:
    """Load a local file of ResNet encoder weights into ``encoder``; returns the tensors loaded.

    The file's keys are the encoder's (``conv1.weight``, ``layer1.0.conv1.weight``, ...; torchvision
    ResNets use the same names). A classifier head (``fc.*``) and projection shortcuts the encoder
    lacks (``*.downsample.*``: MONAI's ResNet-18/34 use identity shortcuts) are skipped. A first convolution made
    for another number of input channels (3 for ImageNet) is adapted to the stack depth: its
    filters cycled over the k inputs and scaled by 3 / k (segmentation_models_pytorch's rule).

    Raises:
        WeightsError: one line naming the file and the first missing, unknown or misshapen tensor.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"model.encoder_weights: {path}: no such file")
    state = read_state_dict(path, what="encoder weights")
    own = encoder.state_dict()
    state = {key: value for key, value in state.items() if not key.startswith(IGNORED_PREFIXES)
             and (key in own or not any(part in key for part in IGNORED_PARTS))}
    first = state.get("conv1.weight")
    if first is not None and first.ndim == 4 and first.shape[1] != own["conv1.weight"].shape[1]:
        depth, have = own["conv1.weight"].shape[1], first.shape[1]
        state["conv1.weight"] = first[:, [i % have for i in range(depth)]] * (have / depth)
    missing = sorted(set(own) - set(state))
    unknown = sorted(set(state) - set(own))
    wrong = [key for key in own if key in state and state[key].shape != own[key].shape]
    if missing or unknown or wrong:
        key = (wrong or missing or unknown)[0]
        what = ("has another shape" if wrong else "is missing" if missing else "is not in the encoder")
        raise WeightsError(f"model.encoder_weights: {path}: tensor {key} {what} (a ResNet encoder of "
                           f"{len(own)} tensors expected)")
    encoder.load_state_dict({key: state[key].to(own[key].dtype) for key in own})
    return len(own)


class UNetPP25D(TranslationModel):
    """2.5D U-Net++ / ResNet-34 MR -> sCT: k slices in, the centre slice out; slice-wise whole-volume inference."""

    family: ClassVar[str] = "unetpp25d"
    config_class: ClassVar[type[UNetPP25DConfig]] = UNetPP25DConfig
    input_key: ClassVar[str] = "mr_pixels"
    output_space: ClassVar[str] = "ct_full"

    def __init__(self, config: UNetPP25DConfig) -> None:
        source = config.encoder_weights
        if source is not None:  # the saved config records where the weights came from; they travel in the state
            config = config.model_copy(update={"encoder_weights": None, "encoder_initialised_from": str(source)})
        super().__init__(config)
        self.network = UNetPlusPlusResNet(config.context_slices, config.backbone, config.decoder_channels)
        if source is not None:
            count = load_encoder_weights(self.network.encoder, source)
            logger.info("unetpp25d: %d encoder tensors initialised from %s", count, source)
        self.perception_term = PerceptionTerm(config, self.family, spatial_dims=2)

    def prepare_training(self) -> None:
        """Load the frozen perception network now, so that bad weights fail before the first step."""
        self.perception_term.network()

    def perception_network(self) -> PerceptionNetwork | None:
        """The frozen 2D segmentation network of the perception loss, or ``None`` when off."""
        return self.perception_term.network()

    def training_views(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``mr`` ``(N, k, H', W')`` stacks and their centre ``ct`` / ``mask`` slices ``(N, 1, H', W')``.

        Slices are drawn among the body slices with torch's global RNG, which the training loop
        reseeds every micro-step (reproducible, and exact on resume).
        """
        config: UNetPP25DConfig = self.config
        mr, ct, mask = (batch[key].float() for key in ("mr_pixels", "ct_pixels", "mask_pixels"))
        places = sample_slices(mask, config.slices_per_volume)
        cases = torch.arange(mr.shape[0], device=mr.device).repeat_interleave(places.shape[1])
        z = places.flatten()
        views = {"mr": (mr, config.context_slices, MR_PAD), "ct": (ct, 1, CT_PAD), "mask": (mask, 1, 0.0)}
        return {name: pad_to_multiple(gather_stacks(volume, cases, z, depth), ENCODER_STRIDE, pad)
                for name, (volume, depth, pad) in views.items()}

    def forward(self, batch: dict[str, torch.Tensor], phase: str = "main") -> dict[str, torch.Tensor]:
        """Masked L1 + background-to-air (+ perception) on random 2.5D body slices.

        Returns:
            ``loss`` (back-propagated), ``l1`` (in the body), ``background`` and, when on,
            ``perception`` (unweighted).
        """
        config: UNetPP25DConfig = self.config
        views = self.training_views(batch)
        prediction = self.network(views["mr"]).float()
        l1 = masked_l1(prediction, views["ct"], views["mask"])
        background = background_l1(prediction, views["mask"], AIR_VALUE)
        loss = l1 + config.background_weight * background
        losses = {"l1": l1.detach(), "background": background.detach()}
        term = self.perception_term(prediction, views["ct"], views["mask"])
        if term is not None:
            loss = loss + config.perception_weight * term
            losses["perception"] = term.detach()
        return {"loss": loss, **losses}

    @torch.no_grad()
    def translate(self, inputs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Whole-volume sCT: ``(B, 1, D, H, W)`` normalised MR -> ``(B, 1, D, H, W)`` CT in [-1, 1].

        Every axial slice through its k-slice stack (edge slices repeated), in batches of
        ``inference_batch_size``, in-plane padded to a multiple of 32 and cropped back; the
        network in eval mode (batch-norm running statistics). Deterministic.
        """
        config: UNetPP25DConfig = self.config
        was_training = self.network.training
        self.network.eval()
        try:
            output = slicewise_translate(inputs.float(), lambda stack: self.network(stack).float(),
                                         config.context_slices, config.inference_batch_size, ENCODER_STRIDE,
                                         pad_value=MR_PAD)
        finally:
            self.network.train(was_training)
        return output.clamp(-1.0, 1.0)
