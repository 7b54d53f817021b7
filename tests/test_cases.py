"""Case discovery, pid parsing, grid checks and splits."""

import json
from pathlib import Path

import numpy as np
import pytest

from latent.core.cases import (
    CaseError, Case, check_case_grid, discover_cases, load_splits, make_splits, parse_pid, save_splits,
)
from latent.core.io import VolumeProperties, write_volume

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _write_case(folder: Path, suffix=".mha", with_ct=True, ct_spacing=(1.0, 1.0, 3.0)):
    properties = VolumeProperties((1.0, 1.0, 3.0), (0.0, 0.0, 0.0), IDENTITY, (6, 5, 4))
    array = np.zeros((4, 5, 6), np.int16)
    # each case its own MR: byte-identical MRs in two folders are refused as one patient twice
    write_volume(folder / f"mr{suffix}", array + sum(map(ord, folder.name)), properties)
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


def test_split_files_are_checked_for_leaks(tmp_path: Path) -> None:
    """Issue 32 item 4: a case in two splits, an id twice, an id the data does not hold."""
    from latent.core.cases import check_split_ids
    from latent.core.errors import BadFileError

    path = tmp_path / "s.json"
    many = [f"1ABA{number:03d}" for number in range(7)]
    path.write_text(json.dumps({"train": many + ["1HNA001", "1HNA001"], "val": ["1HNA002"], "test": many}))
    with pytest.raises(BadFileError) as caught:
        load_splits(path)
    assert str(caught.value) == (
        f"{path}: 1 id(s) listed more than once in 'train': 1HNA001; 7 case(s) in more than one split: "
        "1ABA000 (train/test), 1ABA001 (train/test), 1ABA002 (train/test), 1ABA003 (train/test), "
        "1ABA004 (train/test), ... (7 in all)")
    splits = {"train": ["1ABA001", "1ABA777"], "val": [], "test": ["1ABA999"]}
    with pytest.raises(BadFileError, match=r"s\.json: 1 id\(s\) of 'train' not in /data: 1ABA777$"):
        check_split_ids(path, splits, ["train", "val"], ["1ABA001"], "/data")
    check_split_ids(path, splits, ["val"], [], "/data")  # only the splits a command uses


def test_one_patient_in_two_folders_is_refused(tmp_path: Path) -> None:
    """Issue 32 item 4: a linked folder, a hard-linked or soft-linked MR, a byte-identical copy."""
    import os
    import shutil

    first = tmp_path / "Task1" / "AB" / "1ABA001"
    _write_case(first)
    _write_case(tmp_path / "Task1" / "AB" / "1ABA002")  # another MR of the same size: hashed, differs
    assert len(discover_cases(tmp_path)) == 2
    second = first.parent / "1ABA003"
    for make, why in (
        (lambda: second.symlink_to(first, target_is_directory=True), "one folder is a link to the other"),
        (lambda: (shutil.copytree(first, second), (second / "mr.mha").unlink(),
                  os.link(first / "mr.mha", second / "mr.mha")), "their mr files are one file"),
        (lambda: (shutil.copytree(first, second), (second / "mr.mha").unlink(),
                  (second / "mr.mha").symlink_to(first / "mr.mha")), "their mr files are one file"),
        (lambda: shutil.copytree(first, second), "their mr files are identical"),
    ):
        make()
        with pytest.raises(CaseError, match=f"^{first} and {second}: the same mr volume, {why}"):
            discover_cases(tmp_path)
        second.unlink() if second.is_symlink() else shutil.rmtree(second)


def test_same_size_mrs_that_differ_only_between_the_samples_are_two_patients(tmp_path: Path) -> None:
    from latent.core.duplicates import same_volumes

    size = 1 << 20  # the three 64 KiB samples (start, middle, end) agree; bytes at 100 KiB differ
    mrs = {}
    for number in range(3):
        content = bytearray(size)
        content[100 * 1024] = number % 2  # cases 0 and 2 are byte-identical, 1 differs
        (tmp_path / f"{number}.mha").write_bytes(bytes(content))
        mrs[tmp_path / str(number)] = tmp_path / f"{number}.mha"
    assert same_volumes(mrs) == [(tmp_path / "0", tmp_path / "2", "their mr files are identical (same SHA-256)")]
