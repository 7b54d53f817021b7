"""Shared fixtures: a small phantom data set generated once per test session."""

from pathlib import Path

import pytest

from latent.phantom import generate_phantom_dataset


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """Six small phantom cases (two per region), generated once; treat as read-only."""
    root = tmp_path_factory.mktemp("phantom")
    generate_phantom_dataset(root, 6, ["AB", "HN", "TH"], seed=11, size="small")
    return root
