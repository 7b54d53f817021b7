"""The dose plan cache loads a pickled plan only when it carries this user's signature."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from latent.evaluation.dose.plan_cache import KEY_ENV, PlanCache
from latent.evaluation.dose.planning import TreatmentPlan

KEY = "ab" * 32


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> PlanCache:
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "secret.key"))
    plan = TreatmentPlan("photon", {"beams": [0, 120, 240]}, np.ones(5), np.zeros((2, 2, 2)), {"note": "test"})
    store = PlanCache(tmp_path / "plans")
    store.save("1ABA001", "photon", KEY, plan)
    return store


def test_a_signed_plan_is_reused(cache: PlanCache) -> None:
    plan = cache.load("1ABA001", "photon", KEY)
    assert plan is not None and plan.stf == {"beams": [0, 120, 240]}
    np.testing.assert_array_equal(plan.weights, np.ones(5))


def test_an_altered_pickle_is_never_unpickled(cache: PlanCache, caplog) -> None:
    pickled = cache.entry("1ABA001", "photon", KEY) / "stf.pkl"
    pickled.write_bytes(pickled.read_bytes() + b"\x00")
    with caplog.at_level(logging.WARNING):
        assert cache.load("1ABA001", "photon", KEY) is None
    assert "not signed by this user's key" in caplog.text


def test_a_plan_from_another_key_is_ignored(cache: PlanCache, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "another.key"))  # another user or machine
    assert cache.load("1ABA001", "photon", KEY) is None


def test_an_unsigned_entry_is_ignored(cache: PlanCache) -> None:
    record_path = cache.entry("1ABA001", "photon", KEY) / "plan.json"
    record = json.loads(record_path.read_text())
    record.pop("stf_hmac")
    record_path.write_text(json.dumps(record))
    assert cache.load("1ABA001", "photon", KEY) is None
