"""Paired MR/CT phantom: SynthRAD2025 layout, geometry, determinism, tissue contrast, options."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from scipy import ndimage

from latent.core.io import read_volume
from latent.core.phantom.generate import (
    CT_OUTSIDE_FOV,
    MASK_DILATION_MM,
    mask_dilation_voxels,
    MR_OUTSIDE_FOV,
    case_ids,
    case_rng,
    generate_case,
    generate_phantom_dataset,
    render_case,
)
from latent.core.phantom.anatomy import TISSUES

PID = re.compile(r"^1(AB|HN|TH)[A-E]\d{3}$")
LABEL = {name: tissue.label for name, tissue in TISSUES.items()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    return root, generate_phantom_dataset(root, cases=4, seed=3)


@pytest.fixture(scope="module")
def cases():
    """One small case per region and centre A (plus centre E of AB for gain checks)."""
    pids = [("AB", "1ABA001"), ("HN", "1HNA001"), ("TH", "1THA001"), ("AB", "1ABE001")]
    return {pid: render_case(pid, region, case_rng(0, pid)) for region, pid in pids}


def in_body(case, name):
    return case.labels == LABEL[name]


def test_case_ids_spread_over_regions_then_centres():
    plan = case_ids(16)
    assert [region for region, _ in plan[:6]] == ["AB", "HN", "TH", "AB", "HN", "TH"]
    assert all(PID.match(pid) and pid[1:3] == region for region, pid in plan)
    ab = [pid for region, pid in plan if region == "AB"]
    assert ab == ["1ABA001", "1ABB001", "1ABC001", "1ABD001", "1ABE001", "1ABA002"]
    assert len({pid for _, pid in plan}) == 16
    assert case_ids(2, ["TH"]) == [("TH", "1THA001"), ("TH", "1THB001")]


def test_dataset_layout_dtypes_and_one_grid(dataset):
    root, folders = dataset
    assert [f.relative_to(root).as_posix() for f in folders] == [
        "Task1/AB/1ABA001", "Task1/HN/1HNA001", "Task1/TH/1THA001", "Task1/AB/1ABB001"]
    record = json.loads((root / "phantom.json").read_text())
    assert record["seed"] == 3 and record["cases"] == ["1ABA001", "1HNA001", "1THA001", "1ABB001"]
    for folder in folders:
        assert sorted(p.name for p in folder.iterdir()) == ["ct.mha", "mask.mha", "mr.mha"]
        mr, mr_props = read_volume(folder / "mr.mha")
        ct, ct_props = read_volume(folder / "ct.mha")
        mask, mask_props = read_volume(folder / "mask.mha")
        assert mr.dtype == np.int16 and ct.dtype == np.int16 and mask.dtype == np.int16
        assert mr_props.same_grid(ct_props) and mr_props.same_grid(mask_props)
        assert mr_props.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        assert set(np.unique(mask)) == {0, 1}
        assert ct.min() >= -1024 and ct.max() <= 3071 and mr.min() >= 0
        header = (folder / "ct.mha").read_bytes()[:600].decode("latin-1")
        assert "CompressedData = True" in header and "MET_SHORT" in header


def test_small_grid_ranges(cases):
    for case in cases.values():
        sx, sy, sz = case.properties.spacing
        nx, ny, nz = case.properties.size
        assert sx == sy and 1.9 <= sx <= 2.9 and 3.0 <= sz <= 4.0
        assert 96 <= nx <= 128 and 96 <= ny <= 128 and 24 <= nz <= 40
        assert case.mr.shape == case.ct.shape == case.mask.shape == (nz, ny, nx)
    sizes = {case.properties.size for case in cases.values()}
    origins = {case.properties.origin for case in cases.values()}
    assert len(sizes) == len(cases) and len(origins) == len(cases)  # per-case jitter


def test_same_seed_identical_other_seed_different():
    first = generate_case("1THB002", "TH", case_rng(7, "1THB002"))
    again = generate_case("1THB002", "TH", case_rng(7, "1THB002"))
    other = generate_case("1THB002", "TH", case_rng(8, "1THB002"))
    for a, b in zip(first[:3], again[:3]):
        np.testing.assert_array_equal(a, b)
    assert first[3] == again[3]
    assert first[3] != other[3]  # size / spacing / origin jitter
    assert first[1].shape != other[1].shape or (first[1] != other[1]).mean() > 0.5


def test_case_does_not_depend_on_number_of_cases(dataset, tmp_path):
    root, _ = dataset
    (alone,) = generate_phantom_dataset(tmp_path, cases=1, seed=3)
    for name in ("mr.mha", "ct.mha", "mask.mha"):
        many, many_props = read_volume(root / "Task1" / "AB" / "1ABA001" / name)
        one, one_props = read_volume(alone / name)
        np.testing.assert_array_equal(many, one)
        assert many_props == one_props


def test_outside_field_of_view_is_air_and_zero(cases):
    case = cases["1ABA001"]
    assert (~case.fov).any()  # this case has a clipped field of view
    assert (case.ct[~case.fov] == CT_OUTSIDE_FOV).all()
    assert (case.mr[~case.fov] == MR_OUTSIDE_FOV).all()
    assert not case.mask[~case.fov].any()


def test_mask_is_body_dilated_in_plane(cases):
    for case in cases.values():
        body = case.labels > 0
        # MR-dark tissue at the very edge (skull vertex, nostrils) can fall outside an MR-derived
        # outline, as in the real masks; the 10 mm dilation covers nearly all of it.
        assert (case.mask[body] > 0).mean() > 0.995
        z = case.mask.shape[0] // 2
        pixel_mm = case.properties.spacing[0]
        radius = mask_dilation_voxels(pixel_mm)
        assert abs(radius * pixel_mm - MASK_DILATION_MM) <= pixel_mm / 2  # the same distance in mm
        distance = ndimage.distance_transform_edt(~body[z])
        assert case.mask[z][distance <= radius - 1].all()
        assert not case.mask[z][distance > radius + 1.5].any()


def test_ct_tissue_values(cases):
    thorax = cases["1THA001"]
    inside = thorax.mask > 0
    assert (thorax.ct[inside] > 250).sum() > 100  # bone
    assert (thorax.ct[inside & (thorax.labels > 0)] < -800).sum() > 1000  # lungs, airway
    assert np.median(thorax.ct[in_body(thorax, "lung")]) < -780
    for case in cases.values():
        assert -125 < np.median(case.ct[in_body(case, "fat")]) < -75
        assert 20 < np.median(case.ct[in_body(case, "muscle")]) < 70
        assert np.median(case.ct[in_body(case, "cortical")]) > 250
    abdomen = cases["1ABA001"]
    assert np.median(abdomen.ct[in_body(abdomen, "air")]) < -800  # bowel gas
    assert np.median(abdomen.ct[in_body(abdomen, "liver")]) > np.median(abdomen.ct[in_body(abdomen, "kidney")])
    head = cases["1HNA001"]
    assert np.median(head.ct[in_body(head, "air")]) < -800  # airway, sinuses
    assert np.median(head.ct[in_body(head, "teeth")]) > 1000


def test_mr_bone_and_air_dark_fat_bright(cases):
    for case in cases.values():
        fat = np.median(case.mr[in_body(case, "fat")])
        assert np.median(case.mr[in_body(case, "cortical")]) < 0.1 * fat
        assert np.median(case.mr[in_body(case, "air")]) < 0.1 * fat
        assert np.median(case.mr[in_body(case, "muscle")]) < 0.6 * fat
        # context decides: the same dark MR covers both HU extremes
        assert np.median(case.ct[in_body(case, "cortical")]) - np.median(case.ct[in_body(case, "air")]) > 1000


def test_centre_gain_differs(cases):
    low, high = (np.percentile(cases[pid].mr[cases[pid].mask > 0], 99) for pid in ("1ABA001", "1ABE001"))
    assert 300 < low < 500 and 1300 < high < 1900


def test_metal_and_misregistration_change_only_what_they_should():
    pid = "1HNB004"
    plain = render_case(pid, "HN", case_rng(1, pid))
    metal = render_case(pid, "HN", case_rng(1, pid), metal=True)
    moved = render_case(pid, "HN", case_rng(1, pid), misregistration=True)
    assert (metal.labels == LABEL["metal"]).sum() > 0
    assert (metal.ct == 3071).sum() > 0 and (plain.ct == 3071).sum() == 0
    changed = metal.labels != plain.labels
    assert changed.any() and np.isin(metal.labels[changed], [LABEL["metal"]]).all()
    void = (metal.mr < 0.5 * plain.mr) & (plain.labels > 0)
    assert void.sum() > 2 * (metal.labels == LABEL["metal"]).sum()  # MR void wider than the object
    np.testing.assert_array_equal(moved.mr, plain.mr)  # misregistration moves the CT only
    np.testing.assert_array_equal(moved.labels, plain.labels)
    assert np.abs(moved.ct.astype(int) - plain.ct).mean() > 5
    assert moved.info["misregistration"]["yaw_deg"] != 0


def test_invalid_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="regions"):
        generate_phantom_dataset(tmp_path, 2, regions=("AB", "PELVIS"))
    with pytest.raises(ValueError, match="1HNA005"):
        generate_case("1ABA005", "HN", case_rng(0, "1ABA005"))
    with pytest.raises(ValueError, match="size"):
        generate_case("1ABA005", "AB", case_rng(0, "1ABA005"), size="large")
    with pytest.raises(ValueError, match="seed"):
        case_rng(-1, "1ABA005")


@pytest.mark.slow
def test_synthrad_size_grid():
    mr, ct, mask, properties = generate_case("1ABA001", "AB", case_rng(0, "1ABA001"), size="synthrad")
    assert properties.spacing == (1.0, 1.0, 3.0)
    nx, ny, nz = properties.size
    assert 300 <= nx <= 500 and 250 <= ny <= 450 and 60 <= nz <= 120
    assert mr.shape == ct.shape == mask.shape == (nz, ny, nx)
