"""The benchmark report layer: statistics, figures and the written report on tiny synthetic inputs."""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest
from matplotlib import image as mpimg

from latent.app.bench import figures, stats
from latent.app.bench.config import BASELINES, ORACLES, REFERENCES, VAE_FLOOR
from latent.app.bench.report import (COMPUTE_LABELS, METRIC_LABELS, PAIRED_HEADERS, TISSUE_LABELS, library_versions,
                                 write_report)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REGIONS = ("AB", "HN", "TH")
METADATA = {"machine": "test machine", "git_revision": "0" * 40, "note": "Synthetic rows.",
            "recipes": {"water": "none", "bulk": "none"}}


def fake_rows(level: float, seed: int) -> list[dict]:
    """Six cases over three regions with every evaluation column, errors around ``level`` HU."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(6):
        mae = level + 10.0 * index + rng.normal(0, 5)
        row = {"pid": f"1{REGIONS[index % 3]}A{index:03d}", "region": REGIONS[index % 3], "centre": "A",
               "mae": mae, "psnr": 40.0 - mae / 20.0, "ms_ssim": 1.0 - mae / 1000.0, "ssim": 1.0 - mae / 900.0,
               "bone_dice": 0.8 - mae / 2000.0, "bone_hd95": 5.0 + mae / 50.0}
        for column in TISSUE_LABELS:
            row[column] = mae * (1.5 if "bone" in column else 1.0) * (0.1 if column.startswith("bias") else 1.0)
        rows.append(row)
    return rows


@pytest.fixture
def rows_by_method() -> dict[str, list[dict]]:
    return {"water": fake_rows(550.0, 1), "bulk": fake_rows(150.0, 2)}


COMPUTE = {"water": {"train_seconds": 0.0, "seconds_per_volume": 0.02, "parameters": 0},
           "bulk": {"train_seconds": 0.0, "seconds_per_volume": 0.15, "parameters": 0, "peak_memory_mb": 12.0}}


def assert_valid_png(path) -> None:
    """A PNG file whose pixels are not all one value."""
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert float(np.std(mpimg.imread(path))) > 0


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    values = np.random.default_rng(0).normal(100.0, 20.0, 12)
    low, high = stats.bootstrap_ci(values, seed=3)
    assert low < values.mean() < high
    assert stats.bootstrap_ci(values, seed=3) == (low, high)
    assert stats.bootstrap_ci([*values, math.nan], seed=3) == (low, high)
    assert all(math.isnan(v) for v in stats.bootstrap_ci([1.0]))


def test_paired_tests_identical_and_different():
    same = stats.paired_tests([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0])
    assert same["wilcoxon_p"] == 1.0 and same["ttest_p"] == 1.0 and same["cohens_dz"] == 0.0
    assert same["n"] == 4 and same["mean_difference"] == 0.0
    a, b = [10.0, 12.0, 15.0, 11.0, 14.0, 13.0], [1.0, 3.0, 2.0, 4.0, 2.0, 1.0]
    result = stats.paired_tests(a, b)
    assert 0.0 <= result["wilcoxon_p"] <= 1.0 and 0.0 <= result["ttest_p"] < 0.05
    assert result["mean_difference"] == pytest.approx(np.mean(a) - np.mean(b)) and result["cohens_dz"] > 0
    by_pid = stats.paired_tests({"x": 1.0, "y": 3.0, "z": 9.0}, {"y": 2.0, "x": 0.0})
    assert by_pid["n"] == 2 and by_pid["mean_difference"] == 1.0
    assert math.isnan(stats.paired_tests([1.0], [2.0])["wilcoxon_p"])
    infinite = stats.paired_tests([math.inf, 1.0, 2.0], [math.inf, 0.0, 0.5])
    assert infinite["n"] == 3 and 0.0 <= infinite["wilcoxon_p"] <= 1.0


def test_method_table_and_compare_to_best(rows_by_method):
    table = stats.method_table(rows_by_method, ["mae", "psnr"])
    assert {(e["method"], e["region"]) for e in table} == {(m, r) for m in rows_by_method for r in (*REGIONS, "all")}
    overall = next(e for e in table if e["method"] == "bulk" and e["region"] == "all")
    assert overall["n"] == 6 and overall["mae_ci_low"] <= overall["mae"] <= overall["mae_ci_high"]
    best, comparisons = stats.compare_to_best(rows_by_method, "mae")
    assert best == "bulk" and [c["method"] for c in comparisons] == ["water"]
    assert comparisons[0]["mean_difference"] > 0 and 0.0 <= comparisons[0]["wilcoxon_p"] <= 1.0
    assert stats.compare_to_best(rows_by_method, "psnr", lower_is_better=False)[0] == "bulk"


def test_pareto_front_drops_dominated_method():
    points = [{"name": "fast", "mae": 300.0, "seconds_per_volume": 0.1},
              {"name": "accurate", "mae": 100.0, "seconds_per_volume": 10.0},
              {"name": "dominated", "mae": 320.0, "seconds_per_volume": 12.0},
              {"name": "middle", "mae": 200.0, "seconds_per_volume": 1.0}]
    assert [p["name"] for p in stats.pareto_front(points)] == ["fast", "middle", "accurate"]


def test_pareto_front_runs_over_choices_only():
    # The oracle and the baseline would be the whole front (fastest and most accurate); as references they
    # neither join the front nor knock a choice off it.
    points = [{"name": "grid_floor", "mae": 5.0, "seconds_per_volume": 0.01, "reference": REFERENCES["grid_floor"]},
              {"name": "water", "mae": 550.0, "seconds_per_volume": 0.001, "reference": REFERENCES["water"]},
              {"name": "regress3d", "mae": 130.0, "seconds_per_volume": 1.0},
              {"name": "ddim", "mae": 180.0, "seconds_per_volume": 9.0},
              {"name": "pix2pix", "mae": 140.0, "seconds_per_volume": 0.5}]
    assert [p["name"] for p in stats.pareto_front(points)] == ["pix2pix", "regress3d"]
    unmarked = [{key: value for key, value in p.items() if key != "reference"} for p in points]
    assert [p["name"] for p in stats.pareto_front(unmarked)] == ["water", "grid_floor"]


def test_references_are_the_baselines_and_the_methods_that_see_the_ct():
    assert set(REFERENCES) == {*BASELINES, *ORACLES, VAE_FLOOR}
    assert {REFERENCES[name] for name in (*ORACLES, VAE_FLOOR)} == {"sees the CT"}
    assert set(REFERENCES.values()) <= set(figures.REFERENCE_STYLES)


def test_figures_write_valid_pngs(tmp_path, rows_by_method):
    points = [{"name": "water", "mae": 550.0, "seconds_per_volume": 0.0, "reference": "baseline"},
              {"name": "grid_floor", "mae": 8.0, "seconds_per_volume": 0.3, "reference": "sees the CT"},
              {"name": "bulk", "mae": 150.0, "seconds_per_volume": 0.15}]
    assert_valid_png(figures.pareto_plot(points[:2], tmp_path / "references_only.png"))
    table = stats.method_table(rows_by_method, ["mae"])
    written = [figures.pareto_plot(points, tmp_path / "pareto.png"),
               figures.step_curve([(50, 200.0, 4.0), (10, 230.0, 1.0), (20, 210.0, 2.0)], tmp_path / "steps.png"),
               figures.region_bars(table, "mae", tmp_path / "bars.png"),
               figures.training_curves({"a": [(0, 500.0), (10, 300.0)], "b": [(0, 400.0), (5, 350.0)]},
                                       tmp_path / "curves.png")]
    for path in written:
        assert_valid_png(path)


@pytest.mark.parametrize("with_std", [False, True])
def test_slice_panel(tmp_path, with_std):
    rng = np.random.default_rng(0)
    shape = (12, 20, 24)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[2:10, 4:16, 5:20] = 1
    ct = np.where(mask > 0, rng.normal(0, 300, shape), -1000.0).astype(np.float32)
    sct = ct + rng.normal(0, 80, shape).astype(np.float32)
    mr = np.where(mask > 0, rng.uniform(100, 900, shape), 0.0)
    std = np.abs(rng.normal(0, 30, shape)) if with_std else None
    path = figures.slice_panel(mr, ct, sct, mask, tmp_path / "panel.png", std=std, title="1ABA000",
                               spacing_zyx=(3.0, 1.0, 1.0))
    assert_valid_png(path)


def test_write_report(tmp_path, rows_by_method):
    extra = figures.step_curve([(10, 230.0, 1.0), (20, 210.0, 2.0)], tmp_path / "extra" / "step.png")
    md_path, html_path = write_report(tmp_path / "report", rows_by_method, COMPUTE, {"step_curve": extra},
                                      METADATA)
    out = md_path.parent
    markdown = md_path.read_text()
    for header in [*METRIC_LABELS.values(), *TISSUE_LABELS.values(), *PAIRED_HEADERS, *COMPUTE_LABELS.values()]:
        assert f"| {header} |" in markdown, header
    assert "Synthetic rows." in markdown and "test machine" in markdown

    with (out / "results.csv").open() as handle:
        reader = csv.DictReader(handle)
        csv_rows = list(reader)
    expected = ["method", "n", *(f"{m}{suffix}" for m in [*METRIC_LABELS, *TISSUE_LABELS]
                                 for suffix in ("", "_std", "_ci_low", "_ci_high")),
                *(f"{r}_mae" for r in REGIONS), "mae_best", "mae_vs_best_wilcoxon_p", "mae_vs_best_ttest_p",
                "mae_vs_best_cohens_dz", "mae_vs_best_difference", *COMPUTE_LABELS]
    assert not set(expected) - set(reader.fieldnames)
    assert [row["method"] for row in csv_rows] == ["water", "bulk"]

    results = json.loads((out / "results.json").read_text())
    p_values = [c[key] for block in results["paired"].values() for c in block["comparisons"]
                for key in ("wilcoxon_p", "wilcoxon_p_holm", "ttest_p")]
    assert p_values and all(0.0 <= p <= 1.0 for p in p_values)
    assert results["paired"]["mae"]["best"] == "bulk"

    page = html_path.read_text()
    figure_files = sorted((out / "figures").glob("*.png"))
    assert {path.stem for path in figure_files} == {"pareto", "region_mae", "step_curve"}
    for path in figure_files:
        assert_valid_png(path)
    assert page.count("data:image/png;base64,") == len(figure_files) == len(results["figures"])
    assert not re.search(r'src="(?!data:)', page) and ".png" not in page and "href=" not in page
    for header in METRIC_LABELS.values():
        assert f"<th>{header}</th>" in page


def test_write_report_cohort_tables(tmp_path, rows_by_method):
    # bulk has a std map whose case means rank its MAE perfectly; both methods have a StructB per region.
    for row in rows_by_method["bulk"]:
        row["std_mean"] = row["mae"] / 10.0
    structb = {name: {"grid": "3x3x3:96x160x160", "structures": {},
                      "regions": [{"region": "AB", "n": 2, "bone": 0.4 + offset, "body": 0.05},
                                  {"region": "all", "n": 6, "bone": 0.3 + offset, "body": 0.04}]}
               for name, offset in (("water", 1.0), ("bulk", 0.0))}
    md_path, _ = write_report(tmp_path / "report", rows_by_method, COMPUTE, metadata=METADATA,
                              structural_bias=structb)
    markdown = md_path.read_text()
    assert "## StructB of bone (HU >= 250 inside the mask) per region, on the common grid 3x3x3:96x160x160" in markdown
    assert "| water | 1.400 (n=2) | 1.300 (n=6) |" in markdown and "| bulk | 0.050 (n=2) | 0.040 (n=6) |" in markdown
    assert "| bulk | 6 | 1.000 |" in markdown and "| water | 6 |" not in markdown.split("Per-case uncertainty")[1]
    results = json.loads((md_path.parent / "results.json").read_text())
    assert results["cohort"]["case_uncertainty"]["bulk"][-1] == pytest.approx({"region": "all", "n": 6,
                                                                              "spearman": 1.0, "p": 0.0}, abs=1e-9)
    assert set(results["cohort"]["structural_bias"]) == {"water", "bulk"}
    methods = {row["method"]: row for row in results["methods"]}
    assert methods["water"]["structb_bone"] == 1.3 and methods["water"]["AB_structb_body"] == 0.05
    assert methods["bulk"]["case_std_mae_spearman_n"] == 6 and "case_std_mae_spearman" not in methods["water"]


def test_library_versions_lists_installed():
    versions = library_versions()
    assert {"numpy", "scipy", "matplotlib"} <= set(versions)
