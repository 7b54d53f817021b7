"""Losses of the pixel-space GAN baselines: NGF, masked L1, adversarial loss, PatchNCE.

Every loss takes channel-first tensors ``(N, C, *spatial)`` with 2 (slices) or 3 (patches)
spatial axes and returns a scalar.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import MultiScalePatchDiscriminator
from torch import nn

from latent.core.intensity import FULL_CT_MAX_HU, FULL_CT_MIN_HU

#: Default NGF edge parameter, in units of each image's own robust intensity range (see ngf_loss).
NGF_EPS = 0.08
#: Percentiles whose difference is an image's intensity range for the NGF edge parameter:
#: robust to a few outlying voxels (metal, MR vessels) where min/max are not.
NGF_RANGE_PERCENTILES = (1.0, 99.0)
#: Added to the edge parameter so a constant image gives a zero field instead of 0/0.
_NGF_TINY = 1e-12
#: CUT's temperature of the PatchNCE softmax.
NCE_TEMPERATURE = 0.07


def spatial_gradients(image: torch.Tensor) -> torch.Tensor:
    """Forward finite differences along every spatial axis, on one common grid.

    Args:
        image: ``(N, C, *spatial)`` with 2 or 3 spatial axes.

    Returns:
        ``(N, C, ndim, *[s - 1 for s in spatial])``: component ``i`` is
        ``image[..., x + e_i] - image[..., x]`` at the voxels that have a forward neighbour
        along every axis (the last plane of each axis is dropped).
    """
    ndim = image.dim() - 2
    if ndim not in (2, 3):
        raise ValueError(f"NGF needs 2 or 3 spatial axes, got a tensor of shape {tuple(image.shape)}")
    base = image[(Ellipsis,) + (slice(None, -1),) * ndim]
    components = []
    for axis in range(ndim):
        shifted = [slice(None, -1)] * ndim
        shifted[axis] = slice(1, None)
        components.append(image[(Ellipsis,) + tuple(shifted)] - base)
    return torch.stack(components, dim=2)


def robust_range(image: torch.Tensor, percentiles: tuple[float, float] = NGF_RANGE_PERCENTILES) -> torch.Tensor:
    """Per (sample, channel) intensity range ``q_high - q_low`` (exact order statistics).

    The two order statistics are symmetric (k-th smallest and k-th largest), so the range of
    ``c * image`` is exactly ``|c|`` times the range of ``image`` for any real ``c``.

    Returns:
        ``(N, C)`` non-negative ranges (detached: the edge parameter is not optimised).
    """
    flat = image.detach().flatten(2)
    count = flat.shape[-1]
    k_low = min(max(1, int(round(percentiles[0] / 100.0 * (count - 1))) + 1), count)
    k_high = count + 1 - k_low
    low = flat.kthvalue(k_low, dim=-1).values
    high = flat.kthvalue(k_high, dim=-1).values
    return (high - low).abs()


def normalised_gradient_field(image: torch.Tensor, eps: float = NGF_EPS, relative_eps: bool = True,
                              intensity_range: torch.Tensor | None = None) -> torch.Tensor:
    """``n = grad / sqrt(|grad|^2 + eps_img^2)``, with ``eps_img = eps * range`` when relative.

    Args:
        intensity_range: ``(N, C)`` range that eps is relative to; default the image's own
            :func:`robust_range`.

    Returns:
        ``(N, C, ndim, *cropped)`` vectors of length < 1 (close to 1 on edges much stronger than
        ``eps_img``, close to 0 in flat regions).
    """
    grads = spatial_gradients(image)
    edge = torch.full(image.shape[:2], float(eps), dtype=image.dtype, device=image.device)
    if relative_eps:
        edge = edge * (robust_range(image) if intensity_range is None else intensity_range.detach().to(edge))
    edge = (edge + _NGF_TINY).reshape(*image.shape[:2], *([1] * (grads.dim() - 2)))
    return grads / torch.sqrt((grads * grads).sum(dim=2, keepdim=True) + edge * edge)


def ngf_loss(prediction: torch.Tensor, reference: torch.Tensor, eps: float = NGF_EPS,
             mask: torch.Tensor | None = None, relative_eps: bool = True,
             prediction_range: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised-gradient-field distance between two images of any contrasts.

    Computes, at every voxel ``x`` of the forward-difference grid (Haber & Modersitzki's NGF
    fields ``n_a``, ``n_b`` from :func:`normalised_gradient_field`)::

        d(x) = |n_a|^2 |n_b|^2 - <n_a, n_b>^2 = sum_{i<j} (n_a,i n_b,j - n_a,j n_b,i)^2

    (Lagrange's identity: in 3D the squared cross product ``|n_a x n_b|^2``), and returns its
    mean over the voxels (over the mask's voxels when a mask is given), averaged over channels.
    ``d = |n_a|^2 |n_b|^2 sin^2(angle)``: for edges much stronger than eps this is the classic
    ``1 - <n_a, n_b>^2``, but it has no self term ``1 - |n_a|^2 |n_b|^2``, which in the classic
    form rewards steep gradients of the prediction everywhere (noise) and keeps the loss of
    identical images above 0. Properties the tests check:

    - identical (or parallel-gradient, e.g. contrast-inverted) images give exactly 0: each term
      ``n_i n_j - n_j n_i`` is 0 in floating point;
    - with ``relative_eps`` (default) each image's eps is ``eps`` times its own robust intensity
      range (1st-99th percentile, :func:`robust_range`), so ``d`` is unchanged when either image
      is multiplied by any non-zero constant or shifted (gradients ignore offsets);
    - misaligned edges (gradients at an angle, or edges of one image where the other is flat
      with a small gradient) give ``d > 0``; it lies in [0, 1].
    With ``relative_eps=False`` eps is absolute, in the images' own units (not scale invariant).
    A flat prediction also gives 0: use NGF next to an intensity loss, never alone.

    Training note: a network's early prediction is nearly flat, so its own range is tiny and a
    self-relative eps would blow its faint, random gradients up to unit vectors (the NGF term
    then dominates and blocks learning). Models pass ``prediction_range`` = the range of what the
    prediction should become (the target CT's robust range): the prediction is then judged on
    the target's scale, and the loss stays invariant to the scale of the reference (MR).

    Args:
        prediction, reference: ``(N, C, *spatial)``, 2 or 3 spatial axes, same shape.
        eps: edge parameter (default 0.08: relative to the intensity range, like an image in [0, 1]).
        mask: optional ``(N, 1 or C, *spatial)`` voxels to average over (cropped like the gradients).
        relative_eps: eps relative to each image's intensity range (default) or absolute.
        prediction_range: ``(N, C)`` range for the prediction's eps instead of its own.
    """
    if prediction.shape != reference.shape:
        raise ValueError(f"NGF needs equal shapes, got {tuple(prediction.shape)} and {tuple(reference.shape)}")
    # At least float32: normalising tiny gradients in bf16 (mixed precision) loses them.
    dtype = torch.promote_types(torch.promote_types(prediction.dtype, reference.dtype), torch.float32)
    prediction, reference = prediction.to(dtype), reference.to(dtype)
    field_a = normalised_gradient_field(prediction, eps, relative_eps, prediction_range)
    field_b = normalised_gradient_field(reference, eps, relative_eps)
    ndim = field_a.shape[2]
    cross = torch.zeros_like(field_a[:, :, 0])
    for i in range(ndim):
        for j in range(i + 1, ndim):
            cross = cross + (field_a[:, :, i] * field_b[:, :, j] - field_a[:, :, j] * field_b[:, :, i]) ** 2
    if mask is None:
        return cross.mean()
    cropped = mask[(Ellipsis,) + (slice(None, -1),) * ndim].to(cross.dtype).expand_as(cross)
    return (cross * cropped).sum() / cropped.sum().clamp_min(1.0)


