"""Training honours `latent qa`: `latent split --qa` keeps flagged cases out of train and val (never
out of test), `data.exclude_slices` maps flagged native slices onto each case's canonical grid, and
the run records what was kept out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from latent.app.cli import app
from latent.core.cases import QA_EXCLUDED, discover_cases, load_splits, make_splits
from latent.core.grid import CanonicalGrid, GridMapping, canonical_slices
from latent.core.io import VolumeProperties
from test_predict_run import runs  # noqa: F401 - the module fixture: data, cache, splits

runner = CliRunner()
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def test_native_slices_map_onto_the_canonical_slices_they_overlap() -> None:
    native = VolumeProperties((1.0, 1.0, 3.0), (0.0, 0.0, 0.0), IDENTITY, (8, 8, 10), "int16")
    canonical = CanonicalGrid((1.0, 1.0, 1.5), (20, 8, 8), multiple=4)
    mapping = GridMapping(native, canonical, (0.0, 0.0, 0.0), 0.0)
    assert canonical_slices(mapping, [0]) == {0, 1}  # native z [-1.5, 1.5) mm covers canonical 0 and 1
    assert canonical_slices(mapping, [4]) == {7, 8, 9}  # [10.5, 13.5) mm: canonical 7 (10.5), 8 (12), 9 (13.5)
    assert canonical_slices(mapping, [9]) == {17, 18, 19}  # clipped to the grid's 20 slices


def test_split_with_qa_keeps_red_cases_out_of_training_only(phantom_root: Path, tmp_path: Path) -> None:
    splits = make_splits(discover_cases(phantom_root), (0.5, 0.0, 0.5), seed=0)
    red_train, red_test = splits["train"][0], splits["test"][0]
    (tmp_path / "qa").mkdir()
    rows = ["pid,label,reasons"] + [f"{pid},{'RED' if pid in (red_train, red_test) else 'GREEN'},x"
                                    for name in splits for pid in splits[name]]
    (tmp_path / "qa" / "qa.csv").write_text("\n".join(rows) + "\n")
    result = runner.invoke(app, ["split", "--data", str(phantom_root), "--out", str(tmp_path / "s.json"), "--val", "0",
                                 "--test", "0.5", "--qa", str(tmp_path / "qa")])
    assert result.exit_code == 0, result.output
    written = load_splits(tmp_path / "s.json")
    assert written[QA_EXCLUDED] == [red_train] and red_train not in written["train"]
    assert red_test in written["test"]  # the test split is scored whole
    assert f"kept out of training by latent qa: {red_train}" in result.output
    bad = runner.invoke(app, ["split", "--data", str(phantom_root), "--out", str(tmp_path / "t.json"), "--qa",
                              str(tmp_path / "qa"), "--exclude", "blue"])
    assert bad.exit_code == 2 and not (tmp_path / "t.json").exists()
    missing = runner.invoke(app, ["split", "--data", str(phantom_root), "--out", str(tmp_path / "t.json"), "--qa",
                                  str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "qa.csv cannot be read" in missing.output


def test_excluded_slices_reach_the_dataset_and_the_run_record(runs, tmp_path: Path) -> None:  # noqa: F811
    from latent.translate.data import build_cache_datasets
    from latent.translate.train_config import DataConfig

    pid = runs.splits["train"][0]
    (tmp_path / "slices.csv").write_text(f"pid,slice,reason\n{pid},2,MR banding\n{pid},3,MR banding\n")
    splits = {**runs.splits, QA_EXCLUDED: []}
    (tmp_path / "splits.json").write_text(json.dumps(splits))
    data = DataConfig(cache=str(runs.cache), split_file=str(tmp_path / "splits.json"),
                      exclude_slices=str(tmp_path / "slices.csv"), crop=(2, 4, 4))
    train, _, producer = build_cache_datasets(data, ("mr_mu", "ct_mu", "mask_pixels"), ("mr_mu",), seed=0)
    assert producer["qa_exclusions"]["slices"] == {pid: [2, 3]}
    assert list(train.exclude_z) == [pid] and len(train.exclude_z[pid]) >= 1
    assert np.all(np.diff(train.exclude_z[pid]) >= 1)
    with pytest.raises(Exception, match=r"data\.exclude_slices: .*expected the columns pid and slice"):
        (tmp_path / "bad.csv").write_text("case,z\nx,1\n")
        build_cache_datasets(data.model_copy(update={"exclude_slices": str(tmp_path / "bad.csv")}), ("mr_mu",),
                             ("mr_mu",), seed=0)


def test_the_run_records_which_ct_each_training_case_came_from(runs, tmp_path: Path) -> None:  # noqa: F811
    """A run trained on a registered root says so: producer.json names each training case's CT file."""
    from latent.translate.data import build_cache_datasets
    from latent.translate.train_config import DataConfig

    data = DataConfig(cache=str(runs.cache), split_file=str(runs.split_file))
    _, _, producer = build_cache_datasets(data, ("mr_mu", "ct_mu"), ("mr_mu",), seed=0)
    assert set(producer["ct_sources"]) == set(runs.splits["train"])
    assert all(Path(path).name.startswith("ct.") and Path(path).is_file() for path in producer["ct_sources"].values())
