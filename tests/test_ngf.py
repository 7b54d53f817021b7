"""NGF loss: exact zero for identical images, scale invariance, larger for misaligned edges."""

from __future__ import annotations

import math

import pytest
import torch

from latent.translate.models.gan_losses import ngf_loss, robust_range, spatial_gradients


def _squares(shape: tuple[int, ...], shift: int = 0) -> torch.Tensor:
    """Two-level image with a square (2D) or cube (3D) and a smaller bright inset, (1, 1, *shape)."""
    torch.manual_seed(0)
    image = torch.zeros(1, 1, *shape)
    outer = tuple(slice(s // 4 + shift, 3 * s // 4 + shift) for s in shape)
    inner = tuple(slice(s // 2 + shift, s // 2 + 3 + shift) for s in shape)
    image[(Ellipsis,) + outer] = 0.4
    image[(Ellipsis,) + inner] = 1.0
    return image + 0.01 * torch.randn_like(image)


@pytest.mark.parametrize("shape", [(32, 32), (12, 24, 24)])
def test_identical_images_give_exactly_zero(shape):
    image = _squares(shape)
    assert ngf_loss(image, image).item() == 0.0
    mask = torch.zeros_like(image)
    mask[..., 4:-4, 4:-4] = 1
    assert ngf_loss(image, image.clone(), mask=mask).item() == 0.0
    # Parallel gradients of any sign and scale (other modality, inverted contrast) also give 0.
    assert ngf_loss(image, 5.0 - 3.0 * image).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("shape", [(32, 32), (12, 24, 24)])
def test_invariant_to_intensity_scaling_of_either_image(shape):
    # float64 so that large offsets on tiny scales keep the noise's digits (float32 would round
    # them); exact up to the 1e-12 floor added to eps.
    reference, moved = _squares(shape).double(), _squares(shape, shift=2).double()
    base = ngf_loss(moved, reference).item()
    assert base > 0.01
    for scale, offset in [(7.5, 0.0), (0.01, 3.0), (-2.0, 1.0), (4095.0, -1024.0)]:
        assert ngf_loss(moved * scale + offset, reference).item() == pytest.approx(base, rel=1e-7)
        assert ngf_loss(moved, reference * scale + offset).item() == pytest.approx(base, rel=1e-7)
    # float32 at scales of the data: same value to float precision.
    assert ngf_loss(moved.float() * 3.0, reference.float()).item() == pytest.approx(base, rel=1e-5)


@pytest.mark.parametrize("shape", [(32, 32), (12, 24, 24)])
def test_larger_for_misaligned_edges(shape):
    reference = _squares(shape)
    aligned = ngf_loss(_squares(shape) * 2.0 - 1.0, reference).item()
    one = ngf_loss(_squares(shape, shift=1), reference).item()
    two = ngf_loss(_squares(shape, shift=2), reference).item()
    assert aligned < 1e-6
    assert one > aligned + 0.01 and two > aligned + 0.01


def test_rotated_edges_cost_more_than_parallel_ones():
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    vertical = (x > 15).float()[None, None]
    shifted_vertical = (x > 13).float()[None, None]
    horizontal = (y > 15).float()[None, None]
    both = vertical + shifted_vertical  # two parallel edges: gradients parallel wherever both exist
    assert ngf_loss(both, vertical).item() == pytest.approx(0.0, abs=1e-7)
    assert ngf_loss(horizontal, vertical).item() > 0.0


def test_value_range_mask_and_gradients():
    reference, moved = _squares((32, 32)), _squares((32, 32), shift=3).requires_grad_(True)
    loss = ngf_loss(moved, reference)
    assert 0.0 < loss.item() <= 1.0
    loss.backward()
    assert torch.isfinite(moved.grad).all() and moved.grad.abs().sum() > 0
    # Constant images have no gradient field: 0, not NaN.
    flat = torch.full((1, 1, 16, 16), 0.3)
    assert ngf_loss(flat, reference[..., :16, :16]).item() == 0.0
    # An empty mask averages over nothing.
    assert ngf_loss(moved, reference, mask=torch.zeros_like(reference)).item() == 0.0


def test_absolute_eps_is_not_scale_invariant():
    reference, moved = _squares((32, 32)), _squares((32, 32), shift=2)
    small = ngf_loss(moved * 0.01, reference, relative_eps=False).item()
    large = ngf_loss(moved, reference, relative_eps=False).item()
    assert not math.isclose(small, large, rel_tol=1e-2)


def test_spatial_gradients_and_robust_range():
    z, y, x = torch.meshgrid(torch.arange(4.0), torch.arange(5.0), torch.arange(6.0), indexing="ij")
    ramp = (3 * z + 2 * y - x)[None, None]
    grads = spatial_gradients(ramp)
    assert grads.shape == (1, 1, 3, 3, 4, 5)
    assert torch.equal(grads[0, 0, 0], torch.full((3, 4, 5), 3.0))
    assert torch.equal(grads[0, 0, 1], torch.full((3, 4, 5), 2.0))
    assert torch.equal(grads[0, 0, 2], torch.full((3, 4, 5), -1.0))
    values = torch.arange(101.0).reshape(1, 1, 101)[..., torch.randperm(101)].reshape(1, 1, 1, 101)
    assert robust_range(values).item() == 98.0  # 99th - 1st order statistic of 0..100
    assert robust_range(-values).item() == 98.0
    with pytest.raises(ValueError, match="equal shapes"):
        ngf_loss(ramp, ramp[..., :-1])
    with pytest.raises(ValueError, match="2 or 3 spatial axes"):
        spatial_gradients(torch.zeros(1, 1, 8))


def test_prediction_range_replaces_the_predictions_own_scale():
    reference, moved = _squares((32, 32)).double(), _squares((32, 32), shift=2).double()
    own = ngf_loss(moved, reference).item()
    assert ngf_loss(moved, reference, prediction_range=robust_range(moved)).item() == own
    # Judged on a target's scale, a faint copy of the edges is not blown up to full-strength edges.
    faint = ngf_loss(moved * 0.01, reference, prediction_range=robust_range(moved)).item()
    assert faint < 0.05 * own
    assert ngf_loss(moved, reference * 50.0, prediction_range=robust_range(moved)).item() == pytest.approx(own, rel=1e-7)
