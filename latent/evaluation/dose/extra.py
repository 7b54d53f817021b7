"""The optional dose extra: lazy imports with a one-line install instruction when missing.

``latent.evaluation.dose`` itself imports without pyRadPlan, pymedphys or numba (the range proxy needs
none of them); only planning, recalculation and gamma do.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from types import ModuleType

#: How to install the extra. pyRadPlan goes in without its dependencies: its hard dependency
#: pydantic_ai pulls many AI-service clients that the dose code never imports.
INSTALL_HINT = "pip install 'latent-sct[dose]' && pip install --no-deps pyRadPlan==0.5.0"
#: Import name -> distribution name of everything the dose evaluation needs at run time.
DOSE_MODULES = {"pyRadPlan": "pyRadPlan", "pymedphys": "pymedphys", "numba": "numba"}


class DoseExtraMissing(ImportError):
    """The optional dose extra is not installed (the message says how to install it)."""


def require_dose_extra() -> None:
    """Import-check the dose extra once.

    Raises:
        DoseExtraMissing: naming the missing packages and the install command.
    """
    missing = []
    for module in DOSE_MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # numpydantic/torch notices at import
                importlib.import_module(module)
        except ImportError:
            missing.append(DOSE_MODULES[module])
    if missing:
        raise DoseExtraMissing(
            f"dose evaluation needs the optional dose extra (missing: {', '.join(missing)}); install it with: {INSTALL_HINT}"
        )


def load_pyradplan(quiet: bool = True) -> ModuleType:
    """Import pyRadPlan configured for this pipeline: CPU numpy backend, no console bars.

    Raises:
        DoseExtraMissing: pyRadPlan (or the rest of the extra) is not installed.
    """
    require_dose_extra()
    pyradplan = importlib.import_module("pyRadPlan")
    pyradplan.settings.xp.prefer_gpu = False
    from pyRadPlan.core import ProgressReporter  # noqa: PLC0415 - only with the extra

    # tqdm bars per ray would flood the log of a multi-case run; our own per-case bar remains.
    ProgressReporter.console_progress = not quiet
    # Its warnings are about defaults we set on purpose (engine, problem, CPU backend).
    logging.getLogger("pyRadPlan").setLevel(logging.ERROR)
    return pyradplan
