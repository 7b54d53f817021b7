"""decode stage: model output -> HU -> native grid -> .mha / DICOM series / Grand Challenge layout."""

import json
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from monai.networks.nets import AutoencoderKL

import latent.decode.dicom as dicom_module
from latent.decode.dicom import DicomWriteError, write_dicom_series
from latent.decode.gc_io import GCInputError, gc_output_path, parse_region, read_gc_inputs
from latent.decode.native import canonical_to_native_sct, std_to_native
from latent.decode.sct import output_to_canonical_hu
from latent.decode.writers import prediction_paths, write_prediction, write_sct
from latent.core.grid import CanonicalGrid, plan_mapping
from latent.core.intensity import full_to_ct, vae_to_ct
from latent.core.io import VolumeError, VolumeProperties, read_volume, write_volume
from latent.core.vae.inference import decode as vae_decode

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _oblique_direction() -> tuple[float, ...]:
    """A proper rotation about two axes (30 deg in-plane, 17 deg tilt): no zero cosines."""
    a, b = math.radians(30), math.radians(17)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return tuple(float(v) for v in (rz @ rx).ravel())


OBLIQUE = _oblique_direction()
#: x and z flipped: still a proper rotation (determinant +1).
FLIPPED = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
#: Only x flipped: left-handed (determinant -1), which DICOM cannot index the same way.
LEFT_HANDED = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _properties(direction=IDENTITY, size=(7, 6, 5)) -> VolumeProperties:
    # Anisotropic in-plane spacing so that a swapped PixelSpacing order is caught.
    return VolumeProperties((0.9, 1.1, 3.0), (-120.5, 40.25, -7.0), direction, size, "int16")


def _random_hu(properties: VolumeProperties, seed: int = 0) -> np.ndarray:
    shape = tuple(reversed(properties.size))
    return np.random.default_rng(seed).integers(-1024, 3072, size=shape).astype(np.int16)


def _read_series_sitk(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    (series_id,) = reader.GetGDCMSeriesIDs(str(folder))
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series_id))
    return reader.Execute()


def _assert_same_grid(image: sitk.Image, properties: VolumeProperties) -> None:
    assert image.GetSize() == properties.size
    np.testing.assert_allclose(image.GetSpacing(), properties.spacing, atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), properties.origin, atol=1e-6)
    np.testing.assert_allclose(image.GetDirection(), properties.direction, atol=1e-9)


# ---------------------------------------------------------------- DICOM series


@pytest.mark.parametrize("direction", [IDENTITY, OBLIQUE, FLIPPED], ids=["identity", "oblique", "flipped"])
def test_dicom_series_rereads_to_same_voxels_and_geometry(tmp_path: Path, direction) -> None:
    properties = _properties(direction)
    hu = _random_hu(properties)
    files = write_dicom_series(tmp_path / "sct", hu, properties, "1ABA005")
    assert [f.name for f in files] == [f"CT_{i:04d}.dcm" for i in range(1, 6)]

    image = _read_series_sitk(tmp_path / "sct")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), hu)
    _assert_same_grid(image, properties)

    again, again_properties = read_volume(tmp_path / "sct")
    np.testing.assert_array_equal(again, hu)
    assert again.dtype == np.int16  # 12 bits stored + intercept -1024: readers give signed 16 bit
    assert again_properties.same_grid(properties, tolerance=1e-6)


def test_dicom_geometry_tags_follow_the_direction(tmp_path: Path) -> None:
    properties = _properties(OBLIQUE)
    files = write_dicom_series(tmp_path / "sct", _random_hu(properties), properties, "p")
    direction = np.asarray(OBLIQUE).reshape(3, 3)
    for index, path in enumerate(files):
        ds = pydicom.dcmread(path)
        expected_position = np.asarray(properties.origin) + direction[:, 2] * index * 3.0
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], expected_position, atol=1e-9)
        np.testing.assert_allclose(
            [float(v) for v in ds.ImageOrientationPatient], np.r_[direction[:, 0], direction[:, 1]], atol=1e-12
        )
        assert [float(v) for v in ds.PixelSpacing] == [1.1, 0.9]  # [row spacing (y), column spacing (x)]
        assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == 3.0
        assert (ds.Rows, ds.Columns) == (6, 7)
        assert ds.InstanceNumber == index + 1


