"""Phantom defects for QA tests: each lands where its record says, and only there; no defects
leaves the phantom byte-identical; the defect fraction picks cases deterministically."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from latent.core.errors import BadConfigError
from latent.core.phantom.defects import DEFECTS, INJECTED, defect_plan
from latent.core.phantom.generate import (
    CT_OUTSIDE_FOV,
    case_ids,
    case_rng,
    generate_case,
    generate_phantom_dataset,
    render_case,
)

#: One case per region (seeds and ids chosen once; any would do).
PIDS = (("AB", "1ABB002"), ("HN", "1HNC001"), ("TH", "1THD001"))
SEED = 4


def digest(*arrays: np.ndarray) -> str:
    return hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest()


@pytest.fixture(scope="module")
def clean():
    return {pid: render_case(pid, region, case_rng(SEED, pid)) for region, pid in PIDS}


@pytest.fixture(scope="module")
def defective():
    """Each case with each defect alone."""
    return {(pid, name): render_case(pid, region, case_rng(SEED, pid), defects=(name,))
            for region, pid in PIDS for name in DEFECTS}


def changed_slices(a: np.ndarray, b: np.ndarray) -> list[int]:
    return [int(z) for z in np.flatnonzero((a != b).any(axis=(1, 2)))]


def test_no_defects_is_byte_identical(clean, tmp_path):
    for region, pid in PIDS:
        plain = generate_case(pid, region, case_rng(SEED, pid))
        for case in (render_case(pid, region, case_rng(SEED, pid), defects=()),
                     generate_case(pid, region, case_rng(SEED, pid), defects=[])):
            arrays = (case.mr, case.ct, case.mask) if hasattr(case, "mr") else case[:3]
            assert digest(*arrays) == digest(*plain[:3])
        assert clean[pid].info["defects"] == {}
    # whole data set: no argument, defects=(), a fraction of 0 -> the same files
    roots = [tmp_path / name for name in ("plain", "empty", "none_chosen")]
    generate_phantom_dataset(roots[0], 3, seed=SEED)
    generate_phantom_dataset(roots[1], 3, seed=SEED, defects=())
    generate_phantom_dataset(roots[2], 3, seed=SEED, defects=("banding", "ct_offset"), defect_fraction=0.0)
    files = sorted(p.relative_to(roots[0]) for p in roots[0].rglob("*.mha"))
    assert len(files) == 9
    for relative in files:
        assert len({hashlib.sha256((root / relative).read_bytes()).hexdigest() for root in roots}) == 1
    record = json.loads((roots[0] / "phantom.json").read_text())
    assert record["defects"] == [] and record["defect_cases"] == {}


@pytest.mark.parametrize("name", DEFECTS)
def test_each_defect_is_recorded_and_lands_only_on_its_slices(name, clean, defective):
    for _, pid in PIDS:
        base, case = clean[pid], defective[pid, name]
        assert list(case.info["defects"]) == [name]
        record = case.info["defects"][name]
        slices = record["slices"]
        assert slices and slices == sorted(set(slices)) and 0 <= slices[0] and slices[-1] < case.mr.shape[0]
        if name != "metal":  # the tissue map is the anatomy: only metal is painted into it
            np.testing.assert_array_equal(case.labels[case.fov], base.labels[case.fov])
        CHECKS[name](base, case, record)


def check_banding(base, case, record):
    slices = record["slices"]
    assert 2 <= len(slices) <= 4 and slices == list(range(slices[0], slices[-1] + 1))
    assert 0.6 <= record["factor"] <= 0.75 or 1.3 <= record["factor"] <= 1.5
    assert changed_slices(case.mr, base.mr) == slices
    inside = base.mask[slices] > 0
    ratio = case.mr[slices][inside].sum() / base.mr[slices][inside].sum()
    assert abs(ratio - record["factor"]) < 0.02
    np.testing.assert_array_equal(case.ct, base.ct)


def check_fov_cut(base, case, record):
    slices, covered = record["slices"], np.flatnonzero(base.fov.any(axis=(1, 2)))
    assert record["end"] in ("first", "last") and record["side"] in ("x+", "x-", "y+", "y-")
    assert 2 <= len(slices) <= 4
    expected = covered[:len(slices)] if record["end"] == "first" else covered[-len(slices):]
    assert slices == [int(z) for z in expected]
    assert changed_slices(case.ct, base.ct) == slices and changed_slices(case.mr, base.mr) == slices
    assert changed_slices(case.mask, base.mask) == slices
    removed = base.fov & ~case.fov
    assert (case.ct[removed] == CT_OUTSIDE_FOV).all() and (case.mr[removed] == 0).all()
    assert record["removed_body_voxels"] == int((removed & (base.labels > 0)).sum()) > 0
    outer = slices[0] if record["end"] == "first" else slices[-1]
    axis = 0 if record["side"][0] == "y" else 1
    index = record["cut_index"][str(outer)]
    edge = index - 1 if record["side"][1] == "+" else index  # the last kept row / column
    body_at_edge = np.take(case.labels[outer] > 0, edge, axis=axis)
    assert body_at_edge.any()  # the volume ends inside the body: body reaches the cut
    fraction = (case.mask[slices] > 0).sum() / (base.mask[slices] > 0).sum()
    assert 0.3 < fraction < 0.85


def check_extra_object(base, case, record):
    assert record["modality"] in ("ct", "mr") and record["kind"] in ("arm", "tube")
    changed, same = (case.ct, case.mr) if record["modality"] == "ct" else (case.mr, case.ct)
    before = base.ct if record["modality"] == "ct" else base.mr
    np.testing.assert_array_equal(same, base.mr if record["modality"] == "ct" else base.ct)
    assert changed_slices(changed, before) == record["slices"]
    assert len(record["slices"]) >= 3 and record["voxels"] >= 3 * len(record["slices"])
    # the object lies outside the body, in air on the clean volume
    new = (changed != before) & (base.labels == 0)
    assert new.sum() >= record["voxels"]
    if record["modality"] == "ct":
        assert np.median(case.ct[new & (np.abs(case.ct - base.ct) > 300)]) > -300
        np.testing.assert_array_equal(case.mask, base.mask)  # the mask comes from the MR


def check_signal_void(base, case, record):
    slices = record["slices"]
    assert changed_slices(case.mr, base.mr) == slices and 1 <= len(slices) <= 7
    np.testing.assert_array_equal(case.ct, base.ct)
    dark = (case.mr < 0.1 * np.percentile(base.mr[base.mask > 0], 99)) & (case.mr != base.mr)
    assert dark.sum() >= 0.95 * record["voxels"] and record["voxels"] >= 20  # near zero, as many as recorded
    assert changed_slices(dark, np.zeros_like(dark)) == slices
    centre = record["centre_zyx"]
    assert case.mr[tuple(centre)] < 0.1 * np.percentile(base.mr[base.mask > 0], 99)
    # its central disc darkens soft tissue, which was bright before (not bone or air, dark anyway)
    disc = dark[centre[0]]
    assert np.mean(base.mr[centre[0]][disc] > 0.1 * np.percentile(base.mr[base.mask > 0], 99)) > 0.9


def check_ct_offset(base, case, record):
    assert 150 <= record["offset_hu"] <= 300
    covered = [int(z) for z in np.flatnonzero(base.fov.any(axis=(1, 2)))]
    assert record["slices"] == covered
    unclipped = base.fov & (base.ct > -1024) & (base.ct < 2700)
    shift = case.ct[unclipped].astype(int) - base.ct[unclipped]
    assert np.abs(shift - record["offset_hu"]).max() < 1.0  # rounding only
    np.testing.assert_array_equal(case.mr, base.mr)
    np.testing.assert_array_equal(case.mask, base.mask)
    assert (case.ct[~base.fov] == CT_OUTSIDE_FOV).all()


def check_metal(base, case, record):
    slices = record["slices"]
    assert record["voxels"] > 0 and set(slices) <= set(record["streak_slices"]) <= set(record["ct_slices"])
    assert (case.ct[slices] == 3071).any() and not (base.ct == 3071).any()
    assert set(changed_slices(case.ct, base.ct)) <= set(record["ct_slices"])
    assert set(changed_slices(case.mr, base.mr)) <= set(record["mr_void_slices"])
    assert record["mr_void_voxels"] > record["voxels"]


def check_misregistration(base, case, record):
    assert {"yaw_deg", "pitch_deg", "shift_mm_zyx"} <= set(record) and len(record["shift_mm_zyx"]) == 3
    np.testing.assert_array_equal(case.mr, base.mr)
    assert len(changed_slices(case.ct, base.ct)) >= len(record["slices"]) - 1


def check_deformation(base, case, record):
    assert 2.0 <= record["amplitude_mm"] <= 4.0 and 0 < record["mean_mm"] < record["amplitude_mm"]
    np.testing.assert_array_equal(case.mr, base.mr)
    assert len(changed_slices(case.ct, base.ct)) >= len(record["slices"]) - 1
    # the true CT is the clean one: the motion is the only difference
    np.testing.assert_array_equal(case.ct_true, base.ct)


CHECKS = {"banding": check_banding, "fov_cut": check_fov_cut, "extra_object": check_extra_object,
          "signal_void": check_signal_void, "ct_offset": check_ct_offset, "metal": check_metal,
          "misregistration": check_misregistration, "deformation": check_deformation}


def test_each_defect_has_its_own_random_stream(defective):
    """A defect is the same alone and among all others (its stream does not depend on them)."""
    region, pid = PIDS[0]
    together = render_case(pid, region, case_rng(SEED, pid), defects=DEFECTS).info["defects"]
    assert list(together) == list(DEFECTS)
    for name in ("banding", "fov_cut", "ct_offset", "metal", "misregistration"):
        assert together[name] == defective[pid, name].info["defects"][name]
    alone = defective[pid, "extra_object"].info["defects"]["extra_object"]
    assert {k: together["extra_object"][k] for k in ("modality", "kind")} == {k: alone[k] for k in ("modality", "kind")}


def test_flags_and_defect_names_are_the_same(clean):
    region, pid = PIDS[1]
    by_flag = render_case(pid, region, case_rng(SEED, pid), metal=True, misregistration=True)
    by_name = render_case(pid, region, case_rng(SEED, pid), defects=("misregistration", "metal"))
    assert digest(by_flag.mr, by_flag.ct, by_flag.mask) == digest(by_name.mr, by_name.ct, by_name.mask)
    assert list(by_flag.info["defects"]) == ["metal", "misregistration"]
    assert json.dumps(by_flag.info["defects"]) == json.dumps(by_name.info["defects"])  # JSON-ready


def test_defect_fraction_picks_cases_deterministically():
    pids = [pid for _, pid in case_ids(10)]
    plan = defect_plan(pids, ("banding", "signal_void"), 0.2, seed=1)
    assert plan == defect_plan(pids, ("signal_void", "banding"), 0.2, seed=1)
    chosen = [pid for pid, names in plan.items() if names]
    assert len(chosen) == 2 and all(plan[pid] == ("banding", "signal_void") for pid in chosen)
    assert [len([p for p, n in defect_plan(pids, ("banding",), f, seed=1).items() if n]) for f in
            (0.0, 0.05, 0.25, 0.5, 1.0)] == [0, 1, 3, 5, 10]
    one = defect_plan(pids, INJECTED, 0.5, seed=1, per_case="one")
    chosen = [pid for pid in pids if one[pid]]
    assert [one[pid] for pid in chosen] == [(name,) for name in ("banding", "fov_cut", "extra_object", "signal_void",
                                                                 "ct_offset")]
    assert defect_plan(pids, (), 1.0) == {pid: () for pid in pids}


def test_dataset_records_defects_and_leaves_the_other_cases_clean(tmp_path):
    generate_phantom_dataset(tmp_path / "clean", 5, seed=SEED)
    folders = generate_phantom_dataset(tmp_path / "qa", 5, seed=SEED, defects=("banding", "ct_offset"),
                                       defect_fraction=0.4, defects_per_case="one")
    record = json.loads((tmp_path / "qa" / "phantom.json").read_text())
    assert record["defects"] == ["banding", "ct_offset"] and record["defect_fraction"] == 0.4
    assert record["defects_per_case"] == "one" and len(record["defect_cases"]) == 2
    plan = defect_plan(record["cases"], record["defects"], 0.4, SEED, "one")
    assert {pid: list(names) for pid, names in plan.items() if names} == {
        pid: list(defects) for pid, defects in record["defect_cases"].items()}
    for folder in folders:
        same = all((folder / name).read_bytes() == (tmp_path / "clean" / folder.relative_to(tmp_path / "qa") / name)
                   .read_bytes() for name in ("mr.mha", "ct.mha", "mask.mha"))
        assert same == (folder.name not in record["defect_cases"])


def test_invalid_defect_options_are_rejected(tmp_path):
    with pytest.raises(BadConfigError, match="unknown defect 'streaks'"):
        generate_phantom_dataset(tmp_path, 2, defects=("banding", "streaks"))
    with pytest.raises(BadConfigError, match="defect_fraction must be between 0 and 1, got 1.5"):
        generate_phantom_dataset(tmp_path, 2, defects=("banding",), defect_fraction=1.5)
    with pytest.raises(BadConfigError, match="defects_per_case"):
        generate_phantom_dataset(tmp_path, 2, defects=("banding",), defects_per_case="some")
    with pytest.raises(BadConfigError, match="twice"):
        render_case("1ABA001", "AB", case_rng(0, "1ABA001"), defects=("banding", "banding"))
    assert not any(tmp_path.iterdir())  # nothing written
