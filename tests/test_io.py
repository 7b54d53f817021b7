"""Volume I/O: round trips keep voxels and geometry; bad files give one clear error."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from latent.core.io import VolumeError, VolumeProperties, read_volume, write_volume

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


# --------------------------------------------------------------------------- issue 32: verified inputs


def _compressed(tmp_path: Path, name: str) -> Path:
    rng = np.random.default_rng(1)
    return write_volume(tmp_path / name, rng.integers(-1024, 3071, size=(5, 6, 7)).astype(np.int16),
                        _properties())


def test_good_compressed_files_and_a_detached_header_in_a_subfolder_pass(tmp_path: Path) -> None:
    from latent.core.volume_files import verify_volume_file

    for name in ("a.mha", "a.nii.gz"):
        verify_volume_file(_compressed(tmp_path, name))
    (tmp_path / "data").mkdir()
    sitk.WriteImage(_properties().apply_to(sitk.GetImageFromArray(np.zeros((5, 6, 7), np.int16))),
                    str(tmp_path / "vol.mhd"), True)
    (tmp_path / "vol.zraw").rename(tmp_path / "data" / "vol.zraw")
    header = tmp_path / "vol.mhd"
    header.write_text(header.read_text().replace("ElementDataFile = vol.zraw", "ElementDataFile = data/vol.zraw"))
    assert read_volume(header)[0].shape == (5, 6, 7)


def test_a_gzip_file_of_two_members_passes_and_a_crc_mismatch_does_not(tmp_path: Path) -> None:
    import gzip

    from latent.core.volume_files import verify_volume_file

    path = tmp_path / "two.gz"
    path.write_bytes(gzip.compress(b"a" * 1000) + gzip.compress(b"b" * 1000))
    verify_volume_file(path)
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF  # the last member's CRC-32 trailer
    path.write_bytes(bytes(data))
    with pytest.raises(VolumeError, match=r"two\.gz: corrupted compressed data \(gzip CRC check failed\)"):
        verify_volume_file(path)


def test_non_finite_geometry_is_a_geometry_error(tmp_path: Path) -> None:
    from latent.core.errors import BadGeometryError

    path = _compressed(tmp_path, "a.mha")
    data = path.read_bytes()
    head, sep, body = data.partition(b"\nElementSpacing = ")
    path.write_bytes(head + sep + b"nan " + body)
    with pytest.raises(BadGeometryError, match=r"a\.mha: ElementSpacing = nan .*non-finite geometry"):
        read_volume(path)


def test_grid_differences_print_plain_numbers() -> None:
    other = VolumeProperties((0.9, 1.1, 3.0), (0.0, 40.25, 7.0), ROTATED, (7, 6, 5))
    assert _properties().grid_differences(other) == ["origin (-12.5, 40.25, 7.0) vs (0.0, 40.25, 7.0)"]