def test_left_handed_direction_keeps_voxels_at_their_physical_positions(tmp_path: Path) -> None:
    properties = _properties(LEFT_HANDED)
    hu = _random_hu(properties)
    write_dicom_series(tmp_path / "sct", hu, properties, "p")
    again, again_properties = read_volume(tmp_path / "sct")
    # DICOM readers rebuild the slice axis as row x column and index slices along it.
    np.testing.assert_array_equal(again, hu[::-1])
    last_slice = np.asarray(properties.origin) + np.asarray(LEFT_HANDED).reshape(3, 3)[:, 2] * 3.0 * 4
    np.testing.assert_allclose(again_properties.origin, last_slice, atol=1e-6)
    np.testing.assert_allclose(again_properties.direction, (-1, 0, 0, 0, 1, 0, 0, 0, -1), atol=1e-9)


def test_dicom_hu_round_trip_is_exact_over_the_full_range(tmp_path: Path) -> None:
    properties = VolumeProperties((1.0, 1.0, 3.0), (0.0, 0.0, 0.0), IDENTITY, (32, 32, 4), "int16")
    hu = np.arange(-1024, 3072, dtype=np.int16).reshape(4, 32, 32)
    files = write_dicom_series(tmp_path / "sct", hu, properties, "p")
    again, _ = read_volume(tmp_path / "sct")
    np.testing.assert_array_equal(again, hu)
    ds = pydicom.dcmread(files[0])
    assert (ds.RescaleSlope, ds.RescaleIntercept, ds.PixelRepresentation, ds.BitsStored) == (1, -1024, 0, 12)
    np.testing.assert_array_equal(ds.pixel_array.astype(np.int32) - 1024, hu[0])


def test_dicom_rounds_and_clips_float_hu(tmp_path: Path) -> None:
    properties = VolumeProperties((1.0, 1.0, 3.0), (0.0, 0.0, 0.0), IDENTITY, (3, 2, 2), "int16")
    hu = np.array([-5000.0, -1024.4, -0.6, 0.4, 3070.6, 9999.0] * 2, np.float32).reshape(2, 2, 3)
    write_dicom_series(tmp_path / "sct", hu, properties, "p")
    again, _ = read_volume(tmp_path / "sct")
    np.testing.assert_array_equal(again[0].ravel(), [-1024, -1024, -1, 0, 3071, 3071])


