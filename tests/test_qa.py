"""`latent qa` (docs/qa.md): descriptors, rules, cohort z-scores, labels, outputs and bad inputs."""

from __future__ import annotations

import csv
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from latent.app.cli import app
from latent.core.cases import scan_cases
from latent.core.errors import BadConfigError
from latent.core.io import read_volume, write_volume
from latent.core.phantom.generate import generate_phantom_dataset
from latent.core.qa.case import describe_case
from latent.core.qa.cohort import mad_z
from latent.core.qa.config import QAConfig, load_qa_config

runner = CliRunner()


def _case(root: Path, pid: str):
    return next(case for case in scan_cases(root).cases if case.pid == pid)


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {row["pid"]: row for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def cohort_root(tmp_path_factory, phantom_root) -> Path:
    """The six clean phantom cases, three more clean ones, and one metal case (renamed 1ABA901)."""
    root = tmp_path_factory.mktemp("qa_cohort")
    shutil.copytree(phantom_root / "Task1", root / "Task1")
    extra = tmp_path_factory.mktemp("qa_extra")
    generate_phantom_dataset(extra, 3, ["AB", "HN", "TH"], seed=23, size="small")
    for folder in (extra / "Task1").glob("*/*"):
        shutil.copytree(folder, root / "Task1" / folder.parent.name / f"{folder.name[:4]}5{folder.name[5:]}")
    metal = tmp_path_factory.mktemp("qa_metal")
    generate_phantom_dataset(metal, 1, ["AB"], seed=5, size="small", metal=True)
    shutil.copytree(next((metal / "Task1" / "AB").iterdir()), root / "Task1" / "AB" / "1ABA901")
    return root


def test_mad_z_matches_the_formula_and_floor():
    values = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    assert mad_z(values)[-1] == pytest.approx(0.6745 * (100 - 3) / 1.0)
    assert mad_z(values, floor=10.0)[-1] == pytest.approx(0.6745 * 97 / 10)


def test_clean_cases_green_and_metal_case_red_with_reason(cohort_root, tmp_path):
    started = time.perf_counter()
    result = runner.invoke(app, ["qa", "--data", str(cohort_root), "--out", str(tmp_path / "qa"), "-q"])
    seconds = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path / "qa" / "qa.csv")
    assert len(rows) == 10 and seconds < 60
    metal = rows.pop("1ABA901")
    assert metal["label"] in ("YELLOW", "RED") and "metal" in metal["flags"]
    assert re.search(r"metal (burden|implant) \(\d+ mm\^3", metal["reasons"])
    assert {pid: row["label"] for pid, row in rows.items()} == {pid: "GREEN" for pid in rows}
    with open(tmp_path / "qa" / "slices.csv", newline="") as handle:
        slices = list(csv.DictReader(handle))
    assert slices and {row["pid"] for row in slices} == {"1ABA901"} and {row["reason"] for row in slices} == {"metal"}
    page = (tmp_path / "qa" / "qa.html").read_text()
    assert page.count("data:image/png;base64,") >= 2  # distributions + the metal case's overlay
    assert not re.search(r"(src|href)=\"(?!data:)", page) and "http" not in page
    record = json.loads((tmp_path / "qa" / "qa.json").read_text())
    assert record["counts"]["GREEN"] == 9 and record["config"]["metal_min_mm3"] == 5.0
    assert "ct_soft_median_zscore" in metal and "nmi_delta" in metal


def test_misregistered_case_lower_nmi_and_positive_gain(phantom_root, tmp_path):
    clean = describe_case(_case(phantom_root, "1ABA001"), QAConfig())
    shutil.copytree(phantom_root / "Task1" / "AB" / "1ABA001", tmp_path / "Task1" / "AB" / "1ABA001")
    path = tmp_path / "Task1" / "AB" / "1ABA001" / "ct.mha"
    ct, properties = read_volume(path, dtype=np.float32)
    moved = ndimage.shift(ct, (0, 2, 2), order=1, cval=-1000.0)  # about 4 mm in y and x
    write_volume(path, np.rint(moved).astype(np.int16), properties, dtype="int16")
    shifted = describe_case(_case(tmp_path, "1ABA001"), QAConfig())
    assert shifted.values["nmi_before"] < clean.values["nmi_before"]
    assert shifted.values["nmi_delta"] > 0.01 > clean.values["nmi_delta"]
    assert shifted.values["rigid_motion_mm"] > 3.0 and clean.values["rigid_motion_mm"] < 0.4
    assert "misregistered" in {f.code for f in shifted.findings}


