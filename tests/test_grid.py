"""Canonical grid: native -> canonical -> native restores the geometry exactly."""

import json

import numpy as np
import pytest

from latent.core.grid import (
    CanonicalGrid, GridError, GridMapping, auto_grid, body_extent_mm, parse_grid_spec, plan_mapping,
    to_canonical, to_native,
)
from latent.core.io import VolumeProperties

ROTATED = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
FLIPPED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _smooth_case(direction, size_xyz=(77, 65, 23), spacing=(1.2, 1.1, 3.0)):
    properties = VolumeProperties(spacing, (10.0, -5.0, 3.0), direction, size_xyz, "int16")
    z, y, x = np.mgrid[: size_xyz[2], : size_xyz[1], : size_xyz[0]].astype(np.float32)
    centre = np.array(size_xyz[::-1]) / 2
    radius = np.sqrt(((x - centre[2]) / size_xyz[0]) ** 2 + ((y - centre[1]) / size_xyz[1]) ** 2)
    mask = ((radius < 0.4) & (z > 1) & (z < size_xyz[2] - 2)).astype(np.uint8)
    ct = (200 * np.sin(x / 9.0) + 150 * np.cos(y / 7.0) + 10 * z).astype(np.float32)
    return ct, mask, properties


@pytest.mark.parametrize("direction", [IDENTITY, ROTATED, FLIPPED])
def test_round_trip_restores_geometry_and_values(direction) -> None:
    ct, mask, properties = _smooth_case(direction)
    mapping = plan_mapping(mask, properties, CanonicalGrid((1.5, 1.5, 3.0), (32, 64, 64)))
    canonical = to_canonical(ct, mapping, pad_value=-1024)
    assert canonical.shape == (32, 64, 64)
    native = to_native(canonical, mapping, outside_value=-1000, native_mask=mask)
    assert native.shape == ct.shape
    assert mapping.native == properties  # size, spacing, origin, direction copied exactly
    assert mapping.mask_fraction_outside == 0.0
    # Linear interpolation of a smooth field: error bounded by its curvature over one voxel.
    interior = mask.astype(bool)
    assert np.abs(native - ct)[interior].mean() < 6.0
    assert (native[~interior] == -1000).all()


def test_identity_same_spacing_is_lossless() -> None:
    ct, mask, properties = _smooth_case(IDENTITY, spacing=(1.5, 1.5, 3.0))
    mapping = plan_mapping(mask, properties, CanonicalGrid((1.5, 1.5, 3.0), (32, 96, 96)))
    native = to_native(to_canonical(ct, mapping), mapping)
    np.testing.assert_allclose(native, ct, atol=1e-3)


def test_rotated_volume_reaches_canonical_same_way_up() -> None:
    ct, mask, properties = _smooth_case(IDENTITY, size_xyz=(40, 40, 20), spacing=(2.0, 2.0, 3.0))
    ct[:, :5, :] = 1000.0  # a bright band at low y index (anterior in LPS)
    rotated_ct = np.ascontiguousarray(ct[:, ::-1, ::-1])
    rotated_mask = np.ascontiguousarray(mask[:, ::-1, ::-1])
    flipped_origin = (properties.origin[0] + 39 * 2.0, properties.origin[1] + 39 * 2.0, properties.origin[2])
    flipped = VolumeProperties((2.0, 2.0, 3.0), flipped_origin, FLIPPED, (40, 40, 20), "int16")
    grid = CanonicalGrid((2.0, 2.0, 3.0), (32, 64, 64))
    a = to_canonical(ct, plan_mapping(mask, properties, grid))
    b = to_canonical(rotated_ct, plan_mapping(rotated_mask, flipped, grid))
    np.testing.assert_allclose(a, b, atol=1e-3)


def test_odd_sizes_and_fov_loss_are_reported() -> None:
    ct, mask, properties = _smooth_case(ROTATED, size_xyz=(91, 73, 27))
    mask[:] = 1
    mapping = plan_mapping(mask, properties, CanonicalGrid((2.0, 2.0, 3.0), (32, 32, 32)))
    # 91 x 1.2 mm and 73 x 1.1 mm in-plane, but the grid holds only 64 mm on each axis.
    expected = 1 - (64 / (91 * 1.1)) * (64 / (73 * 1.2))
    assert mapping.mask_fraction_outside == pytest.approx(expected, abs=0.03)
    native = to_native(to_canonical(ct, mapping, pad_value=-1024), mapping, outside_value=-1000)
    assert native.shape == (27, 73, 91)
    assert (native == -1000).any()


def test_mapping_serialises() -> None:
    ct, mask, properties = _smooth_case(ROTATED)
    mapping = plan_mapping(mask, properties, CanonicalGrid((1.5, 1.5, 3.0), (32, 64, 64)))
    assert GridMapping.from_dict(json.loads(json.dumps(mapping.to_dict()))) == mapping


def test_mask_resampling_is_nearest_and_binary() -> None:
    ct, mask, properties = _smooth_case(IDENTITY)
    mapping = plan_mapping(mask, properties, CanonicalGrid((1.7, 1.3, 3.0), (32, 64, 64)))
    canonical_mask = to_canonical(mask, mapping, is_mask=True)
    assert canonical_mask.dtype == np.uint8 and set(np.unique(canonical_mask)) <= {0, 1}
    back = to_native(canonical_mask, mapping, is_mask=True)
    assert (back == mask).mean() > 0.98


def test_grid_specs() -> None:
    assert parse_grid_spec("2x2x3:64x128x96") == CanonicalGrid((2.0, 2.0, 3.0), (64, 128, 96))
    assert parse_grid_spec("synthrad-1.5mm").spacing == (1.5, 1.5, 3.0)
    with pytest.raises(GridError, match="multiples of 32"):
        parse_grid_spec("2x2x3:60x128x96")
    with pytest.raises(GridError, match="expected a preset"):
        parse_grid_spec("big")


def test_auto_grid_covers_every_body() -> None:
    extents, spacings = [], []
    for size in ((70, 60, 20), (90, 50, 30)):
        ct, mask, properties = _smooth_case(IDENTITY, size_xyz=size, spacing=(2.0, 2.0, 3.0))
        extents.append(body_extent_mm(mask, properties))
        spacings.append(properties.spacing)
    grid, coverage = auto_grid(extents, spacings)
    assert grid.spacing == (2.0, 2.0, 3.0)
    assert all(s % 32 == 0 for s in grid.shape)
    assert coverage == 1.0
    capped, capped_coverage = auto_grid(extents, spacings, max_shape=(32, 32, 32))
    assert capped.shape == (32, 32, 32) and capped_coverage < 1.0
