"""Environment failures are input errors (issue 32, items 5 and 7): a full disk, a read-only target,
a name too long, Ctrl-C, leftovers of killed runs and the umask of written outputs.

Each failure ends with one line naming the path, the summary and manifest of the cases done, and
nothing written before changed. A full disk and a read-only file system are injected at the write
(``OSError`` with ENOSPC / EROFS), since no tmpfs can be mounted here.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import latent.core.io
from latent.app.cli import app
from latent.core.atomic import TEMPORARY_PREFIX, remove_stale_temporaries, write_text_atomic
from latent.core.cases import discover_cases

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _predict(data: Path, out: Path) -> list[str]:
    return ["predict", "--method", "water", "--data", str(data), "--out", str(out), "-q"]


def _refuse_writes_after(monkeypatch, allowed: int, code: int) -> None:
    """Let ``allowed`` volume writes through, then fail each with ``OSError(code)`` naming the target."""
    real = latent.core.io.write_atomic
    calls = {"n": 0}

    def write(target, write_file, suffix=""):
        calls["n"] += 1
        if calls["n"] > allowed:
            raise OSError(code, os.strerror(code), str(target))
        return real(target, write_file, suffix)

    monkeypatch.setattr(latent.core.io, "write_atomic", write)


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "no space left on the device"),
                                          (errno.EROFS, "read-only file system")])
def test_a_full_or_read_only_disk_fails_the_cases_and_keeps_the_summary(phantom_root: Path, tmp_path: Path,
                                                                        monkeypatch, code: int, reason: str) -> None:
    out = tmp_path / "pred"
    assert runner.invoke(app, _predict(phantom_root, out)).exit_code == 0
    (out / "predict_manifest.json").unlink()
    before = _hashes(out)
    _refuse_writes_after(monkeypatch, 2, code)
    result = runner.invoke(app, _predict(phantom_root, out))
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    pids = sorted(case.pid for case in discover_cases(phantom_root))
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(pids) - 2
    assert all(line.endswith(f".mha: {reason}" + ("; free some space and rerun" if code == errno.ENOSPC
                                                  else "; choose a writable place")) for line in errors), errors
    assert f"{len(pids)} case(s): 2 processed, 0 skipped, {len(pids) - 2} failed" in result.output
    manifest = json.loads((out / "predict_manifest.json").read_text())
    assert manifest["processed"] == pids[:2] and sorted(manifest["failures"]) == pids[2:]
    after = _hashes(out)
    assert {name: after.get(name) for name in before} == before  # the earlier predictions are intact
    assert not list(out.glob(f"{TEMPORARY_PREFIX}*"))


def test_out_of_memory_in_a_case_is_a_case_failure(phantom_root: Path, tmp_path: Path, monkeypatch) -> None:
    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(latent.core.io, "write_atomic", no_memory)
    result = runner.invoke(app, _predict(phantom_root, tmp_path / "pred"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "out of memory; free memory or use a smaller grid or tile" in result.output
    assert (tmp_path / "pred" / "predict_manifest.json").exists()


def test_a_240_character_case_folder_is_predicted(phantom_root: Path, tmp_path: Path) -> None:
    case = next(iter(discover_cases(phantom_root)))
    name = case.pid + "x" * (240 - len(case.pid))
    data = tmp_path / "data"
    (data / "Task1" / case.region).mkdir(parents=True)
    os.symlink(case.folder, data / "Task1" / case.region / name)
    result = runner.invoke(app, _predict(data, tmp_path / "pred"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "pred" / f"{name}.mha").exists()
    assert not list((tmp_path / "pred").glob(f"{TEMPORARY_PREFIX}*"))


def test_a_name_the_file_system_cannot_hold_is_one_line(phantom_root: Path, tmp_path: Path) -> None:
    case = next(iter(discover_cases(phantom_root)))
    name = case.pid + "x" * (253 - len(case.pid))  # <name>.mha has 257 characters
    data = tmp_path / "data"
    (data / "Task1" / case.region).mkdir(parents=True)
    os.symlink(case.folder, data / "Task1" / case.region / name)
    result = runner.invoke(app, _predict(data, tmp_path / "pred"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert re_line(result.output, rf"^error: .*{name}\.mha: file name too long for the file system \(a name of 257 characters\)$")
    assert (tmp_path / "pred" / "predict_manifest.json").exists()


def re_line(output: str, pattern: str) -> bool:
    import re

    return any(re.search(pattern, line) for line in output.splitlines())


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftovers_of_killed_runs_are_removed_on_the_next_run(phantom_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    out.mkdir()
    stale = out / f"{TEMPORARY_PREFIX}{_dead_pid()}-0a1b2c3d.mha"
    stale.write_bytes(b"half a volume")
    live = out / f"{TEMPORARY_PREFIX}{os.getppid()}-0a1b2c3d.mha"  # a live process: another writer
    live.write_bytes(b"being written")
    other = out / ".notes.tmp"  # not ours: never touched
    other.write_text("x")
    assert runner.invoke(app, _predict(phantom_root, out)).exit_code == 0
    assert not stale.exists() and live.exists() and other.exists()
    assert remove_stale_temporaries(tmp_path / "absent") == []


def test_outputs_get_the_process_umask(phantom_root: Path, tmp_path: Path) -> None:
    from latent.core.model_folder import write_model_folder

    previous = os.umask(0o022)
    try:
        assert runner.invoke(app, _predict(phantom_root, tmp_path / "pred")).exit_code == 0
        write_model_folder(tmp_path / "model", {"class_name": "X"}, {})
        write_model_folder(tmp_path / "model", {"class_name": "Y"}, {})  # the replace path too
        written = write_text_atomic(tmp_path / "note.json", "{}")
        os.umask(0o002)
        shared = write_text_atomic(tmp_path / "shared.json", "{}")
    finally:
        os.umask(previous)
    files = [*(tmp_path / "pred").iterdir(), *(tmp_path / "model").iterdir(), written]
    assert files and {oct(path.stat().st_mode & 0o777) for path in files} == {"0o644"}
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755
    assert shared.stat().st_mode & 0o777 == 0o664


def test_out_naming_a_file_is_refused_before_anything_runs(phantom_root: Path, tmp_path: Path) -> None:
    target = tmp_path / "pred"
    target.write_text("not a folder")
    result = runner.invoke(app, _predict(phantom_root, target))
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == f"error: --out {target}: exists and is a file, not a folder"
    assert target.read_text() == "not a folder"


# --------------------------------------------------------------------------- Ctrl-C


#: Runs the real CLI in a child process, each case starting 1.5 s late, so that SIGINT lands
#: between one case done and the next.
SLOW_CLI = """
import sys, time
import {module} as target
real = target.{name}
def slow(*args, **kwargs):
    time.sleep(1.5)
    return real(*args, **kwargs)
