"""Shared fixtures: a small phantom data set generated once per test session."""

from pathlib import Path

import pytest
import torch

from latent.core.phantom.generate import generate_phantom_dataset


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """Six small phantom cases (two per region), generated once; treat as read-only."""
    root = tmp_path_factory.mktemp("phantom")
    generate_phantom_dataset(root, 6, ["AB", "HN", "TH"], seed=11, size="small")
    return root


@pytest.fixture
def one_thread():
    """Tiny nets gain nothing from threads; on a busy 2-core machine they lose a lot (use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