def test_dicom_uids_and_identity_tags(tmp_path: Path) -> None:
    properties = _properties()
    study_uid, frame_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    files = write_dicom_series(
        tmp_path / "sct", _random_hu(properties), properties, "1HNC036",
        study_uid=study_uid, frame_of_reference_uid=frame_uid, patient_position="HFS",
    )
    datasets = [pydicom.dcmread(path) for path in files]
    sop_uids = [ds.SOPInstanceUID for ds in datasets]
    assert len(set(sop_uids)) == len(files)
    assert all(ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID for ds in datasets)
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert datasets[0].SeriesInstanceUID not in {study_uid, frame_uid, *sop_uids}
    first = datasets[0]
    assert first.StudyInstanceUID == study_uid and first.FrameOfReferenceUID == frame_uid
    assert first.SOPClassUID == pydicom.uid.CTImageStorage == first.file_meta.MediaStorageSOPClassUID
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.Modality == "CT" and first.PatientID == "1HNC036" and str(first.PatientName) == "1HNC036"
    assert list(first.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert first.PatientPosition == "HFS"
    assert "synthetic" in first.SeriesDescription.lower() and "synthetic" in first.DerivationDescription.lower()
    # A second series gets new study and frame of reference UIDs when none are passed.
    other = write_dicom_series(tmp_path / "other", _random_hu(properties), properties, "p")
    other_ds = pydicom.dcmread(other[0])
    assert other_ds.StudyInstanceUID != study_uid and other_ds.FrameOfReferenceUID != frame_uid


def test_dicom_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    properties = _properties()
    original = dicom_module._write_slice
    calls = []

    def failing(ds, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        original(ds, path)

    monkeypatch.setattr(dicom_module, "_write_slice", failing)
    with pytest.raises(OSError, match="disk full"):
        write_dicom_series(tmp_path / "sct", _random_hu(properties), properties, "p")
    assert list(tmp_path.iterdir()) == []  # no partial series, no temporary folder left
    assert calls[0].parent != tmp_path / "sct"  # slices went to a temporary folder

    # An existing series survives a failed rewrite untouched.
    monkeypatch.setattr(dicom_module, "_write_slice", original)
    hu = _random_hu(properties, seed=1)
    write_dicom_series(tmp_path / "sct", hu, properties, "p")
    calls.clear()
    monkeypatch.setattr(dicom_module, "_write_slice", failing)
    with pytest.raises(OSError, match="disk full"):
        write_dicom_series(tmp_path / "sct", _random_hu(properties, seed=2), properties, "p", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["sct"]
    np.testing.assert_array_equal(read_volume(tmp_path / "sct")[0], hu)


def test_dicom_refuses_to_mix_series_and_bad_input(tmp_path: Path) -> None:
    properties = _properties()
    write_dicom_series(tmp_path / "sct", _random_hu(properties), properties, "p")
    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        write_dicom_series(tmp_path / "sct", _random_hu(properties), properties, "p")
    replacement = _random_hu(properties, seed=5)
    write_dicom_series(tmp_path / "sct", replacement, properties, "p", overwrite=True)
    assert len(list((tmp_path / "sct").iterdir())) == 5
    np.testing.assert_array_equal(read_volume(tmp_path / "sct")[0], replacement)
    with pytest.raises(DicomWriteError, match=r"does not match the grid size \(z, y, x\) \(5, 6, 7\)"):
        write_dicom_series(tmp_path / "x", np.zeros((5, 7, 6)), properties, "p")
    skewed = VolumeProperties((1, 1, 1), (0, 0, 0), (1, 0.5, 0, 0, 1, 0, 0, 0, 1), (7, 6, 5))
    with pytest.raises(DicomWriteError, match="not orthonormal"):
        write_dicom_series(tmp_path / "y", np.zeros((5, 6, 7)), skewed, "p")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sct"]


# ---------------------------------------------------------------- writers


def test_write_sct_dispatches_on_suffix_and_folder(tmp_path: Path) -> None:
    properties = _properties(OBLIQUE)
    hu = _random_hu(properties).astype(np.float32) + 0.3
    for name in ("a.mha", "a.nii.gz"):
        written = write_sct(tmp_path / name, hu, properties)
        again, again_properties = read_volume(written)
        assert again.dtype == np.int16
        np.testing.assert_array_equal(again, np.rint(hu).clip(-1024, 3071))
        assert again_properties.same_grid(properties, tolerance=1e-5)
    folder = write_sct(str(tmp_path / "series") + "/", hu, properties, patient_id="1ABA005")
    assert pydicom.dcmread(folder / "CT_0001.dcm").PatientID == "1ABA005"
    np.testing.assert_array_equal(read_volume(folder)[0], np.rint(hu).clip(-1024, 3071))
    write_sct(tmp_path / "bare", hu, properties, format="dicom")
    assert pydicom.dcmread(tmp_path / "bare" / "CT_0001.dcm").PatientID == "bare"
    with pytest.raises(VolumeError, match="format='dicom'"):
        write_sct(tmp_path / "nosuffix", hu, properties)
    with pytest.raises(VolumeError, match="only apply to DICOM"):
        write_sct(tmp_path / "b.mha", hu, properties, patient_id="x")


def test_an_sct_with_nan_voxels_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    """A cast to int16 would have written NaN as 0 HU, which scores like the water baseline."""
    properties = _properties()
    hu = _random_hu(properties).astype(np.float32)
    hu[0, 0, :3] = np.nan
    for target in (tmp_path / "a.mha", str(tmp_path / "series") + "/"):
        with pytest.raises(VolumeError, match=r"a\.mha: the sCT has 3 of \d+ voxels NaN|series: the sCT has 3 of"):
            write_sct(target, hu, properties)
    assert list(tmp_path.iterdir()) == []


def test_write_prediction_follows_the_folder_convention(tmp_path: Path) -> None:
    properties = _properties()
    hu = _random_hu(properties).astype(np.float32)
    std = np.random.default_rng(3).uniform(0, 80, hu.shape).astype(np.float32)
    path = write_prediction(tmp_path / "pred", "1ABA005", hu, properties, std=std)
    assert path == tmp_path / "pred" / "1ABA005.mha"
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["1ABA005.mha", "1ABA005_std.mha"]
    np.testing.assert_array_equal(read_volume(path)[0], hu)
    std_again, _ = read_volume(tmp_path / "pred" / "1ABA005_std.mha")
    assert std_again.dtype == np.float32
    np.testing.assert_array_equal(std_again, std)
    dicom_path = write_prediction(tmp_path / "pred", "1HNA001", hu, properties, std=std, fmt="dicom")
    assert (dicom_path, tmp_path / "pred" / "1HNA001_std.mha") == prediction_paths(tmp_path / "pred", "1HNA001", "dicom")
    assert dicom_path.is_dir() and (tmp_path / "pred" / "1HNA001_std.mha").is_file()
    assert pydicom.dcmread(dicom_path / "CT_0001.dcm").PatientID == "1HNA001"
    with pytest.raises(VolumeError, match="prediction format 'png'"):
        write_prediction(tmp_path / "pred", "x", hu, properties, fmt="png")


# ---------------------------------------------------------------- model output -> HU


def test_ct_full_output_equals_full_to_ct() -> None:
    output = torch.linspace(-1.3, 1.3, 2 * 4 * 5 * 6).reshape(2, 1, 4, 5, 6)
    hu = output_to_canonical_hu(output, "ct_full")
    assert hu.shape == (2, 4, 5, 6) and hu.dtype == np.float32
    np.testing.assert_array_equal(hu, full_to_ct(output[:, 0].numpy()))
    assert hu.min() == -1024 and hu.max() == 3071
    with pytest.raises(ValueError, match="1 channel"):
        output_to_canonical_hu(torch.zeros(1, 2, 4, 4, 4), "ct_full")
    with pytest.raises(ValueError, match="output_space 'pixels'"):
        output_to_canonical_hu(output, "pixels")


def _tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        spatial_dims=3, in_channels=1, out_channels=1, channels=(4, 4, 4), latent_channels=4,
        num_res_blocks=1, norm_num_groups=4, attention_levels=(False, False, False),
        with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False,
    ).eval()


def test_ct_latent_output_is_decoded_destandardised_and_saturates_at_1000() -> None:
    vae = _tiny_vae()
    torch.manual_seed(1)
    latent = torch.randn(1, 4, 4, 4, 4)
    mean, std = torch.tensor([0.5, -1.0, 2.0, 0.0]), torch.tensor([3.0, 0.5, 1.0, 10.0])
    hu = output_to_canonical_hu(latent, "ct_latent", vae=vae, latent_mean=mean, latent_std=std)
    assert hu.shape == (1, 16, 16, 16) and hu.dtype == np.float32
    assert hu.min() >= -1000 and hu.max() <= 1000
    expected = vae_to_ct(vae_decode(vae, latent * std.reshape(1, 4, 1, 1, 1) + mean.reshape(1, 4, 1, 1, 1))[:, 0].numpy())
    np.testing.assert_allclose(hu, expected, atol=1e-3)
    unstandardised = output_to_canonical_hu(latent, "ct_latent", vae=vae)
    assert not np.allclose(unstandardised, hu)  # the statistics were applied
    with pytest.raises(ValueError, match="needs the VAE"):
        output_to_canonical_hu(latent, "ct_latent")
    with pytest.raises(ValueError, match="pass both mean and std, or neither"):
        output_to_canonical_hu(latent, "ct_latent", vae=vae, latent_mean=mean)
    with pytest.raises(ValueError, match="3 statistics for 4 latent channels"):
        output_to_canonical_hu(latent, "ct_latent", vae=vae, latent_mean=mean[:3], latent_std=std[:3])


# ---------------------------------------------------------------- canonical -> native


def test_canonical_to_native_sct_gives_the_native_grid_with_air_outside() -> None:
    properties = VolumeProperties((1.2, 1.1, 3.0), (10.0, -5.0, 3.0), OBLIQUE, (50, 44, 14), "int16")
    mask = np.zeros((14, 44, 50), np.uint8)
    mask[2:12, 10:34, 12:38] = 1
    mapping = plan_mapping(mask, properties, CanonicalGrid((1.5, 1.5, 3.0), (32, 64, 64)))
    canonical = np.full((32, 64, 64), 250.0, np.float32)
    native = canonical_to_native_sct(canonical, mapping, mask)
    assert native.shape == (14, 44, 50) and native.dtype == np.float32
    np.testing.assert_allclose(native[mask == 1], 250.0, atol=1e-3)
    assert (native[mask == 0] == -1000).all()
    # Out-of-range predictions are clipped to the SynthRAD range.
    assert canonical_to_native_sct(np.full((32, 64, 64), 5000.0, np.float32), mapping, mask).max() == 3071
    std = std_to_native(np.full((32, 64, 64), 40.0, np.float32), mapping, mask)
    assert std.shape == (14, 44, 50)
    np.testing.assert_allclose(std[mask == 1], 40.0, atol=1e-3)
    assert (std[mask == 0] == 0).all()
    with pytest.raises(ValueError, match=r"does not match the canonical grid \(z, y, x\) \(32, 64, 64\)"):
        canonical_to_native_sct(np.zeros((32, 64, 32)), mapping, mask)
    with pytest.raises(ValueError, match="native mask shape"):
        canonical_to_native_sct(canonical, mapping, mask[:-1])


# ---------------------------------------------------------------- Grand Challenge layout


def _fake_gc_input(root: Path, region: object, mri_names=("b-uuid.mha", "a-uuid.mha"), mask_names=("y.mha", "x.mha")) -> None:
    for index, (mri_name, mask_name) in enumerate(zip(mri_names, mask_names)):
        properties = VolumeProperties((1.0, 1.0, 3.0), (float(index), 0.0, 0.0), IDENTITY, (4, 4, 3), "int16")
        write_volume(root / "images" / "mri" / mri_name, np.full((3, 4, 4), 100 * (index + 1), np.int16), properties)
        write_volume(root / "images" / "body" / mask_name, np.ones((3, 4, 4), np.uint8), properties, dtype=np.uint8)
    (root / "region.json").write_text(json.dumps(region))


def test_read_gc_inputs_pairs_by_sorted_name_and_maps_region(tmp_path: Path) -> None:
    _fake_gc_input(tmp_path, "Head and Neck")
    cases = read_gc_inputs(tmp_path)
    assert [(c.mri_path.name, c.mask_path.name, c.region) for c in cases] == [
        ("a-uuid.mha", "x.mha", "HN"), ("b-uuid.mha", "y.mha", "HN"),
    ]
    from latent.core.cases import Case
    from latent.core.prepare import read_native

    with pytest.raises(Exception, match="covers every voxel"):  # read like any case: the one reader's checks
        read_native(Case(cases[0].mri_path.name, cases[0].region, "?", cases[0].mri_path, mask=cases[0].mask_path))
    assert gc_output_path(tmp_path / "out", cases[0].mri_path) == tmp_path / "out" / "images" / "synthetic-ct" / "a-uuid.mha"
    assert gc_output_path("/output", "/input/images/mri/1HNA001.nii.gz") == Path("/output/images/synthetic-ct/1HNA001.mha")


@pytest.mark.parametrize(
    ("value", "code"),
    [("Head and Neck", "HN"), ("head & neck", "HN"), ("Thorax", "TH"), ("Abdomen", "AB"), ("AB", "AB"),
     ("th", "TH"), ({"organ": "HN"}, "HN"), ({"region": "Thorax"}, "TH")],
)
def test_parse_region_accepts_names_and_codes(value, code) -> None:
    assert parse_region(value) == code


def test_gc_input_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(GCInputError, match="unknown region 'Brain'"):
        parse_region("Brain")
    with pytest.raises(GCInputError, match=r"images/mri: folder not found"):
        read_gc_inputs(tmp_path)
    _fake_gc_input(tmp_path, "Thorax", mri_names=("a.mha", "b.mha"), mask_names=("a.mha",))
    (tmp_path / "images" / "mri" / "c.mha").write_bytes((tmp_path / "images" / "mri" / "a.mha").read_bytes())
    with pytest.raises(GCInputError, match="2 MR volumes .* but 1 masks"):
        read_gc_inputs(tmp_path)
    (tmp_path / "images" / "mri" / "c.mha").unlink()
    (tmp_path / "region.json").write_text("{not json")
    with pytest.raises(GCInputError, match="region.json: not valid JSON"):
        read_gc_inputs(tmp_path)