target.{name} = slow
from latent.app.cli import main
sys.argv = ["latent", *sys.argv[1:]]
main()
"""


def _interrupt(arguments: list[str], module: str, name: str, done: Path, pattern: str,
               tmp_path: Path) -> subprocess.CompletedProcess:
    """Start the CLI, wait until one case is written (``done.glob(pattern)``), send SIGINT."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = SLOW_CLI.format(module=module, name=name)
    child = subprocess.Popen([sys.executable, "-c", script, *arguments], env=env, cwd=tmp_path, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not list(done.glob(pattern)) and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.1)
    assert child.poll() is None, child.communicate()
    child.send_signal(signal.SIGINT)
    stdout, stderr = child.communicate(timeout=300)
    return subprocess.CompletedProcess(arguments, child.returncode, stdout, stderr)


@pytest.mark.slow
def test_ctrl_c_during_predict_writes_the_summary_and_exits_130(phantom_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    result = _interrupt(_predict(phantom_root, out), "latent.core.io", "write_volume", out, "1*.mha", tmp_path)
    assert result.returncode == 130, result
    assert "Traceback" not in result.stderr
    planned = len(discover_cases(phantom_root))
    last = result.stderr.strip().splitlines()[-1]
    assert re_line(last, rf"^interrupted: [1-9] of {planned} case\(s\) done; summary in {out}/predict_manifest\.json; "
                         r"rerun to continue$"), result.stderr
    manifest = json.loads((out / "predict_manifest.json").read_text())
    assert manifest["interrupted"]["planned"] == planned and manifest["processed"]
    assert all((out / f"{pid}.mha").exists() for pid in manifest["processed"])
    assert not list(out.glob(f"{TEMPORARY_PREFIX}*"))


@pytest.mark.slow
def test_ctrl_c_during_encode_leaves_a_valid_cache_that_a_rerun_completes(phantom_root: Path, tmp_path: Path) -> None:
    import torch
    from monai.networks.nets import AutoencoderKL

    from latent.core.vae.loading import save_vae_dir
    from tests.test_bad_inputs import GRID, TINY_VAE

    torch.manual_seed(0)
    save_vae_dir(AutoencoderKL(**TINY_VAE), {"class_name": "AutoencoderKL", "kwargs": TINY_VAE}, tmp_path / "vae")
    cache = tmp_path / "cache.zarr"
    arguments = ["encode", "--data", str(phantom_root), "--cache", str(cache), "--vae", str(tmp_path / "vae"),
                 "--grid", GRID, "-q"]
    result = _interrupt(arguments, "latent.app.encode_run", "_encode_case", cache, "producers/*/cases/*/zarr.json",
                        tmp_path)
    assert result.returncode == 130, result
    assert "Traceback" not in result.stderr
    planned = len(discover_cases(phantom_root))
    assert re_line(result.stderr.strip().splitlines()[-1],
                   rf"^interrupted: [1-9] of {planned} case\(s\) done; summary in .*encode_.*\.json; rerun to continue$"), \
        result.stderr
    verify = runner.invoke(app, ["cache", "verify", str(cache)])
    assert verify.exit_code == 0, verify.output
    rerun = runner.invoke(app, arguments)
    assert rerun.exit_code == 0, rerun.output
    assert "already cached" in rerun.output and runner.invoke(app, ["cache", "verify", str(cache)]).exit_code == 0


def test_ctrl_c_outside_a_loop_over_cases_is_one_line_and_130(monkeypatch, capsys, tmp_path: Path) -> None:
    """Ctrl-C while a command loads (here: `latent cache info`) ends with exit 130 and one line."""
    import latent.app.cli_stages as stages
    from latent.app.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "open_cache", interrupted, raising=False)
    monkeypatch.setattr(sys, "argv", ["latent", "cache", "info", str(tmp_path / "x.zarr")])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 130
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["interrupted (Ctrl-C): what was already written is kept whole (cache entries, checkpoints and "
                     "predictions are written completely or not at all)"], lines


def test_a_240_character_case_folder_is_encoded(phantom_root: Path, tmp_path: Path) -> None:
    """The cache's staging names carry a digest of the pid, not the pid: a long case name encodes."""
    import torch
    from monai.networks.nets import AutoencoderKL

    from latent.core.vae.loading import save_vae_dir
    from tests.test_bad_inputs import GRID, TINY_VAE

    case = next(c for c in discover_cases(phantom_root) if c.region == "AB")
    name = case.pid + "x" * (240 - len(case.pid))
    data = tmp_path / "data"
    (data / "Task1" / case.region).mkdir(parents=True)
    os.symlink(case.folder, data / "Task1" / case.region / name)
    torch.manual_seed(0)
    save_vae_dir(AutoencoderKL(**TINY_VAE), {"class_name": "AutoencoderKL", "kwargs": TINY_VAE}, tmp_path / "vae")
    result = runner.invoke(app, ["encode", "--data", str(data), "--cache", str(tmp_path / "cache.zarr"), "--vae",
                                 str(tmp_path / "vae"), "--grid", GRID, "-q"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["cache", "verify", str(tmp_path / "cache.zarr")]).exit_code == 0
