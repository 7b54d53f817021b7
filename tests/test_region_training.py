"""Region training and routing: ``data.regions`` keeps a run to some regions' cases (recorded in
``producer.json``), and an ensemble of region runs predicts each case with its region's run.

The cache and splits come from the ``runs`` fixture of ``test_predict_run`` (six phantom cases,
two per region AB, HN, TH)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from latent.app.predict_run import Ensemble, load_run_and_vae, predict_dataset, predict_from_cache
from latent.core.errors import BadConfigError
from latent.core.io import read_volume
from latent.translate.train import parse_config, train

from test_predict_run import FAMILIES, _Runs, runs  # noqa: F401 - runs is a fixture

MODEL = FAMILIES["unetpp25d"]


def _train(runs: _Runs, name: str, regions: list[str] | None, **data) -> Path:  # noqa: F811
    config = parse_config({
        "data": {"cache": str(runs.cache), "split_file": str(runs.split_file), "batch_size": 2, "preload": True,
                 "regions": regions, **data},
        "model": MODEL,
        "train": {"max_steps": 1, "val_every": 1, "log_every": 1, "checkpoint_every": 1000, "mixed_precision": "no",
                  "tensorboard": False},
        "run_dir": str(runs.root / "region_runs" / name),
    })
    return train(config, quiet=True)


@pytest.fixture(scope="module")
def region_runs(runs: _Runs) -> dict[str, Path]:  # noqa: F811
    return {"AB_TH": _train(runs, "AB_TH", ["AB", "TH"]), "HN": _train(runs, "HN", ["HN"])}


def _region(pid: str) -> str:
    return pid[1:3]


def test_data_regions_keeps_the_cases_of_those_regions_and_records_them(runs, region_runs) -> None:  # noqa: F811
    for name, run_dir in region_runs.items():
        producer = json.loads((run_dir / "producer.json").read_text())
        assert producer["regions"] == name.split("_")
        assert producer["train_ids"] and all(_region(pid) in producer["regions"] for pid in producer["train_ids"])
        assert sorted(producer["train_ids"]) == sorted(pid for pid in runs.splits["train"]
                                                       if _region(pid) in producer["regions"])
        assert sorted(producer["ct_sources"]) == sorted(producer["train_ids"])
    with pytest.raises(BadConfigError, match=r"^data\.regions: none of the 3 cases is of brain"):
        _train(runs, "brain", ["brain"])


def test_an_ensemble_of_region_runs_routes_each_case_to_its_region(runs, region_runs, tmp_path) -> None:  # noqa: F811
    members = {name: load_run_and_vae(run_dir, None) for name, run_dir in region_runs.items()}
    test = runs.splits["test"]
    assert {_region(pid) for pid in test} >= {"HN"} and len({_region(pid) for pid in test}) >= 2
    routed = predict_dataset(Ensemble(list(members.values())), None, runs.data, tmp_path / "routed", pids=test,
                             quiet=True)
    assert not routed.failures
    for name, member in members.items():
        alone = predict_dataset(*member, runs.data, tmp_path / name, pids=test, quiet=True)
        for pid in test:
            if _region(pid) in name.split("_"):
                np.testing.assert_array_equal(read_volume(tmp_path / "routed" / f"{pid}.mha")[0],
                                              read_volume(tmp_path / name / f"{pid}.mha")[0])
                assert not (tmp_path / "routed" / f"{pid}_std.mha").exists()  # one member: no spread
            else:  # a region run alone refuses the other regions' cases
                assert f"region '{_region(pid)}' is covered by no run" in alone.failures[pid]
    cached = predict_from_cache(Ensemble(list(members.values())), None, runs.cache, tmp_path / "cached", pids=test,
                                quiet=True)
    assert not cached.failures and sorted(cached.results) == sorted(test)


def test_a_case_whose_region_no_run_covers_fails_in_one_line_naming_it(runs, region_runs, tmp_path) -> None:  # noqa: F811
    copy = tmp_path / "AB_only"
    shutil.copytree(region_runs["AB_TH"], copy)
    producer = json.loads((copy / "producer.json").read_text())
    (copy / "producer.json").write_text(json.dumps({**producer, "regions": ["AB"]}))
    ensemble = Ensemble([load_run_and_vae(copy, None), load_run_and_vae(region_runs["AB_TH"], None)])
    hn = [pid for pid in runs.splits["test"] + runs.splits["train"] if _region(pid) == "HN"][0]
    result = predict_dataset(ensemble, None, runs.data, tmp_path / "pred", pids=[hn], quiet=True)
    message = result.failures[hn]
    assert "\n" not in message and message.startswith(f"{hn}: region 'HN' is covered by no run")
    assert "AB_only: AB" in message and "AB_TH: AB, TH" in message
