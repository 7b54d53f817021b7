"""Case discovery, pid parsing, grid checks and splits."""

from pathlib import Path

import numpy as np
import pytest

from latent.cases import (
    CaseError, Case, check_case_grid, discover_cases, load_splits, make_splits, parse_pid, save_splits,
)
from latent.io import VolumeProperties, write_volume

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _write_case(folder: Path, suffix=".mha", with_ct=True, ct_spacing=(1.0, 1.0, 3.0)):
    properties = VolumeProperties((1.0, 1.0, 3.0), (0.0, 0.0, 0.0), IDENTITY, (6, 5, 4))
    array = np.zeros((4, 5, 6), np.int16)
    write_volume(folder / f"mr{suffix}", array, properties)
    write_volume(folder / f"mask{suffix}", array, properties)
    if with_ct:
        ct_properties = VolumeProperties(ct_spacing, (0.0, 0.0, 0.0), IDENTITY, (6, 5, 4))
        write_volume(folder / f"ct{suffix}", array, ct_properties)


def test_parse_pid() -> None:
    assert parse_pid("1ABA005") == ("AB", "A")
    assert parse_pid("1HNC036") == ("HN", "C")
    assert parse_pid("1BA001") == ("brain", "A")
    assert parse_pid("1PC010") == ("pelvis", "C")
    with pytest.raises(CaseError, match="ABC: not a SynthRAD patient id"):
        parse_pid("ABC")


def test_discover_synthrad2025_and_2023_layouts(tmp_path: Path) -> None:
    _write_case(tmp_path / "Task1" / "AB" / "1ABA001")
    _write_case(tmp_path / "Task1" / "TH" / "1THB002", with_ct=False)
    _write_case(tmp_path / "Task1" / "brain" / "1BA001", suffix=".nii.gz")
    (tmp_path / "Task1" / "AB" / "overviews").mkdir()
    cases = discover_cases(tmp_path)
    assert [c.pid for c in cases] == ["1ABA001", "1BA001", "1THB002"]
    brain = cases[1]
    assert (brain.region, brain.centre) == ("brain", "A") and brain.mr.name == "mr.nii.gz"
    assert cases[2].ct is None and cases[2].mask is not None
    assert [c.pid for c in discover_cases(tmp_path, regions=["AB"])] == ["1ABA001"]
    assert [c.pid for c in discover_cases(tmp_path / "Task1" / "AB")] == ["1ABA001"]


def test_discover_empty_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CaseError, match="no cases found"):
        discover_cases(tmp_path)


def test_grid_mismatch_names_case_and_difference(tmp_path: Path) -> None:
    _write_case(tmp_path / "Task1" / "AB" / "1ABA001", ct_spacing=(1.0, 1.0, 2.5))
    case = discover_cases(tmp_path)[0]
    with pytest.raises(CaseError, match=r"1ABA001: ct \S+/ct\.mha is on another grid than the MR: spacing"):
        check_case_grid(case)


def _cases(count_per_stratum=5):
    cases = []
    for region in ("AB", "HN", "TH"):
        for centre in "AB":
            for number in range(count_per_stratum):
                pid = f"1{region}{centre}{number:03d}"
                cases.append(Case(pid, region, centre, Path(f"/x/{pid}/mr.mha")))
    return cases


def test_splits_deterministic_stratified_and_disjoint(tmp_path: Path) -> None:
    cases = _cases()
    first, second = make_splits(cases, seed=3), make_splits(cases, seed=3)
    assert first == second
    assert make_splits(cases, seed=4) != first
    everything = first["train"] + first["val"] + first["test"]
    assert sorted(everything) == sorted(c.pid for c in cases) and len(set(everything)) == len(everything)
    for name in ("val", "test"):
        assert {pid[1:3] for pid in first[name]} == {"AB", "HN", "TH"}
    path = save_splits(first, tmp_path / "splits.json")
    assert load_splits(path) == first


def test_small_strata_still_fill_every_split() -> None:
    splits = make_splits(_cases(count_per_stratum=2), seed=0)
    assert all(len(splits[name]) >= 3 for name in ("val", "test"))


def test_bad_split_file(tmp_path: Path) -> None:
    (tmp_path / "s.json").write_text("{not json")
    with pytest.raises(CaseError, match=r"s\.json: not valid JSON"):
        load_splits(tmp_path / "s.json")
    with pytest.raises(CaseError, match="split file not found"):
        load_splits(tmp_path / "missing.json")