def masked_l1(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean ``|prediction - target|`` over the voxels where ``mask > 0`` (0 for an empty mask)."""
    weights = (mask > 0).to(prediction.dtype).expand_as(prediction)
    return ((prediction - target).abs() * weights).sum() / weights.sum().clamp_min(1.0)


def background_l1(prediction: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    """Mean ``|prediction - value|`` over the voxels outside the mask (pulls background to air)."""
    weights = (mask <= 0).to(prediction.dtype).expand_as(prediction)
    return ((prediction - value).abs() * weights).sum() / weights.sum().clamp_min(1.0)


def signed_to_hu(signed: torch.Tensor) -> torch.Tensor:
    """Detached HU of values on the [-1, 1] full-range CT scale."""
    return FULL_CT_MIN_HU + (signed.detach().float() + 1.0) * (FULL_CT_MAX_HU - FULL_CT_MIN_HU) / 2.0


def intensity_drift(fake: torch.Tensor, mr: torch.Tensor, mask: torch.Tensor, ct: torch.Tensor,
                    ct_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Training-curve diagnostics of an unpaired generator's intensities (docs/models.md, "Unpaired baselines").

    Args:
        fake: sCT views ``(N, k, ...)`` on the [-1, 1] full-range scale; ``mr`` the MR views they
            were made from, ``mask`` their body mask; ``ct`` / ``ct_mask`` the real CT views.

    Returns:
        Detached ``fake_body_hu`` and ``real_body_hu`` (mean HU inside the body of the sCT and of
        the real CT views) and ``fake_mr_corr`` (Pearson correlation of sCT and MR inside the
        body; 0 where either is constant): an sCT that only copies the MR's contrast has a
        correlation near 1 (the CT's own correlation with the MR is about 0.4-0.6 on the phantoms).
    """
    body, ct_body = mask.expand_as(fake) > 0, ct_mask.expand_as(ct) > 0
    fake_values, mr_values = fake.detach().float()[body], mr.detach().float().expand_as(fake)[body]
    nothing, correlation = fake.new_tensor(float("nan")), fake.new_zeros(())
    if fake_values.numel() > 1:
        stacked = torch.stack([fake_values, mr_values])
        if bool((stacked.std(dim=1) > 0).all()):
            correlation = torch.corrcoef(stacked)[0, 1]
    return {"fake_body_hu": signed_to_hu(fake)[body].mean() if body.any() else nothing,
            "real_body_hu": signed_to_hu(ct)[ct_body].mean() if ct_body.any() else nothing,
            "fake_mr_corr": correlation}


def discriminator_min_size(layers: int, num_d: int) -> int:
    """Smallest view side a MONAI multi-scale PatchGAN accepts: its deepest member halves the
    input ``layers * num_d`` times and its last 4-wide convolution needs 2 voxels left."""
    return 2 ** (layers * num_d + 1)


def build_discriminator(spatial_dims: int, in_channels: int, channels: int = 64, layers: int = 2, num_d: int = 2,
                        norm: str = "INSTANCE") -> MultiScalePatchDiscriminator:
    """MONAI multi-scale PatchGAN (raw logits): member i has ``layers * (i + 1)`` layers.

    ``norm="none"`` leaves the hidden layers unnormalised. Instance normalisation makes a PatchGAN
    nearly blind to the intensity scale of its input (docs/models.md, "Unpaired baselines"), so
    the unpaired recipes, which have no L1 term to anchor the HU, use ``"none"``.

    MONAI doubles the channels at every layer without a cap, so deep members get large: with
    64 channels, ``layers=2, num_d=2`` is about 12 M parameters in 2D, ``layers=3`` about 190 M.
    """
    return MultiScalePatchDiscriminator(num_d=num_d, num_layers_d=layers, spatial_dims=spatial_dims, channels=channels,
                                        in_channels=in_channels, norm=None if norm.lower() == "none" else norm,
                                        minimum_size_im=discriminator_min_size(layers, num_d))


def check_discriminator_input(view: torch.Tensor, layers: int, num_d: int) -> None:
    """Raise a ValueError naming the config fields when a view is too small for the discriminator."""
    needed = discriminator_min_size(layers, num_d)
    if min(view.shape[2:]) < needed:
        raise ValueError(f"training views of spatial size {tuple(view.shape[2:])} are too small for a discriminator "
                         f"with disc_layers={layers}, disc_num_d={num_d} (needs >= {needed}): "
                         "lower disc_layers / disc_num_d or use larger slices / patch_size")


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Build the graph without gradients for ``module``'s parameters (restored on exit).

    The generator phase back-propagates through the discriminator without filling its
    gradients (which would otherwise leak into its next step under gradient accumulation).
    """
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


class AdversarialLoss(nn.Module):
    """Discriminator / generator losses on (multi-scale) PatchGAN outputs (MONAI PatchAdversarialLoss).

    Args:
        criterion: ``"least_squares"`` (LSGAN, raw logits against 1/0), ``"bce"`` or ``"hinge"``.
    """

    def __init__(self, criterion: str = "least_squares") -> None:
        super().__init__()
        # no_activation_leastsq: plain LSGAN on the logits (MONAI's default adds a leaky ReLU).
        self.criterion = PatchAdversarialLoss(criterion=criterion, no_activation_leastsq=True)

    def discriminator(self, real_logits, fake_logits) -> torch.Tensor:
        """``(loss(real, 1) + loss(fake, 0)) / 2`` averaged over the discriminator scales."""
        real = self.criterion(real_logits, target_is_real=True, for_discriminator=True)
        fake = self.criterion(fake_logits, target_is_real=False, for_discriminator=True)
        return 0.5 * (real + fake)

    def generator(self, fake_logits) -> torch.Tensor:
        """Loss pushing the discriminator to call the fakes real."""
        return self.criterion(fake_logits, target_is_real=True, for_discriminator=False)


def discriminator_logits(output) -> list[torch.Tensor]:
    """Final maps of a MONAI (MultiScale)PatchDiscriminator output, as a list (one per scale)."""
    if isinstance(output, tuple):  # MultiScalePatchDiscriminator: (outputs, intermediate features)
        return list(output[0])
    if isinstance(output, list):  # PatchDiscriminator: intermediate features, last one is the output
        return [output[-1]]
    return [output]


class PatchProjector(nn.Module):
    """CUT's patch sampler + projection head: one 2-layer MLP per encoder layer, L2-normalised.

    Args:
        in_channels: channel count of each tapped encoder feature map.
        dim: projection size (CUT: 256).
    """

    def __init__(self, in_channels: Sequence[int], dim: int = 256) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(channels, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim)) for channels in in_channels)

    def forward(self, features: Sequence[torch.Tensor], num_patches: int,
                patch_ids: Sequence[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Project ``num_patches`` random locations of every feature map.

        Args:
            features: per layer ``(N, C_l, *spatial_l)``.
            patch_ids: locations to reuse (from the call on the other image), else drawn here.

        Returns:
            (per layer ``(N, P_l, dim)`` unit vectors with ``P_l = min(num_patches, locations)``,
            per layer the flat location indices used).
        """
        if len(features) != len(self.heads):
            raise ValueError(f"{len(features)} feature maps for {len(self.heads)} projection heads")
        projections, used_ids = [], []
        for layer, (feature, head) in enumerate(zip(features, self.heads)):
            flat = feature.flatten(2).transpose(1, 2)  # (N, S, C)
            if patch_ids is None:
                ids = torch.randperm(flat.shape[1], device=feature.device)[: min(num_patches, flat.shape[1])]
            else:
                ids = patch_ids[layer]
            projections.append(F.normalize(head(flat[:, ids]), dim=-1))
            used_ids.append(ids)
        return projections, used_ids


def patch_nce_loss(query: torch.Tensor, key: torch.Tensor, temperature: float = NCE_TEMPERATURE) -> torch.Tensor:
    """PatchNCE (CUT): each query patch must pick its own key location among the image's patches.

    Args:
        query: ``(N, P, dim)`` projected patches of the output image (unit vectors).
        key: ``(N, P, dim)`` projected patches of the input at the same locations (detached here).
        temperature: softmax temperature (CUT: 0.07).

    Returns:
        Mean cross-entropy; negatives are the other ``P - 1`` locations of the same image.
    """
    logits = torch.bmm(query, key.detach().transpose(1, 2)) / temperature  # (N, P, P)
    targets = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
