"""The project's own exceptions for user mistakes.

Everything raised from this hierarchy means "the input is wrong" and names the file or the
field (the four kinds are also ``ValueError``s, so older ``except ValueError`` callers still work); the ``latent`` CLI prints it on one line and exits with status 2 (``--debug`` shows the
traceback). Any other exception is a bug in this code and keeps its traceback. Domain errors
(``VolumeError``, ``CaseError``, ``ConfigError``, ...) derive from one of these classes, and
from ``ValueError`` where they always did.
"""

from __future__ import annotations

import errno
from pathlib import Path

from latent.core.atomic import TEMPORARY_PREFIX


class InputError(Exception):
    """A user mistake: the message names the file or field and the problem."""


class BadFileError(InputError, ValueError):
    """A file or folder is missing, unreadable, or not what the command needs."""


class BadGeometryError(InputError, ValueError):
    """Volumes or grids that should agree do not, or a grid cannot hold the case."""


class BadConfigError(InputError, ValueError):
    """A recipe, protocol or option value is invalid (the message names the field)."""


class WeightsError(InputError, ValueError):
    """Model weights are missing, altered, or do not fit the model they are loaded into."""


def one_line(error: BaseException) -> str:
    """The whole message of ``error`` on one line (continuation lines joined with '; ').

    Pydantic validation errors keep every field path and reason.
    """
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        parts = [f"{'.'.join(str(p) for p in item['loc']) or 'value'}: {item['msg'].removeprefix('Value error, ')}"
                 for item in error.errors()]
        return f"invalid {error.title}: " + "; ".join(parts)
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    head, rest = lines[0], lines[1:]
    if not rest:
        return head
    return head + (" " if head.endswith(":") else "; ") + "; ".join(rest)


#: errno values that mean "the machine refuses" (full disk, read-only or wrong kind of target, name
#: too long): the user's to fix, so one line naming the path, never a traceback.
ENVIRONMENT_ERRNOS: dict[int, str] = {
    errno.ENOSPC: "no space left on the device; free some space and rerun",
    errno.EDQUOT: "disk quota exceeded; free some space and rerun",
    errno.EROFS: "read-only file system; choose a writable place",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENAMETOOLONG: "file name too long for the file system",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.EEXIST: "exists and is not a folder",
    errno.ENOENT: "no such file or folder",
}


def user_message(error: BaseException) -> str | None:
    """The one line for a user's or the machine's problem, or None for a bug (keep its traceback).

    Input errors and invalid recipes give their own message; an ``OSError`` of
    :data:`ENVIRONMENT_ERRNOS` names its path and the reason; ``MemoryError`` says what could
    not be allocated.
    """
    from pydantic import ValidationError

    if isinstance(error, (InputError, ValidationError)):
        return one_line(error)
    if isinstance(error, MemoryError):
        detail = one_line(error) if str(error).strip() else ""
        return "out of memory" + (f": {detail}" if detail else "") + "; free memory or use a smaller grid or tile"
    if not isinstance(error, OSError):
        return None
    reason = ENVIRONMENT_ERRNOS.get(error.errno or -1)
    if reason is None:
        # The project's own OSErrors (no errno) carry their message; unknown errno values are bugs.
        return one_line(error) if error.errno is None and isinstance(error, _OWN_OS_ERRORS) else None
    paths = [str(path) for path in (error.filename, error.filename2) if path is not None]
    # A rename names the temporary file first: the user's own path is the one to show.
    paths = [path for path in paths if not Path(path).name.startswith(TEMPORARY_PREFIX)] or paths
    if error.errno == errno.ENAMETOOLONG and paths:
        reason += f" (a name of {max(len(part) for part in Path(paths[-1]).parts)} characters)"
    return f"{' -> '.join(paths) or 'a file'}: {reason}"


#: OSError subclasses the project raises itself with a message that names the path.
_OWN_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
