"""The project's own exceptions for user mistakes.

Everything raised from this hierarchy means "the input is wrong" and names the file or the
field (the four kinds are also ``ValueError``s, so older ``except ValueError`` callers still work); the ``latent`` CLI prints it on one line and exits with status 2 (``--debug`` shows the
traceback). Any other exception is a bug in this code and keeps its traceback. Domain errors
(``VolumeError``, ``CaseError``, ``ConfigError``, ...) derive from one of these classes, and
from ``ValueError`` where they always did.
"""

from __future__ import annotations


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
