"""The GPU check's driver (no GPU needed): a row past its limit is killed and recorded, the rows
before and after it are kept, and the JSON is complete after every row."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_row_past_its_limit_is_killed_and_the_others_are_kept(tmp_path: Path) -> None:
    gpu_check = _gpu_check()
    out = tmp_path / "gpu.json"
    report = gpu_check.drive(["sleep 0.1", "sleep 60", "sleep 0.2"], out, row_limit=3.0, report={"device": "test"})
    rows = {row["row"]: row for row in report["rows"]}
    assert rows["sleep 0.1"]["seconds"] == 0.1 and rows["sleep 0.2"]["seconds"] == 0.2
    assert rows["sleep 60"]["error"].startswith("timed out after 3 s")
    written = json.loads(out.read_text())
    assert written["rows"] == report["rows"] and written["device"] == "test" and written["row_limit_s"] == 3.0


def test_every_row_is_listed_in_run_order() -> None:
    rows = _gpu_check().all_rows()
    assert rows[0] == "vae encode 96x320x320 fp32"
    assert {"vae encode 128x512x512 bf16", "vae decode 128x512x512 fp32", "e2e l2sct", "e2e l2l_ddim",
            "train l2sct_full.yaml", "train l2l_controlnet_full.yaml"} <= set(rows)
    assert len(rows) == len(set(rows))


def test_l2sct_full_builds_on_the_exact_maisi_decode_path(tmp_path: Path) -> None:
    """What the e2e and train rows build for l2sct_full: the MAISI decode path (random weights)."""
    from latent.translate.models.base import build_model

    config = _gpu_check().recipe_model_config("l2sct_full.yaml", tmp_path)
    model = build_model(config)
    record = model.config.vae_decoder
    assert (record.class_name, record.layout, model.config.trunk) == ("AutoencoderKlMaisi", "xyz_ras", "unet")
    assert model.config.window == (16, 40, 40) and model.config.init_trunk_from is None
