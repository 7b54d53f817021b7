"""`latent vae adapt`: the VAE's decode path fine-tuned to full-range CT on a real (tiny) cache.
It resumes exactly, only reads the VAE and the cache, and latent routes, `vae check` and l2sct
can decode through it; a decoder adapted on another producer is refused."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from latent.app.cli import app
from latent.core.errors import BadConfigError
from latent.core.io import read_volume
from latent.translate.models.base import build_model, load_pretrained

from test_predict_run import runs  # noqa: F401 - the module fixture: phantom copy, tiny VAE, encoded cache

cli = CliRunner()
STEPS = ["train.mixed_precision=no", "train.tensorboard=false", "train.checkpoint_every=2", "train.val_every=2",
         "train.log_every=1", "data.crop=[4,4,4]", "data.val_limit=1", "train.warmup_steps=0", "model.lr=1e-2"]


def file_hashes(*folders: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folders``."""
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest()
            for folder in folders for path in sorted(folder.rglob("*")) if path.is_file()}


def adapt(runs, out: Path, steps: int, *extra: str) -> object:
    return cli.invoke(app, ["vae", "adapt", "--cache", str(runs.cache), "--split-file", str(runs.split_file),
                            "--out", str(out), "-q", f"train.max_steps={steps}", *STEPS, *extra])


@pytest.fixture(scope="module")
def adapted(runs, tmp_path_factory) -> Path:  # noqa: F811 - pytest fixture injection
    before = file_hashes(runs.cache, runs.vae_dir)
    out = tmp_path_factory.mktemp("adapt") / "decoder"
    result = adapt(runs, out, 4)
    assert result.exit_code == 0, result.output
    assert file_hashes(runs.cache, runs.vae_dir) == before  # the VAE's and the cache's files are only read
    return out


def test_adapted_decoder_records_its_producer_and_learns(runs, adapted):  # noqa: F811
    producer = json.loads((adapted / "producer.json").read_text())
    model = load_pretrained(adapted / "final")
    assert producer["producer_key"] == producer["record"]["producer_key"]
    assert model.config.vae_decoder.weights_sha256 == producer["record"]["vae_weights_sha256"]
    assert model.config.ct_latent_std == tuple(producer["latent_stats"]["ct_mu"]["std"])
    frozen = build_model({"family": "decoder_adapt", "vae": str(runs.vae_dir)})
    assert any(not torch.equal(v, frozen.state_dict()[k]) for k, v in model.state_dict().items())
    assert [json.loads(line)["step"] for line in (adapted / "metrics.jsonl").read_text().splitlines()
            if "val/mae" in line] == [2, 4]


def test_adapt_resumes_exactly(runs, adapted, tmp_path):  # noqa: F811
    cut = tmp_path / "cut"
    assert adapt(runs, cut, 2).exit_code == 0
    assert adapt(runs, cut, 4, "--resume").exit_code == 0
    full, resumed = load_pretrained(adapted / "final").state_dict(), load_pretrained(cut / "final").state_dict()
    for key, value in full.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6)
    again = adapt(runs, cut, 4)  # a fresh run over the checkpoints of a finished one is refused
    assert again.exit_code == 2 and again.output.startswith("error: ")


def test_latent_route_vae_check_and_l2sct_decode_through_it(runs, adapted, tmp_path):  # noqa: F811
    regress = runs.run("l2l_regress")
    test = runs.splits["test"]
    paths = {}
    for name, extra in (("vae", []), ("adapted", ["--decoder", str(adapted)])):
        result = cli.invoke(app, ["predict", "--model", str(regress), "--vae", str(runs.vae_dir), "--data", str(runs.data),
                                  "--split-file", str(runs.split_file), "--out", str(tmp_path / name), "-q", *extra])
        assert result.exit_code == 0, result.output
        paths[name] = read_volume(tmp_path / name / f"{test[0]}.mha", dtype=np.float32)[0]
    assert paths["vae"].shape == paths["adapted"].shape and not np.allclose(paths["vae"], paths["adapted"])
    check = cli.invoke(app, ["vae", "check", "--cache", str(runs.cache), "--vae", str(runs.vae_dir), "--data",
                             str(runs.data), "--out", str(tmp_path / "floor"), "--split-file", str(runs.split_file),
                             "--decoder", str(adapted), "-q"])
    assert check.exit_code == 0, check.output
    assert (tmp_path / "floor" / "scores.csv").is_file()
    l2sct = build_model({"family": "l2sct", "channels": [8, 8], "norm_num_groups": 4, "vae": str(runs.vae_dir),
                         "init_decoder_from": str(adapted)})
    expected = load_pretrained(adapted / "best").vae_decode.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in l2sct.vae_decode.state_dict().items())
    with pytest.raises(BadConfigError, match=r"^model\.init_decoder_from: .* adapts the VAE"):
        build_model({"family": "l2sct", "channels": [8, 8], "norm_num_groups": 4, "vae": str(runs.other_vae_dir),
                     "init_decoder_from": str(adapted)})


def test_a_decoder_of_another_producer_or_the_wrong_role_is_refused_in_one_line(runs, adapted, tmp_path):  # noqa: F811
    other = tmp_path / "other"
    shutil.copytree(adapted, other)
    producer = json.loads((other / "producer.json").read_text())
    (other / "producer.json").write_text(json.dumps({**producer, "producer_key": "another-cache-producer"}))
    base = ["predict", "--data", str(runs.data), "--split-file", str(runs.split_file), "--vae", str(runs.vae_dir), "-q"]
    cases = {
        "another producer": (["--model", str(runs.run("l2l_regress")), "--decoder", str(other)],
                             "was adapted on the cache producer another-cache-producer"),
        "a pixel-output run": (["--model", str(runs.run("l2sct")), "--decoder", str(adapted)],
                               "predicts ct_full, not a CT latent"),
        "a decoder as --model": (["--model", str(adapted)], "maps ct_mu, not the MR"),
    }
    for name, (extra, message) in cases.items():
        out = tmp_path / name.replace(" ", "_")
        result = cli.invoke(app, [*base, *extra, "--out", str(out)])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], (name, result.output)
        assert not any(out.glob("*.mha")), name
