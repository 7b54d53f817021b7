"""The grid-spacing benchmark's core on two small phantoms (no MAISI timing), and its chooser."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from torch import nn

from latent.core.cases import discover_cases

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_grid_spacing.py"
ROW_COLUMNS = {
    "pid", "region", "grid", "kind", "spacing_mm", "canonical_shape", "canonical_voxels", "bbox_voxels", "voxel_ratio",
    "latent_shape", "body_lost_fraction", "tile_window", "tile_windows", "processed_voxels", "processed_ratio",
    "largest_activation_bytes", "est_encode_s", "est_peak_rss_gib", "mae", "psnr", "ms_ssim", "bone_dice",
    "mae_vae_window",
}


class _TinyVAE(nn.Module):
    """Shapes only, like MAISI's encoder (factor 4): keeps MONAI's import and MAISI's meta probes out of the test."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Conv3d(1, 8, 3, padding=1)
        self.encoder.channels = (8, 8, 8)

    def encode(self, x):
        return self.encoder(x)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_grid_spacing", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclass looks its module up there
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


def test_core_tabulates_floor_and_cost_per_case_and_grid(phantom_root: Path) -> None:
    bench = _bench()
    cases = [c for c in discover_cases(phantom_root) if c.region in ("AB", "HN")][::2][:2]
    choices = bench.grid_choices([3.0], native=True, fixed=["3x3x4:32x32x32"])
    report = bench.measure_grids(cases, choices, throughput=None, vae=_TinyVAE())
    assert len(report["rows"]) == len(cases) * 3 and len(report["cases"]) == len(cases)
    for row in report["rows"]:
        assert ROW_COLUMNS <= set(row)
        assert row["latent_shape"] == [s // 4 for s in row["canonical_shape"]]
        assert row["est_encode_s"] is None and row["tile_windows"] == 1
        assert row["largest_activation_bytes"] == 8 * row["canonical_voxels"] * 4  # 8 channels, fp32
    summary = {s["grid"]: s for s in report["summary"]}
    assert list(summary) == ["3x3x3:fit", "native", "3x3x4:32x32x32"]
    assert summary["native"]["mae_worst"] < 1.0  # the native spacing is (almost) lossless
    assert summary["3x3x3:fit"]["body_lost_max"] == 0.0 and summary["3x3x3:fit"]["mae_mean"] > summary["native"]["mae_mean"]
    assert summary["3x3x4:32x32x32"]["body_lost_max"] > 0.1  # the tiny fixed grid cuts the body
    assert set(summary["native"]["regions"]) == {c.region for c in cases}
    assert report["choice"]["grid"] in (None, "3x3x3:fit")  # only fitted spacings are candidates
    assert "native" not in [v["grid"] for v in report["choice"]["verdicts"]]


def _summary(grid: str, mean: float, worst: float, voxels: int, lost: float = 0.0, kind: str = "fit") -> dict:
    spacing = float(grid.split("-")[-1].rstrip("m")) if kind == "fit" else 1.0
    return {"grid": grid, "kind": kind, "spacing_mm": [spacing, spacing, 3.0], "mae_mean": mean, "mae_worst": worst,
            "mae_worst_case": "1ABA001", "body_lost_max": lost, "voxels_total": voxels, "voxels_mean": voxels / 6}


@pytest.mark.parametrize(("table", "expected"), [
    # the cheapest passing spacing wins
    ([_summary("fit-1mm", 0.5, 1.0, 900), _summary("fit-1.5mm", 6.0, 15.0, 400), _summary("fit-2mm", 9.0, 25.0, 200)],
     "fit-1.5mm"),
    # a cheaper grid that meets the MAE rule but cuts a body is out; native and fixed are never chosen
    ([_summary("fit-1mm", 0.5, 1.0, 900), _summary("fit-2mm", 5.0, 9.0, 200, lost=0.01),
      _summary("native", 0.0, 0.0, 100, kind="native"), _summary("synthrad-3mm", 1.0, 2.0, 50, kind="fixed")],
     "fit-1mm"),
    # none meets it (mean too high, worst too high): no choice, and the rule is not relaxed
    ([_summary("fit-1mm", 10.5, 12.0, 900), _summary("fit-2mm", 8.0, 20.5, 200)], None),
])
def test_chooser(table: list[dict], expected: str | None) -> None:
    choice = _bench().choose(table)
    assert choice["grid"] == expected
    if expected is None:
        assert choice["reason"].startswith("no fitted spacing meets the rule")
        assert "fit-1mm: mean MAE 10.50 > 10 HU" in choice["reason"]
        assert "fit-2mm: worst MAE 20.50 HU (1ABA001) > 20 HU" in choice["reason"]
    else:
        assert choice["reason"].startswith(expected)
