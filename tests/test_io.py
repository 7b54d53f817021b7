"""Volume I/O: round trips keep voxels and geometry; bad files give one clear error."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from latent.io import VolumeError, VolumeProperties, read_volume, write_volume

ROTATED = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def _properties(dtype="int16"):
    return VolumeProperties((0.9, 1.1, 3.0), (-12.5, 40.25, 7.0), ROTATED, (7, 6, 5), dtype)


@pytest.mark.parametrize("suffix", [".mha", ".nii.gz", ".nii", ".nrrd"])
def test_round_trip_keeps_array_and_geometry(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(-1024, 3071, size=(5, 6, 7)).astype(np.int16)
    written = write_volume(tmp_path / f"vol{suffix}", array, _properties())
    again, properties = read_volume(written)
    np.testing.assert_array_equal(again, array)
    assert properties.size == (7, 6, 5)
    assert properties.same_grid(_properties(), tolerance=1e-5)
    assert again.dtype == np.int16


def test_mhd_is_read(tmp_path: Path) -> None:
    array = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    image = _properties().apply_to(sitk.GetImageFromArray(array))
    sitk.WriteImage(image, str(tmp_path / "vol.mhd"))
    again, properties = read_volume(tmp_path / "vol.mhd")
    np.testing.assert_array_equal(again, array)
    assert properties.direction == pytest.approx(ROTATED)



def test_write_is_atomic_and_leaves_no_temporary(tmp_path: Path) -> None:
    array = np.zeros((5, 6, 7), np.int16)
    write_volume(tmp_path / "a.mha", array, _properties())
    with pytest.raises(ValueError):
        write_volume(tmp_path / "a.mha", np.zeros((2, 2, 2)), _properties())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mha"]
    np.testing.assert_array_equal(read_volume(tmp_path / "a.mha")[0], array)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match=r"nope\.mha: file not found"):
        read_volume(tmp_path / "nope.mha")


def test_truncated_file(tmp_path: Path) -> None:
    path = write_volume(tmp_path / "t.mha", np.random.default_rng(1).normal(size=(20, 20, 20)).astype(np.float32),
                        VolumeProperties((1, 1, 1), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (20, 20, 20), "float32"),
                        compress=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError, match=r"t\.mha: cannot be read"):
        read_volume(path)


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.mha"
    path.write_text("hello, not an image\n")
    with pytest.raises(VolumeError, match=r"notes\.mha: cannot be read"):
        read_volume(path)


def test_2d_image(tmp_path: Path) -> None:
    path = tmp_path / "slice.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5), np.int16)), str(path))
    with pytest.raises(VolumeError, match=r"slice\.mha: 2D image"):
        read_volume(path)


def test_single_slice_volume(tmp_path: Path) -> None:
    path = tmp_path / "flat.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((1, 4, 5), np.int16)), str(path))
    with pytest.raises(VolumeError, match=r"flat\.mha: a single slice"):
        read_volume(path)


def test_4d_image(tmp_path: Path) -> None:
    path = tmp_path / "four.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.int16), isVector=False), str(path))
    with pytest.raises(VolumeError, match=r"four\.nii\.gz: 4D image"):
        read_volume(path)


def test_vector_image(tmp_path: Path) -> None:
    path = tmp_path / "rgb.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.uint8), isVector=True), str(path))
    with pytest.raises(VolumeError, match=r"rgb\.mha: vector image with 3 components"):
        read_volume(path)


def test_nan_voxels(tmp_path: Path) -> None:
    array = np.zeros((3, 4, 5), np.float32)
    array[1, 2, 3] = np.nan
    array[0, 0, 0] = np.inf
    path = tmp_path / "nan.mha"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    with pytest.raises(VolumeError, match=r"nan\.mha: 2 NaN/inf voxels"):
        read_volume(path)
