"""The one checkpoint format of every model: a folder with ``config.json`` + ``model.safetensors``.

Translation models (``best/``, ``final/`` of a run) and VAEs (``latent vae fit``) are written and
read here. A folder (or a whole training run) can be pushed to the Hugging Face hub and used
from there as ``hf://owner/name[@revision]`` wherever a local folder is accepted; downloads go
through the hub's local cache first and honour ``HF_HUB_OFFLINE`` (docs/architecture.md).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from latent.core.atomic import publish, remove_stale_temporaries, temporary_path, write_atomic
from latent.core.errors import BadConfigError, BadFileError, WeightsError, one_line

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
HUB_PREFIX = "hf://"
#: Files of a run folder that make it usable for prediction from the hub.
RUN_FILES = ("producer.json", "config.json", "config.yaml")


def write_model_folder(directory: str | os.PathLike, config: Mapping[str, Any],
                       state: Mapping[str, torch.Tensor]) -> Path:
    """Write ``config.json`` + ``model.safetensors`` so that no reader ever sees half a model.

    A new folder appears complete (written under a temporary name, then renamed). In an existing
    folder (which may hold other files, e.g. a VAE's ``fit_config.json``) each file is replaced
    atomically, weights first, config last.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    text = json.dumps(dict(config), indent=2, sort_keys=True) + "\n"
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    writers: Sequence[tuple[str, Callable[[Path], Any]]] = (
        (WEIGHTS_NAME, lambda path: save_file(tensors, str(path))),
        (CONFIG_NAME, lambda path: path.write_text(text)),
    )
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(directory.parent)
    if not directory.exists():
        staging = temporary_path(directory)
        staging.mkdir()
        try:
            for name, write in writers:
                write(staging / name)
            publish(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return directory
    remove_stale_temporaries(directory)
    for name, write in writers:
        write_atomic(directory / name, write)
    return directory


def read_model_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a model folder.

    Raises:
        BadFileError: the folder lacks one of the two files.
        WeightsError: ``config.json`` is not valid JSON.
    """
    directory = Path(directory)
    for path in (directory / CONFIG_NAME, directory / WEIGHTS_NAME):
        if not path.is_file():
            raise BadFileError(f"{path}: missing (a model folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    path = directory / CONFIG_NAME
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise WeightsError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None


def read_model_weights(directory: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a model folder's ``model.safetensors``.

    Raises:
        WeightsError: the file is truncated or not safetensors.
    """
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_NAME
    try:
        return load_file(str(path), device=str(device))
    except Exception as error:  # safetensors raises its own error types for truncated or foreign files
        raise WeightsError(f"{path}: cannot be read as safetensors ({one_line(error)})") from None


def check_state_fits(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse weights whose names or shapes differ from the model's, naming the first of each kind
    after ``where`` (e.g. ``"<weights>: does not fit the model of <config>"``)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{name} {tuple(state[name].shape)} (model: {tuple(expected[name].shape)})"
             for name in expected if name in state and state[name].shape != expected[name].shape]
    if missing or unexpected or wrong:
        problems = ([f"{len(wrong)} tensor(s) of another shape, e.g. {wrong[0]}"] if wrong else []) + \
                   ([f"{len(missing)} missing, e.g. {missing[0]}"] if missing else []) + \
                   ([f"{len(unexpected)} unexpected, e.g. {unexpected[0]}"] if unexpected else [])
        raise WeightsError(f"{where}: {'; '.join(problems)}")


def trained_weights_folder(source: str | os.PathLike, field: str) -> Path:
    """The model folder another run starts from: a training run's ``best/`` (lowest validation
    error), else its ``final/``, or ``source`` itself when it is a model folder.

    Raises:
        BadConfigError: naming ``field`` (e.g. ``init_from``) and the folder, when it is neither.
    """
    folder = resolve_folder(source)
    for which in ("best", "final"):
        if (folder / which / CONFIG_NAME).is_file():
            return folder / which
    if (folder / CONFIG_NAME).is_file():
        return folder
    raise BadConfigError(f"{field}: {folder} is neither a training run (best/ or final/) nor a model folder")


def is_hub_spec(spec: str | os.PathLike) -> bool:
    """True for ``hf://owner/name[@revision]`` (also after ``Path()`` folded it to ``hf:/owner/name``,
    or an empty ``hf://`` to ``hf:``)."""
    return str(spec) == "hf:" or str(spec).startswith("hf:/")


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """``hf://owner/name[@revision]`` -> (repo id, revision or None).

    Raises:
        BadFileError: not of that form.
    """
    repo_id, _, revision = str(spec).removeprefix("hf:").lstrip("/").partition("@")
    if not repo_id:
        raise BadFileError(f"{HUB_PREFIX}{str(spec).removeprefix('hf:').lstrip('/')}: empty hub name; expected "
                           f"{HUB_PREFIX}owner/name[@revision]")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise BadFileError(f"{HUB_PREFIX}{str(spec).removeprefix('hf:').lstrip('/')}: expected "
                           f"{HUB_PREFIX}owner/name[@revision]")
    return repo_id, revision or None


def resolve_folder(spec: str | os.PathLike, cache_dir: str | None = None) -> Path:
    """A local folder for ``spec``: the path itself, or the hub snapshot of ``hf://owner/name[@rev]``
    (taken from the local hub cache when there, downloaded otherwise unless ``HF_HUB_OFFLINE``).

    Raises:
        BadFileError: a hub spec that is neither cached nor downloadable (the reason in one line).
    """
    if not is_hub_spec(spec):
        return Path(spec)
    from huggingface_hub import snapshot_download

    repo_id, revision = parse_hub_spec(str(spec))
    try:
        return Path(snapshot_download(repo_id=repo_id, revision=revision, cache_dir=cache_dir))
    except Exception as error:  # offline and not cached, unknown repo, no network: all one line
        raise BadFileError(f"{spec}: cannot be read from the hub or its local cache ({one_line(error)})") from None


def push_folder(folder: str | os.PathLike, repo_id: str, *, card: str, private: bool = False,
                token: str | None = None, commit_message: str | None = None) -> str:
    """Upload a model folder or a training run (its ``producer.json``, recipe and model folders) to
    the hub repository ``repo_id`` (created when missing) with ``card`` as its README; return the
    commit URL. Checkpoints, logs and anything else in the folder stay local.

    Raises:
        BadFileError: ``folder`` is neither a model folder nor a run folder.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    files = publishable_files(folder)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="latent-push-") as staging:
        for relative in files:
            target = Path(staging) / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / relative, target)
        (Path(staging) / "README.md").write_text(card)
        info = api.upload_folder(repo_id=repo_id, folder_path=staging,
                                 commit_message=commit_message or f"upload {folder.name}")
    return str(getattr(info, "commit_url", info))


def publishable_files(folder: Path) -> list[str]:
    """Relative paths pushed for ``folder``: a model folder's two files (+ its ``fit_config.json``,
    ``training_grid.json``, ``PROVENANCE.md``), or a run's records and its ``best/`` and ``final/``
    (a translation run, or a VAE run: ``best/`` without ``producer.json``)."""
    extras = ("fit_config.json", "training_grid.json", "PROVENANCE.md")
    if (folder / "producer.json").is_file() or (folder / "best" / CONFIG_NAME).is_file():
        names = [name for name in (*RUN_FILES, *extras) if (folder / name).is_file()]
        for which in ("best", "final"):
            if (folder / which / WEIGHTS_NAME).is_file():
                names += [f"{which}/{name}" for name in (CONFIG_NAME, WEIGHTS_NAME, "validation.json",
                                                         "trainer_state.json") if (folder / which / name).is_file()]
        if not any(name.endswith(WEIGHTS_NAME) for name in names):
            raise BadFileError(f"{folder}: a run folder without best/ or final/ model: finish training first")
        return names
    read_model_config(folder)  # raises when it is not a model folder either
    return [CONFIG_NAME, WEIGHTS_NAME, *(name for name in extras if (folder / name).is_file())]
