"""The phantom segmenter's weights folder loads as a feature network, and the gap benchmark's rows."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch

from latent.core.phantom.anatomy import LABELS
from latent.core.registration.feature import network_feature_maps
from latent.core.segmentation_network import load_segmentation_network

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grouped_labels_cover_every_phantom_tissue() -> None:
    segmenter = _script("train_phantom_segmenter")
    grouped = segmenter.grouped_labels(np.array(sorted(LABELS), dtype=np.uint8))
    assert grouped[0] == 0 and set(grouped.tolist()) == set(range(segmenter.KWARGS["out_channels"]))
    assert grouped[[k for k, name in LABELS.items() if name == "cortical"][0]] == 5
    assert grouped[[k for k, name in LABELS.items() if name == "muscle"][0]] == 4


def test_a_short_training_writes_a_folder_the_feature_method_reads(tmp_path: Path) -> None:
    segmenter = _script("train_phantom_segmenter")
    out, results = tmp_path / "segmenter", tmp_path / "results"
    assert segmenter.main(["--out", str(out), "--seconds", "1", "--cases", "3", "--results", str(results)]) == 0
    record = json.loads((results / "phantom_segmenter.json").read_text())
    assert record["steps"] >= 1 and set(record["held_out_dice"]) == {"mr", "ct"}
    assert segmenter.main(["--out", str(out), "--seconds", "1", "--results", str(results)]) == 2  # never overwritten
    network = load_segmentation_network(out)
    assert network.layers == tuple(segmenter.LAYERS)
    maps = network_feature_maps(network, torch.rand(10, 20, 24))
    assert maps.shape == (1, segmenter.KWARGS["filters"][0], 10, 20, 24)


def test_gap_rows_one_case() -> None:
    gap = _script("bench_feature_gap")
    rows = gap.measure(1, 0, None)
    assert [(row["kind"], row["pairing"]) for row in rows] == [
        (kind, pairing) for kind in ("images themselves", "stand-in VAE, first level") for pairing in gap.PAIRINGS]
    for row in rows:
        assert row["cases"] == 1 and row["in_plane_mm_before"] > 0.3
        assert (row["floor_in_plane_mm"] is None) == (row["pairing"] == gap.PAIRINGS[1])
