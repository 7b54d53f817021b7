"""The grid floor oracle: CT -> canonical -> native with no model, and its windowed variant."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from latent.app.predict_run import predict_grid_floor
from latent.decode.grid_floor import grid_floor_sct
from latent.core.cases import CaseError, discover_cases
from latent.core.grid import parse_grid_spec
from latent.core.io import read_volume

GRID = "3x3x5:32x128x128"


def _direct_round_trip(case, grid, window: tuple[float, float] = (-1024.0, 3071.0)) -> np.ndarray:
    """The same round trip written straight with SimpleITK: resample onto a box of the grid's shape
    and spacing centred as the pipeline centres it, then back onto the CT's own grid."""
    from latent.core.grid import plan_mapping

    ct = sitk.ReadImage(str(case.ct), sitk.sitkFloat32)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(case.mask))) > 0
    properties = read_volume(case.ct)[1]
    mapping = plan_mapping(mask.astype(np.uint8), properties, grid)
    reference = sitk.Image([int(v) for v in grid.shape[::-1]], sitk.sitkFloat32)
    reference.SetSpacing(grid.spacing)
    reference.SetOrigin(mapping.canonical_origin)
    canonical = sitk.Clamp(sitk.Resample(ct, reference, sitk.Transform(), sitk.sitkLinear, -1024.0), sitk.sitkFloat32,
                           *window)
    back = sitk.GetArrayFromImage(sitk.Resample(canonical, ct, sitk.Transform(), sitk.sitkLinear, -1000.0))
    back[~mask] = -1000.0
    return np.clip(back, -1024, 3071)


def test_grid_floor_matches_a_direct_resample_round_trip(phantom_root: Path, tmp_path: Path) -> None:
    grid = parse_grid_spec(GRID)
    case = discover_cases(phantom_root)[0]
    hu, properties = grid_floor_sct(case, grid)
    expected = _direct_round_trip(case, grid)
    assert hu.shape == expected.shape
    np.testing.assert_allclose(hu, expected, atol=0.05)
    windowed, _ = grid_floor_sct(case, grid, window="vae")
    np.testing.assert_allclose(windowed, _direct_round_trip(case, grid, (-1000.0, 1000.0)), atol=0.05)
    assert windowed.max() <= 1000 and windowed.min() >= -1000


def test_predict_grid_floor_writes_native_grids_and_refuses_cases_without_ct(phantom_root: Path, tmp_path: Path) -> None:
    cases = discover_cases(phantom_root)[:2]
    run = predict_grid_floor(phantom_root, tmp_path / "floor", parse_grid_spec(GRID), pids=[c.pid for c in cases],
                             quiet=True)
    assert run.ok and sorted(run.results) == sorted(c.pid for c in cases)
    for case in cases:
        _, properties = read_volume(tmp_path / "floor" / f"{case.pid}.mha")
        assert properties.same_grid(read_volume(case.mr)[1], tolerance=0)
    no_ct = cases[0].__class__(pid="1ABA999", region="AB", centre="A", mr=cases[0].mr, mask=cases[0].mask)
    with pytest.raises(CaseError, match="1ABA999: the grid floor needs the CT"):
        grid_floor_sct(no_ct, parse_grid_spec(GRID))
