"""Atomic writes: a temporary file beside the target, renamed over it once complete.

Every temporary file or folder is named ``.latent-tmp-<pid>-<random><suffix>``: short (so the
only length limit is the user's own file name) and recognisable, so that a later run removes
those of killed processes (:func:`remove_stale_temporaries`). Finished outputs get the mode the
process umask allows (``0o666 & ~umask``, folders ``0o777 & ~umask``), not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

#: Start of every temporary name written here.
TEMPORARY_PREFIX = ".latent-tmp-"


def current_umask() -> int:
    """The process umask, read without changing it (set and restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def output_mode(folder: bool = False) -> int:
    """Mode of a finished output under the process umask."""
    return (0o777 if folder else 0o666) & ~current_umask()


def temporary_path(target: Path, suffix: str = "") -> Path:
    """A fresh temporary name beside ``target`` (``suffix`` keeps a writer's format, e.g. ``.mha``)."""
    return Path(target).parent / f"{TEMPORARY_PREFIX}{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def publish(temporary: Path, target: Path) -> Path:
    """Rename a complete temporary file or folder over ``target`` and give it the umask's mode."""
    os.replace(temporary, target)
    os.chmod(target, output_mode(Path(target).is_dir()))
    return Path(target)


def write_atomic(target: str | os.PathLike, write: Callable[[Path], object], suffix: str = "") -> Path:
    """Call ``write(temporary)`` and rename the result over ``target``; nothing is left on failure."""
    target = Path(target)
    temporary = temporary_path(target, suffix)
    try:
        write(temporary)
        return publish(temporary, target)
    finally:
        if temporary.is_dir() and not temporary.is_symlink():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)


def write_text_atomic(target: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``target`` atomically (the folder is created when missing)."""
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(target, lambda path: path.write_text(text))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders that killed runs left in ``folder``.

    Only names of this module's pattern whose process is gone are removed; those of live
    processes (another shard writing beside this one) are kept.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.glob(f"{TEMPORARY_PREFIX}*"):
        pid = path.name[len(TEMPORARY_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
