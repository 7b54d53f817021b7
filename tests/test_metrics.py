"""Metrics against hand-computed values, skimage, and a slow SynthRAD2025-style reference."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import binary_erosion, uniform_filter
from scipy.signal import fftconvolve
from skimage.metrics import structural_similarity

from latent.evaluation import metrics

SPACING_XYZ = (0.5, 1.0, 3.0)


def reference_ms_ssim(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> float:
    """Slow MS-SSIM written straight from docs/metrics.md (full maps, fftconvolve)."""
    inside = np.where(mask > 0, 1.0, 0.0)
    images = []
    for image in (ct, sct):
        image = np.clip(image.astype(np.float64), -1024.0, 3071.0)
        images.append(np.where(inside == 0, -1024.0, image) + 1024.0)
    pads = [(max((97 - n) // 2, 0), max(97 - n - (97 - n) // 2, 0)) for n in ct.shape]
    x, y = (np.pad(image, pads, mode="edge") for image in images)
    inside = np.pad(inside, pads, mode="edge")
    c1, c2 = (0.01 * 4095.0) ** 2, (0.03 * 4095.0) ** 2
    c3, cov = c2 / 2, 343 / 342
    values = []
    for weight in (0.0448, 0.2856, 0.3001, 0.2363, 0.1333):
        ux, uy = uniform_filter(x, 7), uniform_filter(y, 7)
        vx = cov * (uniform_filter(x * x, 7) - ux * ux)
        vy = cov * (uniform_filter(y * y, 7) - uy * uy)
        vxy = cov * (uniform_filter(x * y, 7) - ux * uy)
        sx, sy = np.clip(vx, 0, None) ** 0.5, np.clip(vy, 0, None) ** 0.5
        lum = np.clip((2 * ux * uy + c1) / (ux * ux + uy * uy + c1), 0, None)
        con = np.clip((2 * sx * sy + c2) / (vx + vy + c2), 0, None)
        struct = np.clip((vxy + c3) / (sx * sy + c3), 0, None)
        ssim_map = lum**weight * con**weight * struct**weight
        crop = (slice(3, -3),) * 3
        values.append(ssim_map[crop][inside[crop].astype(bool)].mean())
        box = np.ones((2, 2, 2)) / 8
        x, y = (fftconvolve(image, box, mode="same")[::2, ::2, ::2] for image in (x, y))
        inside = inside[::2, ::2, ::2]
    return float(np.prod(np.clip(values, 0, 1)))


def body_case(
    shape: tuple[int, int, int], seed: int = 0, noise: float = 80.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ellipsoid body with a bone rod, an sCT with noise and a bias."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape, dtype=np.float64)
    centre = [(n - 1) / 2 for n in shape]
    radius = [0.45 * n for n in shape]
    body = sum(((c - m) / r) ** 2 for c, m, r in zip((z, y, x), centre, radius)) <= 1.2
    ct = np.where(body, 30.0, -1000.0) + rng.normal(0, 20, shape)
    rod = ((y - centre[1]) / (0.15 * shape[1])) ** 2 + ((x - centre[2]) / (0.15 * shape[2])) ** 2 <= 1
    ct[rod & body] = 900.0
    ct = np.round(ct)
    sct = (ct + 15.0 + rng.normal(0, noise, shape)).astype(np.float32)
    return ct.astype(np.int16), sct, body.astype(np.uint8)


# --- MAE / PSNR -------------------------------------------------------------------------------


def test_mae_psnr_by_hand() -> None:
    ct = np.zeros((2, 2, 2))
    sct = np.zeros((2, 2, 2))
    mask = np.zeros((2, 2, 2), dtype=np.uint8)
    mask[0, 0, 0] = mask[1, 1, 1] = 1
    sct[0, 0, 0] = 5000.0  # beyond 3071: counts fully in MAE, clipped in PSNR
    sct[1, 1, 1] = -10.0
    sct[0, 1, 0] = 777.0  # outside the mask: ignored
    assert metrics.mae(ct, sct, mask) == pytest.approx((5000 + 10) / 2, rel=1e-12)
    expected_mse = (3071.0**2 + 10.0**2) / 2
    assert metrics.psnr(ct, sct, mask) == pytest.approx(10 * math.log10(4095.0**2 / expected_mse), rel=1e-12)


def test_psnr_clips_ct_too_and_mask_is_binarised() -> None:
    ct = np.full((1, 1, 2), -3000.0)  # kept for MAE, clipped to -1024 for PSNR
    sct = np.full((1, 1, 2), -1024.0 + 45.0)
    mask = np.array([[[7, 0]]])  # any value > 0 is inside
    assert metrics.mae(ct, sct, mask) == pytest.approx(abs(-3000.0 - (-979.0)), rel=1e-12)
    assert metrics.psnr(ct, sct, mask) == pytest.approx(10 * math.log10(4095.0**2 / 45.0**2), rel=1e-12)


def test_empty_mask_gives_nan() -> None:
    ct, sct, _ = body_case((8, 9, 10))
    empty = np.zeros(ct.shape)
    assert math.isnan(metrics.mae(ct, sct, empty))
    assert math.isnan(metrics.psnr(ct, sct, empty))
    assert math.isnan(metrics.ms_ssim(ct, sct, empty))


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="one shape"):
        metrics.mae(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), np.ones((2, 2, 2)))


def test_identical_volumes_are_perfect() -> None:
    ct, _, mask = body_case((20, 24, 28), seed=1)
    scores = metrics.score_case(ct, ct.copy(), mask, SPACING_XYZ)
    tissues = {f"{kind}_{name}" for name in metrics.TISSUE_CLASSES for kind in ("mae", "bias")}
    assert set(scores) == {"mae", "psnr", "ms_ssim", "ssim", "bone_dice", "bone_hd95"} | tissues
    assert all(scores[key] == 0.0 or math.isnan(scores[key]) for key in tissues)
    assert scores["mae"] == 0.0
    assert scores["psnr"] == math.inf
    assert scores["ms_ssim"] == pytest.approx(1.0, abs=1e-12)
    assert scores["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert scores["bone_dice"] == 1.0
    assert scores["bone_hd95"] == 0.0


# --- MS-SSIM ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "seed"), [((20, 24, 28), 0), ((98, 13, 6), 2)])
def test_ms_ssim_matches_slow_reference(shape: tuple[int, int, int], seed: int) -> None:
    ct, sct, mask = body_case(shape, seed=seed)
    value = metrics.ms_ssim(ct, sct, mask)
    assert 0.0 < value < 1.0
    assert value == pytest.approx(reference_ms_ssim(ct, sct, mask), rel=1e-10)


def test_ms_ssim_matches_reference_for_masks_touching_borders() -> None:
    rng = np.random.default_rng(3)
    ct = rng.normal(0, 600, (16, 18, 20))
    sct = ct + rng.normal(0, 150, ct.shape)
    mask = np.ones(ct.shape, dtype=bool)
    mask[:, :5, :] = False  # an edge-padded face without mask, the others with it
    value = metrics.ms_ssim(ct, sct, mask)
    assert 0.0 < value < 1.0
    assert value == pytest.approx(reference_ms_ssim(ct, sct, mask), rel=1e-10)


def test_ms_ssim_edge_pads_short_axes_to_97_with_the_extra_voxel_after() -> None:
    ct, sct, mask = body_case((90, 40, 30), seed=4)
    value = metrics.ms_ssim(ct, sct, mask)
    # n = 90: (97 - 90) // 2 = 3 slices before, 4 after. Padding by hand first must not change it.
    by_hand = [np.pad(a, ((3, 4), (0, 0), (0, 0)), mode="edge") for a in (ct, sct, mask)]
    assert metrics.ms_ssim(*by_hand) == pytest.approx(value, rel=1e-12)
    swapped = [np.pad(a, ((4, 3), (0, 0), (0, 0)), mode="edge") for a in (ct, sct, mask)]
    assert abs(metrics.ms_ssim(*swapped) - value) > 1e-9


def test_ms_ssim_scores_only_mask_voxels_3_from_the_border() -> None:
    ct, sct, _ = body_case((97, 97, 97), seed=5)
    band = np.ones(ct.shape, dtype=bool)
    band[3:-3, 3:-3, 3:-3] = False  # only the cropped-away border band
    assert math.isnan(metrics.ms_ssim(ct, sct, band))


def single_voxel_ms_ssim(ct_hu: float, sct_hu: float) -> float:
    """MS-SSIM by hand when the mask is one voxel at an index divisible by 16 (97^3 grid).

    Every level then holds one non-zero voxel (value / 8 per halving) at the centre of its
    only scored window, so with a, b the shifted values: mu = a / 343, var = a^2 / 343
    (sample covariance), cov = ab / 343, S = 1.
    """
    c1, c2 = (0.01 * 4095) ** 2, (0.03 * 4095) ** 2
    value = 1.0
    for level, weight in enumerate((0.0448, 0.2856, 0.3001, 0.2363, 0.1333)):
        a, b = (ct_hu + 1024) / 8**level, (sct_hu + 1024) / 8**level
        lum = (2 * a * b / 343**2 + c1) / ((a * a + b * b) / 343**2 + c1)
        con = (2 * a * b / 343 + c2) / ((a * a + b * b) / 343 + c2)
        value *= (lum * con) ** weight
    return value


def test_ms_ssim_single_voxel_by_hand_including_padding_offset() -> None:
    # z has 90 slices: edge padding puts 3 before, so slice 45 becomes 48 = 3 * 16.
    ct, sct, mask = np.full((90, 97, 97), -1024.0), np.full((90, 97, 97), -1024.0), np.zeros((90, 97, 97))
    ct[45, 48, 48], sct[45, 48, 48], mask[45, 48, 48] = 3071.0, -900.0, 1
    expected = single_voxel_ms_ssim(3071.0, -900.0)
    assert expected < 0.95
    assert metrics.ms_ssim(ct, sct, mask) == pytest.approx(expected, rel=1e-12)
    # With 4 slices before, the voxel would land on an odd index: no scored voxel at level 1.
    assert math.isnan(metrics.ms_ssim(*(np.roll(a, -1, axis=0) for a in (ct, sct, mask))))


def test_ms_ssim_falls_with_noise() -> None:
    ct, _, mask = body_case((24, 30, 30), seed=6)
    low = metrics.ms_ssim(ct, body_case((24, 30, 30), seed=6, noise=20.0)[1], mask)
    high = metrics.ms_ssim(ct, body_case((24, 30, 30), seed=6, noise=200.0)[1], mask)
    assert 1.0 > low > high > 0.0


# --- SSIM (SynthRAD2023) ---------------------------------------------------------------------


def skimage_ssim_2023(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray) -> float:
    inside = mask > 0
    prepared = [np.where(inside, np.clip(a.astype(np.float64), -1024, 3000), -1024.0) + 1024 for a in (ct, sct)]
    _, ssim_map = structural_similarity(*prepared, data_range=4024, full=True)
    crop = (slice(3, -3),) * 3
    return float(ssim_map[crop][inside[crop]].mean())


@pytest.mark.parametrize(("shape", "seed"), [((12, 30, 40), 0), ((7, 19, 8), 1), ((30, 25, 20), 2)])
def test_ssim_2023_matches_skimage(shape: tuple[int, int, int], seed: int) -> None:
    ct, sct, mask = body_case(shape, seed=seed, noise=300.0)
    sct[0, 0, 0] = 3050.0  # between the 2023 and 2025 ceilings
    value = metrics.ssim_2023(ct, sct, mask)
    assert value == pytest.approx(skimage_ssim_2023(ct, sct, mask), rel=1e-10)
    assert value < 1.0


def test_ssim_2023_needs_7_voxels_per_axis() -> None:
    with pytest.raises(ValueError, match=">= 7"):
        metrics.ssim_2023(np.zeros((6, 10, 10)), np.zeros((6, 10, 10)), np.ones((6, 10, 10)))


@pytest.mark.parametrize("ceiling_matters", [False, True])
def test_score_case_shares_level_0_only_when_exact(ceiling_matters: bool) -> None:
    # With a voxel between 3000 and 3071 HU the SSIM cannot reuse the MS-SSIM's moments.
    ct, sct, mask = body_case((30, 25, 20), seed=9, noise=300.0)
    if ceiling_matters:
        sct[15, 12, 10] = 3050.0
    scores = metrics.score_case(ct, sct, mask, SPACING_XYZ)
    assert scores["ssim"] == pytest.approx(skimage_ssim_2023(ct, sct, mask), rel=1e-10)
    assert scores["ms_ssim"] == pytest.approx(reference_ms_ssim(ct, sct, mask), rel=1e-10)
    assert scores["ssim"] == pytest.approx(metrics.ssim_2023(ct, sct, mask), rel=1e-12)


def test_score_case_ssim_on_a_mask_reaching_the_unpadded_border() -> None:
    # Short axes are edge-padded for the MS-SSIM; the SSIM must still crop the original border.
    rng = np.random.default_rng(10)
    ct = rng.normal(0, 500, (12, 40, 36))
    sct = ct + rng.normal(0, 120, ct.shape)
    mask = np.ones(ct.shape, dtype=np.uint8)
    mask[:, :, :4] = 0
    scores = metrics.score_case(ct, sct, mask, SPACING_XYZ)
    assert scores["ssim"] == pytest.approx(skimage_ssim_2023(ct, sct, mask), rel=1e-10)
    assert scores["ms_ssim"] == pytest.approx(reference_ms_ssim(ct, sct, mask), rel=1e-10)


def test_score_case_agrees_with_each_metric() -> None:
    ct, sct, mask = body_case((20, 24, 28), seed=11)
    scores = metrics.score_case(ct, sct, mask, SPACING_XYZ)
    assert scores["mae"] == metrics.mae(ct, sct, mask)
    assert scores["psnr"] == metrics.psnr(ct, sct, mask)
    assert scores["bone_dice"] == metrics.bone_dice(ct, sct, mask)
    assert scores["bone_hd95"] == metrics.bone_hd95(ct, sct, mask, SPACING_XYZ)
    assert {k: scores[k] for k in metrics.tissue_errors(ct, sct, mask)} == metrics.tissue_errors(ct, sct, mask)
    inside = mask > 0
    assert scores["mae"] == pytest.approx(np.abs(ct[inside] - sct[inside].astype(np.float64)).mean(), rel=1e-12)


# --- bone Dice / HD95 ------------------------------------------------------------------------


def cubes(shift_zyx: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ct = np.full((24, 24, 24), -1000.0)
    sct = ct.copy()
    ct[4:14, 4:14, 4:14] = 700.0
    z, y, x = (4 + s for s in shift_zyx)
    sct[z : z + 10, y : y + 10, x : x + 10] = 700.0
    return ct, sct, np.ones(ct.shape)


def brute_force_hd95(a: np.ndarray, b: np.ndarray, spacing_zyx: tuple[float, float, float]) -> float:
    surface = [np.argwhere(m ^ binary_erosion(m)) * np.asarray(spacing_zyx) for m in (a, b)]
    dist = np.sqrt(((surface[0][:, None, :] - surface[1][None, :, :]) ** 2).sum(-1))
    return float(max(np.percentile(dist.min(1), 95), np.percentile(dist.min(0), 95)))


def test_bone_dice_of_shifted_cubes() -> None:
    ct, sct, mask = cubes((0, 0, 2))
    assert metrics.bone_dice(ct, sct, mask) == pytest.approx(2 * 800 / 2000)


def test_bone_hd95_uses_zyx_spacing() -> None:
    # Shift by 2 slices along z (3 mm): the whole z-min face of one cube (100 of 488 surface
    # voxels, > 5 %) lies 2 slices from the other cube, nothing lies further.
    ct, sct, mask = cubes((2, 0, 0))
    assert metrics.bone_hd95(ct, sct, mask, SPACING_XYZ) == pytest.approx(6.0)
    ct, sct, mask = cubes((0, 0, 2))  # along x (0.5 mm)
    assert metrics.bone_hd95(ct, sct, mask, SPACING_XYZ) == pytest.approx(1.0)


def test_bone_hd95_matches_brute_force_on_blobs() -> None:
    rng = np.random.default_rng(7)
    z, y, x = np.indices((14, 16, 18))
    ct = np.where(((z - 6) / 5.0) ** 2 + ((y - 8) / 6.0) ** 2 + ((x - 9) / 7.0) ** 2 <= 1, 600.0, 0.0)
    sct = np.where(((z - 7) / 4.0) ** 2 + ((y - 7) / 6.5) ** 2 + ((x - 10) / 5.0) ** 2 <= 1, 600.0, 0.0)
    sct += rng.normal(0, 1, sct.shape)
    mask = np.ones(ct.shape)
    mask[:, :, 16:] = 0  # bone outside the mask does not count
    expected = brute_force_hd95((ct >= 250) & (mask > 0), (sct >= 250) & (mask > 0), (3.0, 1.0, 0.5))
    assert metrics.bone_hd95(ct, sct, mask, SPACING_XYZ) == pytest.approx(expected, rel=1e-9)
    assert expected > 0


def test_surface_distances_kdtree_equals_edt() -> None:
    rng = np.random.default_rng(12)
    a = ndimage_smooth_blobs(rng, (18, 20, 22))
    b = ndimage_smooth_blobs(rng, (18, 20, 22))
    surfaces = [m ^ binary_erosion(m) for m in (a, b)]
    edt = metrics.surface_distances(*surfaces, (3.0, 1.0, 0.5), method="edt")
    tree = metrics.surface_distances(*surfaces, (3.0, 1.0, 0.5), method="kdtree")
    for exact, fast in zip(edt, tree):
        np.testing.assert_allclose(fast, exact, rtol=1e-12)
    with pytest.raises(ValueError, match="method"):
        metrics.surface_distances(*surfaces, (1.0, 1.0, 1.0), method="brute")


def ndimage_smooth_blobs(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    return uniform_filter(rng.normal(0, 1, shape), 5) > 0.1


def test_bone_metrics_with_empty_bone() -> None:
    ct, sct, mask = cubes((0, 0, 0))
    air = np.full(ct.shape, -1000.0)
    assert metrics.bone_dice(air, air, mask) == 1.0
    assert metrics.bone_hd95(air, air, mask, SPACING_XYZ) == 0.0
    assert metrics.bone_dice(ct, air, mask) == 0.0
    assert metrics.bone_hd95(ct, air, mask, SPACING_XYZ) == math.inf
    assert metrics.bone_dice(ct, sct, np.zeros(ct.shape)) == 1.0  # bone outside the mask


def test_bone_threshold_is_inclusive() -> None:
    ct, sct, mask = cubes((0, 0, 0))
    sct[sct > 0] = 250.0
    assert metrics.bone_dice(ct, sct, mask) == 1.0
    assert metrics.bone_dice(ct, sct - 0.5, mask) == 0.0


@pytest.mark.slow
def test_bone_hd95_matches_monai() -> None:
    monai_metrics = pytest.importorskip("monai.metrics")
    rng = np.random.default_rng(8)
    ct = np.where(rng.random((20, 22, 24)) > 0.7, 800.0, 0.0)
    sct = np.where(rng.random(ct.shape) > 0.75, 800.0, 0.0)
    mask = np.ones(ct.shape)
    expected = monai_metrics.compute_hausdorff_distance(
        (sct >= 250)[None, None],
        (ct >= 250)[None, None],
        include_background=True,
        percentile=95,
        spacing=(3.0, 1.0, 0.5),
    )
    assert metrics.bone_hd95(ct, sct, mask, SPACING_XYZ) == pytest.approx(float(expected), rel=1e-5)


# --- summaries -------------------------------------------------------------------------------


def test_tissue_errors_split_the_error_by_true_ct_class() -> None:
    ct = np.array([[[-1000.0, -900.0, 40.0, 60.0, 500.0, 1500.0]]])
    sct = np.array([[[-800.0, -900.0, 0.0, 60.0, 400.0, 1000.0]]])
    errors = metrics.tissue_errors(ct, sct, np.ones_like(ct))
    assert errors["mae_air"] == pytest.approx(100.0) and errors["bias_air"] == pytest.approx(100.0)
    assert errors["mae_soft"] == pytest.approx(20.0) and errors["bias_soft"] == pytest.approx(-20.0)
    assert errors["mae_bone"] == pytest.approx(100.0) and errors["bias_bone"] == pytest.approx(-100.0)
    assert errors["mae_above_1000"] == pytest.approx(500.0)
    empty = metrics.tissue_errors(ct, sct, np.zeros_like(ct))
    assert all(math.isnan(v) for v in empty.values())


def _benchmark_reference():
    """``benchmarks/metrics_reference.py``, the yardstick of ``bench_metrics.py``."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "metrics_reference.py"
    spec = importlib.util.spec_from_file_location("metrics_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("implant", [False, True])
def test_score_case_matches_the_benchmark_reference(implant: bool) -> None:
    ct, sct, mask = body_case((24, 40, 36), seed=13, noise=120.0)
    if implant:
        ct[12, 20, 18] = 3071  # above the SSIM's 3000 HU ceiling: its own moments
    reference = _benchmark_reference().score_case(ct, sct, mask, SPACING_XYZ)
    scores = metrics.score_case(ct.astype(np.float32), sct, mask, SPACING_XYZ)
    assert set(scores) == set(reference)
    for key, expected in reference.items():
        if math.isnan(expected):
            assert math.isnan(scores[key]), key
        else:
            assert scores[key] == pytest.approx(expected, rel=1e-10), key


def test_the_metric_table_names_every_score_and_nothing_else() -> None:
    """One table (latent.evaluation.metrics.METRICS) describes every value of score_case, plus the two
    std-map values evaluate adds (the per-voxel Spearman and the mean std in the mask); evaluate, the
    demo and the bench report read it."""
    from latent.evaluation.metrics import METRICS, metric_names

    rng = np.random.default_rng(0)
    ct = rng.uniform(-1000, 1500, (12, 12, 12)).astype(np.float32)
    mask = np.zeros_like(ct, dtype=bool)
    mask[2:10, 2:10, 2:10] = True
    scores = metrics.score_case(ct, ct + 10, mask, (1.0, 1.0, 1.0))
    assert set(scores) == set(metric_names("image")) | set(metric_names("tissue"))
    assert set(METRICS) == set(scores) | {"std_error_spearman", "std_mean"}
    assert [name for name, metric in METRICS.items() if metric.paired] == ["mae", "psnr", "ms_ssim"]
    assert METRICS["mae"].lower_is_better and not METRICS["psnr"].lower_is_better
