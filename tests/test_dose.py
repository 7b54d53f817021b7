"""`latent dose`: plans on the CT recalculated on sCTs, dose metrics, plan cache, range proxy."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from latent.evaluation.dose import (
    INSTALL_HINT, BeamTemplate, DoseExtraMissing, DoseProtocol, ProtocolError, StoppingPowerCurve, beam_direction,
    load_protocol, range_shifts, run_dose,
)
from latent.evaluation.dose.dose_metrics import conformity_index, dose_mae, dvh_parameters
from latent.evaluation.dose.plan_cache import PlanCache
from latent.evaluation.dose.structures import case_structures, generate_structures, write_structure_file
from latent.core.io import VolumeProperties, read_volume, write_volume

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
#: Small native grid (x, y, z) and spacing: a 140 x 120 x 72 mm box.
SIZE, SPACING = (70, 60, 24), (2.0, 2.0, 3.0)
#: Coarse, cheap protocol: 6 mm dose grid, 3 photon and 2 proton beams, short optimisation.
TEST_PROTOCOL = DoseProtocol(
    dose_grid_mm=6.0,
    photon=BeamTemplate(gantry_angles_deg=(0.0, 120.0, 240.0)),
    proton=BeamTemplate(gantry_angles_deg=(90.0, 270.0)),
    structures={"ptv_radius_mm": 15.0, "oar_radius_mm": 8.0, "n_oars": 2},
    optimisation={"max_iter": 40},
)


def _phantom() -> tuple[np.ndarray, np.ndarray, VolumeProperties]:
    """Elliptic water body (60 x 50 mm radii) with a fat rim, a muscle block and a bone rod."""
    properties = VolumeProperties(SPACING, (-70.0, -60.0, -36.0), IDENTITY, SIZE, "int16")
    z, y, x = np.meshgrid(*[np.arange(n) * s + o for n, s, o in zip(SIZE[::-1], SPACING[::-1], (-36.0, -60.0, -70.0))], indexing="ij")
    radius = (x / 60.0) ** 2 + (y / 50.0) ** 2
    body = radius < 1.0
    ct = np.full(body.shape, -1000, np.int16)
    ct[body] = 0
    ct[body & (radius > 0.8)] = -100
    ct[body & (np.abs(x + 30) < 10) & (np.abs(y) < 20)] = 40
    ct[(x**2 + (y - 35) ** 2) < 8.0**2] = 700
    return ct, body.astype(np.uint8), properties


def _soft_tissue_bias(ct: np.ndarray, body: np.ndarray, bias_hu: float) -> np.ndarray:
    soft = (body > 0) & (ct > -200) & (ct < 200)
    return np.where(soft, ct + bias_hu, ct).astype(np.int16)


@pytest.fixture(scope="module")
def dose_runs(tmp_path_factory):
    """Two runs sharing one plan cache: sCT == CT (plans made), then +50 HU soft tissue (cached)."""
    root = tmp_path_factory.mktemp("dose")
    ct, mask, properties = _phantom()
    case = root / "data" / "Task1" / "AB" / "1ABA001"
    write_volume(case / "ct.mha", ct, properties)
    write_volume(case / "mask.mha", mask, properties, dtype="uint8")
    write_volume(case / "mr.mha", np.zeros_like(ct), properties)
    lonely = root / "data" / "Task1" / "AB" / "1ABA002"  # has no prediction: a one-line failure
    for name in ("ct", "mask", "mr"):  # an MR of its own: two identical MRs are refused as one patient twice
        write_volume(lonely / f"{name}.mha", np.ones_like(ct) if name == "mr" else np.zeros_like(ct), properties)
    write_volume(root / "identical" / "1ABA001.mha", ct, properties)
    write_volume(root / "biased" / "1ABA001.mha", _soft_tissue_bias(ct, mask, 50.0), properties)
    cache = root / "plans"
    first = run_dose(root / "identical", root / "data", root / "out_identical", protocol=TEST_PROTOCOL, plan_cache=cache, quiet=True)
    second = run_dose(root / "biased", root / "data", root / "out_biased", protocol=TEST_PROTOCOL, plan_cache=cache,
                      pids=["1ABA001"], quiet=True, workers=1)  # the first run used 2 worker processes
    return {"root": root, "first": first, "second": second, "cache": cache}


def test_identical_sct_gives_zero_dose_error(dose_runs) -> None:
    run = dose_runs["first"]
    row = run.rows[0]
    assert row["pid"] == "1ABA001" and row["structures"] == "generated"
    for mode in ("photon", "proton"):
        assert row[f"{mode}_mae"] == 0.0
        assert row[f"{mode}_dvh"] == pytest.approx(0.0, abs=1e-9)  # the challenge's epsilon terms
        assert row[f"{mode}_gamma"] == 100.0
        detail = run.details["1ABA001"][mode]
        assert detail["dvh_terms"]["n_oars"] == 2
        reference = detail["dvh_ct"]["PTV"]
        assert reference["d95"] == pytest.approx(TEST_PROTOCOL.prescription_gy, rel=1e-3)  # D95 normalisation
        assert reference["d2"] < 1.15 * TEST_PROTOCOL.prescription_gy  # and is homogeneous
        assert 0.3 < reference["ci"] <= 1.0
    assert row["range_shift_mm"] == 0.0


def test_run_writes_records_tables_and_figures(dose_runs) -> None:
    run, out = dose_runs["first"], dose_runs["root"] / "out_identical"
    assert run.failures == {"1ABA002": "1ABA002: no prediction " + str(dose_runs["root"] / "identical" / "1ABA002.mha") + " (or .nii.gz)"}
    assert run.exit_code == 1
    assert json.loads((out / "protocol.json").read_text())["dose_grid_mm"] == 6.0
    detail = json.loads((out / "1ABA001" / "dose.json").read_text())
    assert set(detail["timings"]) >= {"plans_s", "dose_calculations_s", "range_s", "photon_metrics_s"}
    assert detail["workers"] == 2
    assert [beam["gantry_deg"] for beam in detail["range"]] == [90.0, 270.0]
    for name in ("dvh.png", "dose_difference.png"):
        assert (out / "1ABA001" / name).read_bytes()[:4] == b"\x89PNG"
    dose, dose_grid = read_volume(out / "1ABA001" / "dose_proton_ct.mha")
    assert dose_grid.spacing == (6.0, 6.0, 6.0) and dose.max() > TEST_PROTOCOL.prescription_gy
    labels, label_grid = read_volume(out / "1ABA001" / "structures.mha")
    assert label_grid.size == SIZE and set(np.unique(labels)) == {0, 1, 2, 3}
    table = (out / "dose_summary.md").read_text()
    assert "| region | n | photon_mae | photon_dvh | photon_gamma | proton_mae |" in table
    assert "| AB | 1 | 0.0000 |" in table
    header = (out / "dose_metrics.csv").read_text().splitlines()[0]
    assert header.startswith("pid,region,centre,structures,range_shift_mm")


def test_soft_tissue_bias_hurts_protons_more_than_photons(dose_runs) -> None:
    row = dose_runs["second"].rows[0]
    assert row["photon_mae"] > 0.0 and row["proton_mae"] > 2 * row["photon_mae"]
    assert row["proton_gamma"] < row["photon_gamma"] <= 100.0
    assert row["proton_dvh"] > 0.0
    beams = dose_runs["second"].details["1ABA001"]["range"]
    # +50 HU in soft tissue is +4.75 % RSP: the sCT adds water-equivalent path on every beam.
    assert all(beam["shift_mean_mm"] > 0.5 for beam in beams)
    assert dose_runs["second"].exit_code == 0


def test_second_run_reuses_the_cached_plan(dose_runs) -> None:
    first, second = dose_runs["first"].rows[0], dose_runs["second"].rows[0]
    assert not first["photon_plan_cached"] and not first["proton_plan_cached"]
    assert second["photon_plan_cached"] and second["proton_plan_cached"]
    # The reuse is shown by the flags and the keys, not by timings (speed: benchmarks/bench_dose.py).
    first_details, second_details = dose_runs["first"].details["1ABA001"], dose_runs["second"].details["1ABA001"]
    for mode in ("photon", "proton"):
        assert second_details[mode]["plan_key"] == first_details[mode]["plan_key"]
    entries = sorted(p.name.split("-")[0] for p in (dose_runs["cache"] / "1ABA001").iterdir())
    assert entries == ["photon", "proton"]


def test_range_proxy_beams_match_the_plan_geometry(dose_runs) -> None:
    """The range proxy's beam directions are the directions pyRadPlan's plans use."""
    cache = PlanCache(dose_runs["cache"])
    detail = dose_runs["first"].details["1ABA001"]["proton"]
    plan = cache.load("1ABA001", "proton", detail["plan_key"])
    assert plan is not None
    for beam, gantry in zip(plan.stf.beams, TEST_PROTOCOL.proton.gantry_angles_deg):
        towards_target = -np.asarray(beam.source_point)  # the source point is relative to the isocentre
        np.testing.assert_allclose(towards_target / np.linalg.norm(towards_target), beam_direction(gantry), atol=1e-6)


def test_range_proxy_matches_analytic_slab_shift() -> None:
    """A 30 mm slab of RSP 1.199 in front of the target in the sCT shifts the range by 30 * 0.199 mm."""
    spacing = (2.0, 2.0, 2.0)
    size = (60, 40, 20)  # x, y, z
    properties = VolumeProperties(spacing, (0.0, 0.0, 0.0), IDENTITY, size, "int16")
    body = np.ones(size[::-1], dtype=bool)
    ct = np.zeros(size[::-1], dtype=np.float32)
    target = np.zeros_like(body)
    target[8:12, 16:24, 40:50] = True  # x from 80 to 100 mm
    sct = ct.copy()
    sct[:, :, 10:25] = 350.0  # x from 20 to 50 mm: 30 mm of RSP 1.199 (default table)
    curve = StoppingPowerCurve()
    beams = range_shifts(ct, sct, body, target, properties, (270.0,), curve)  # 270 deg travels towards +x
    expected = 30.0 * (float(curve(np.array([350.0]))[0]) - 1.0)
    assert beams[0].n_rays > 0
    assert beams[0].shift_mean_mm == pytest.approx(expected, abs=spacing[0])
    assert beams[0].shift_abs_max_mm == pytest.approx(expected, abs=spacing[0])
    # The water-equivalent depth of the distal edge (x = 99 mm, entered at x = -1 mm) is 100 mm.
    assert beams[0].wepl_ct_mm == pytest.approx(100.0, abs=spacing[0])
    # From the other side the slab lies behind the target: no shift.
    assert range_shifts(ct, sct, body, target, properties, (90.0,), curve)[0].shift_abs_max_mm == pytest.approx(0.0, abs=1e-6)


def test_missing_extra_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pyRadPlan", None)  # import pyRadPlan now raises ImportError
    with pytest.raises(DoseExtraMissing) as error:
        run_dose(tmp_path, tmp_path, tmp_path / "out", modes="photon,proton")
    message = str(error.value)
    assert "missing: pyRadPlan" in message and INSTALL_HINT in message and "\n" not in message
    assert INSTALL_HINT == "pip install 'latent-sct[dose]' && pip install --no-deps pyRadPlan==0.5.0"
    # The range proxy needs no plan and works without the extra.
    ct, mask, properties = _phantom()
    case = tmp_path / "data" / "Task1" / "HN" / "1HNA001"
    for name, array in (("ct", ct), ("mask", mask), ("mr", np.zeros_like(ct))):
        write_volume(case / f"{name}.mha", array, properties)
    write_volume(tmp_path / "pred" / "1HNA001.mha", ct + 20, properties)
    run = run_dose(tmp_path / "pred", tmp_path / "data", tmp_path / "out", modes="range", protocol=TEST_PROTOCOL, quiet=True)
    assert run.exit_code == 0 and run.rows[0]["range_shift_mm"] > 0
    assert "pyRadPlan" not in {k for k, v in sys.modules.items() if v is not None}


def test_generated_structures_are_reproducible_and_written(tmp_path: Path) -> None:
    _, mask, properties = _phantom()
    body = mask > 0
    settings = TEST_PROTOCOL.structures
    first = generate_structures(body, properties, settings)
    second = generate_structures(body.copy(), properties, settings)
    assert [(s.name, s.kind) for s in first] == [("PTV", "target"), ("OAR_left", "oar"), ("OAR_right", "oar")]
    # The body is a 72 mm long elliptic cylinder centred on the origin: so is the PTV.
    centre = np.argwhere(first[0].mask).mean(axis=0) * np.asarray(SPACING[::-1]) + np.array([-36.0, -60.0, -70.0])
    np.testing.assert_allclose(centre, 0.0, atol=3.0)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.mask, b.mask)
    ptv_volume_mm3 = first[0].mask.sum() * np.prod(SPACING)
    assert ptv_volume_mm3 == pytest.approx(4 / 3 * np.pi * 15.0**3, rel=0.15)
    assert not (first[0].mask & first[1].mask).any() and (first[0].mask <= body).all()
    # Written out and fed back as a structure file, the same structures come back.
    folder = tmp_path / "case"
    write_structure_file(folder, first, properties, {"source": "generated"})
    from_file, source = case_structures(folder, body, properties, settings)
    assert source == "file"
    for a, b in zip(first, from_file):
        assert (a.name, a.kind) == (b.name, b.kind)
        np.testing.assert_array_equal(a.mask, b.mask)
    # A given centre too close to the skin is refused with the field's name.
    with pytest.raises(ValueError, match="ptv_center_mm"):
        generate_structures(body, properties, settings.model_copy(update={"ptv_center_mm": (55.0, 0.0, 0.0)}))


def test_dose_metric_definitions() -> None:
    dose = np.zeros((10, 10, 10), np.float32)
    dose[2:8, 2:8, 2:8] = 2.0
    target = np.zeros(dose.shape, bool)
    target[3:7, 3:7, 3:7] = True
    body = np.ones(dose.shape, bool)
    # Isodose volume 216 voxels, target 64 inside it: van't Riet 64^2 / (64 * 216).
    assert conformity_index(dose, target, body, 2.0) == pytest.approx(64 / 216)
    shifted = dose * 1.1
    assert dose_mae(dose, shifted, 2.0) == pytest.approx(0.1)  # over the 216 voxels >= 1.8 Gy
    parameters = dvh_parameters(dose, target, body, 2.0)
    assert parameters.d98 == parameters.d2 == parameters.dmean == 2.0


def test_protocol_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ProtocolError, match="dose_grid_mm"):
        load_protocol(None, dose_grid_mm=0.2)
    path = tmp_path / "protocol.yaml"
    path.write_text("proton:\n  gantry_angles_deg: [90, 90]\n")
    with pytest.raises(ProtocolError, match="proton.gantry_angles_deg.*distinct"):
        load_protocol(path)
    assert DoseProtocol().plan_fingerprint("proton") != DoseProtocol(dose_grid_mm=5.0).plan_fingerprint("proton")
    with pytest.raises(ProtocolError, match="unknown dose mode"):
        run_dose(tmp_path, tmp_path, tmp_path / "out", modes="photon,electron")


def test_range_proxy_on_phantom_anatomy(phantom_root: Path, tmp_path: Path) -> None:
    """Water baseline on phantom anatomy: structures fit every region; lungs read as water add most path."""
    from latent.core.baselines import water_sct
    from latent.core.cases import discover_cases

    cases = {case.region: case for case in discover_cases(phantom_root)}
    for case in cases.values():
        mask, grid = read_volume(case.mask)
        write_volume(tmp_path / "water" / f"{case.pid}.mha", water_sct(mask), grid, dtype="int16")
    run = run_dose(tmp_path / "water", phantom_root, tmp_path / "out", modes="range", quiet=True,
                   pids=[case.pid for case in cases.values()])
    assert run.exit_code == 0 and len(run.rows) == 3
    shift = {row["region"]: row["range_shift_mm"] for row in run.rows}
    assert all(value > 1.0 for value in shift.values())
    assert shift["TH"] > shift["AB"] and shift["TH"] > shift["HN"]
    for case in cases.values():
        labels, _ = read_volume(tmp_path / "out" / case.pid / "structures.mha")
        mask, _ = read_volume(case.mask)
        assert (labels == 1).sum() > 0 and not np.any((labels > 0) & (mask == 0))