def test_ct_offset_is_a_cohort_outlier(cohort_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(cohort_root, root)
    path = root / "Task1" / "HN" / "1HNA001" / "ct.mha"
    ct, properties = read_volume(path, dtype=np.float32)
    write_volume(path, np.clip(ct + 300, -1024, 3071).astype(np.int16), properties, dtype="int16")
    result = runner.invoke(app, ["qa", "--data", str(root), "--out", str(tmp_path / "qa"), "-q"])
    assert result.exit_code == 0, result.output
    row = _rows(tmp_path / "qa" / "qa.csv")["1HNA001"]
    assert row["label"] == "YELLOW" and "z_ct_soft_median" in row["flags"]
    assert "CT soft-tissue median unusual for the cohort" in row["reasons"]


def test_bad_cases_fail_in_one_line_and_the_rest_is_reported(phantom_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(phantom_root, root)
    (root / "Task1" / "AB" / "1ABA001" / "ct.mha").unlink()
    mask_path = root / "Task1" / "HN" / "1HNA001" / "mask.mha"
    mask, properties = read_volume(mask_path)
    write_volume(mask_path, np.zeros_like(mask), properties)
    result = runner.invoke(app, ["qa", "--data", str(root), "--out", str(tmp_path / "qa"), "-q"])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert any("1ABA001: no CT file" in line for line in errors)
    assert any("1HNA001: empty mask" in line for line in errors)
    assert "6 case(s): 4 processed, 0 skipped, 2 failed" in result.output
    assert "Traceback" not in result.output
    assert len(_rows(tmp_path / "qa" / "qa.csv")) == 4
    assert set(json.loads((tmp_path / "qa" / "qa.json").read_text())["failures"]) == {"1ABA001", "1HNA001"}
    again = runner.invoke(app, ["qa", "--data", str(root), "--out", str(tmp_path / "qa"), "-q", "--keep-going"])
    assert again.exit_code == 0


def test_config_errors_name_the_field(tmp_path):
    (tmp_path / "unknown.yaml").write_text("metal_hu: 3000\nmetal_treshold: 5\n")
    with pytest.raises(BadConfigError, match="metal_treshold"):
        load_qa_config(tmp_path / "unknown.yaml")
    (tmp_path / "range.yaml").write_text("z_threshold: -1\n")
    with pytest.raises(BadConfigError, match="z_threshold"):
        load_qa_config(tmp_path / "range.yaml")
    assert load_qa_config(None).metal_hu == 2900.0
    result = runner.invoke(app, ["qa", "--data", str(tmp_path), "--out", str(tmp_path / "qa"),
                                 "--config", str(tmp_path / "unknown.yaml")])
    assert result.exit_code == 2 and "metal_treshold" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "qa").exists()


def test_mr_band_flags_its_slices(phantom_root, tmp_path):
    shutil.copytree(phantom_root / "Task1" / "TH" / "1THA001", tmp_path / "Task1" / "TH" / "1THA001")
    path = tmp_path / "Task1" / "TH" / "1THA001" / "mr.mha"
    mr, properties = read_volume(path, dtype=np.float32)
    mr[10:14] *= 1.5
    write_volume(path, np.rint(mr).astype(np.int16), properties, dtype="int16")
    qa = describe_case(_case(tmp_path, "1THA001"), QAConfig())
    assert [k for k, code in qa.slices if code == "mr_banding"] == [10, 11, 12, 13]
    assert "MR banding on slices 10-13" in {f.text for f in qa.findings}


@pytest.mark.parametrize("seed", [3, 4])
def test_local_disagreements_of_mr_ct_and_mask_are_named(tmp_path, seed):
    """The phantom's injected field-of-view cut, one-modality object and MR signal void are found with
    their reason, on the slices where they were put."""
    import json

    from latent.core.qa.case import describe_case
    from latent.core.qa.config import QAConfig

    generate_phantom_dataset(tmp_path, 3, ["AB", "HN", "TH"], seed=seed, size="small",
                             defects=("fov_cut", "extra_object", "signal_void"), defects_per_case="one")
    injected = json.loads((tmp_path / "phantom.json").read_text())["defect_cases"]
    codes = {"fov_cut": "fov_cut", "extra_object": "one_modality", "signal_void": "mr_void"}
    for case in scan_cases(tmp_path).cases:
        (name, record), = injected[case.pid].items()
        qa = describe_case(case, QAConfig())
        assert codes[name] in {finding.code for finding in qa.findings}, (case.pid, name, qa.findings)
        assert {k for k, code in qa.slices if code == codes[name]} & set(record["slices"]), (case.pid, name)
