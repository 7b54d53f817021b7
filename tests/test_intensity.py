"""Intensity maps and their exact inverses."""

import numpy as np
import pytest

from latent.core.intensity import (
    ct_to_full, ct_to_vae, fit_mr_scaling, full_to_ct, mr_to_unit, unit_to_mr, vae_to_ct,
)


def test_vae_ct_window_inverts_inside_window() -> None:
    hu = np.linspace(-1000, 1000, 2001, dtype=np.float32)
    assert ct_to_vae(np.array([-1000.0, 0.0, 1000.0])).tolist() == [0.0, 0.5, 1.0]
    np.testing.assert_allclose(vae_to_ct(ct_to_vae(hu)), hu, atol=1e-3)
    assert ct_to_vae(np.array([3000.0, -1024.0])).tolist() == [1.0, 0.0]  # saturates


def test_full_range_inverts() -> None:
    hu = np.linspace(-1024, 3071, 4096, dtype=np.float32)
    assert ct_to_full(np.array([-1024.0, 3071.0])).tolist() == [-1.0, 1.0]
    np.testing.assert_allclose(full_to_ct(ct_to_full(hu)), hu, atol=1e-3)


def test_mr_percentile_scaling_inverts_and_ignores_outside_mask() -> None:
    rng = np.random.default_rng(0)
    mr = rng.uniform(0, 800, size=(10, 10, 10)).astype(np.float32)
    mask = np.zeros(mr.shape, np.uint8)
    mask[2:8, 2:8, 2:8] = 1
    mr[mask == 0] = 5000  # outside the body: must not influence the scale
    scaling = fit_mr_scaling(mr, mask)
    assert scaling.scale == pytest.approx(np.percentile(mr[mask > 0], 99.5))
    unit = mr_to_unit(mr, scaling)
    assert (unit[mask > 0] <= 1.0 + 1e-6).mean() > 0.99
    np.testing.assert_allclose(unit_to_mr(unit, scaling), mr, rtol=1e-6)


def test_mr_scaling_refuses_empty_mask() -> None:
    with pytest.raises(ValueError, match="empty body mask"):
        fit_mr_scaling(np.ones((3, 3, 3)), np.zeros((3, 3, 3)))


def test_ct_range_rule_and_mask_values() -> None:
    from latent.core.errors import BadFileError
    from latent.core.intensity import check_ct_range, check_mask_values

    check_ct_range("ct.mha", np.array([-2000.0, -1024.0, 3071.0, 4000.0]))  # the bounds are allowed
    with pytest.raises(BadFileError, match=r"ct\.mha: CT values from -2001 to 0 HU, 1 voxel\(s\) outside"):
        check_ct_range("ct.mha", np.array([-2001.0, 0.0]))
    check_mask_values("mask.mha", np.array([0, 1, 255], np.int16))
    with pytest.raises(BadFileError, match=r"mask mask\.mha: values other than 0 and 1 \(-2, -1\)"):
        check_mask_values("mask.mha", np.array([0, -1, -2, 1], np.int16))
