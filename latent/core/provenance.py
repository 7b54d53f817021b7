"""Where a result came from: the git revision of this checkout and a description of the machine."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

_REPOSITORY = Path(__file__).resolve().parents[2]


def git_revision(repository: Path = _REPOSITORY) -> str:
    """``git rev-parse HEAD`` of the checkout (``+dirty`` when tracked files changed), or ``unknown``."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repository, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repository,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine_description() -> str:
    """CPU model and core count (and the CUDA device when there is one), one line."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores"
    try:
        import torch

        if torch.cuda.is_available():
            text += f", {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return text
