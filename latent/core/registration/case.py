"""One case of ``latent register``: CT onto MR, checked, written into a new SynthRAD-layout root.

Nothing under the data root is modified. A registration that diverges or folds is a one-line
case failure and writes nothing. A case whose record (``<out>/register/cases/<pid>.json``,
written last) names the same source hashes, method and parameter maps is not registered again.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from latent.core.atomic import write_atomic, write_text_atomic
from latent.core.cases import Case, CaseError
from latent.core.hashing import sha256_file
from latent.core.io import write_volume
from latent.core.prepare import read_native
from latent.core.phantom.truth import CT_TRUE, MOTION_TRUE, read_truth
from latent.core.registration.similarity import nmi
from latent.core.registration.elastix import displacement_stats, negative_jacobian_fraction, warp
from latent.core.registration.methods import method_files, method_identity, register_field
from latent.core.registration.settings import RegisterSettings
from latent.core.registration.truth import TRUTH_COLUMNS, truth_columns

__all__ = ["COLUMNS", "RECORD_DIR", "RegisterSettings", "RegistrationError", "case_folder", "record_path",
           "register_case"]


#: Folder of ``<out>`` holding the per-case records and overlay figures (not a case folder).
RECORD_DIR = "register"
#: Columns of ``register.csv``, in order (the truth columns only on cases that know their truth).
COLUMNS = ("pid", "region", "method", "nmi_before", "nmi_after", "mean_displacement_mm", "p95_displacement_mm",
           "negative_jacobian_fraction", "seconds", *TRUTH_COLUMNS)


class RegistrationError(CaseError):
    """A registration that made the pair worse (diverged) or folded: nothing was written."""


def case_folder(out_root: Path, case: Case) -> Path:
    """The case's folder in the registered root: ``<out>/Task1/<region folder>/<pid>``."""
    return Path(out_root) / "Task1" / case.folder.parent.name / case.pid


def record_path(out_root: Path, pid: str) -> Path:
    """The case's record, written once every output of the case is in place."""
    return Path(out_root) / RECORD_DIR / "cases" / f"{pid}.json"


def _sources(case: Case, settings: RegisterSettings) -> dict[str, str]:
    files = {role: getattr(case, role) for role in ("mr", "ct", "mask")}
    files.update({f"map:{p.name}": p for p in method_files(settings)})
    files.update({f"truth:{name}": case.folder / name for name in (CT_TRUE, MOTION_TRUE) if (case.folder / name).is_file()})
    return {**{role: sha256_file(path) for role, path in files.items()}, **method_identity(settings)}


def _done(case: Case, out_root: Path, settings: RegisterSettings, sources: dict[str, str]) -> dict | None:
    path = record_path(out_root, case.pid)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    folder = case_folder(out_root, case)
    complete = all((folder / name).is_file() for name in record.get("files", []))
    if complete and record.get("sources") == sources and record.get("method") == settings.method:
        return dict(record["metrics"])
    return None


def _copy(source: Path, target: Path) -> Path:
    return write_atomic(target, lambda temporary: shutil.copyfile(source, temporary), suffix="".join(source.suffixes))


def register_case(case: Case, data_root: Path, out_root: Path, settings: RegisterSettings) -> dict:
    """Register one case's CT onto its MR and write it into ``out_root`` (see the module docstring).

    Returns:
        The case's row of ``register.csv`` (:data:`COLUMNS`), plus ``"reused": True`` when an
        earlier run's outputs were kept.

    Raises:
        CaseError: no CT or mask, volumes on different grids, or the registration diverged or folded.
    """
    if case.ct is None:
        raise CaseError(f"{case.pid}: no CT file in {case.folder}; registration needs the CT")
    if case.mask is None:
        raise CaseError(f"{case.pid}: no mask file in {case.folder}; registration needs the mask")
    sources = _sources(case, settings)
    previous = _done(case, out_root, settings, sources)
    if previous is not None:
        return {**previous, "reused": True}
    started = time.perf_counter()
    mr, mask, ct, properties = read_native(case)
    spacing_zyx = tuple(float(s) for s in reversed(properties.spacing))
    field = register_field(mr, ct, mask, spacing_zyx, settings)
    fill = -1024.0 if float(ct.min()) <= -1024.0 else -1000.0
    moved = np.rint(np.clip(warp(ct, field, spacing_zyx, fill), -32768, 32767)).astype(np.int16)
    before, after = (nmi(mr, volume, mask, settings.nmi_bins) for volume in (ct, moved))
    mean_mm, p95_mm = displacement_stats(field, mask)
    folding = negative_jacobian_fraction(field, mask, spacing_zyx) if settings.method != "rigid" else 0.0
    row = {"pid": case.pid, "region": case.region, "method": settings.method, "nmi_before": round(before, 5),
           "nmi_after": round(after, 5), "mean_displacement_mm": round(mean_mm, 3),
           "p95_displacement_mm": round(p95_mm, 3), "negative_jacobian_fraction": round(folding, 6)}
    truth = read_truth(case.folder)
    if truth is not None:
        row.update(truth_columns(ct, moved, field, mask, spacing_zyx, *truth))
    if after < before - settings.nmi_tolerance:
        raise RegistrationError(f"{case.pid}: {settings.method} registration diverged (NMI in the mask "
                                f"{before:.4f} -> {after:.4f}); no registered CT written")
    if folding > settings.max_negative_jacobian:
        raise RegistrationError(f"{case.pid}: {settings.method} registration folds ({100 * folding:.2f}% of the "
                                f"mask has a negative Jacobian, above {100 * settings.max_negative_jacobian:g}%); "
                                "no registered CT written")
    folder = case_folder(out_root, case)
    folder.mkdir(parents=True, exist_ok=True)
    ct_orig = "ct_orig" + "".join(case.ct.suffixes)
    files = [case.mr.name, case.mask.name, ct_orig, "ct.mha"]
    for source, name in ((case.mr, case.mr.name), (case.mask, case.mask.name), (case.ct, ct_orig)):
        _copy(source, folder / name)
    write_volume(folder / "ct.mha", moved, properties, dtype="int16")
    row["seconds"] = round(time.perf_counter() - started, 2)
    write_text_atomic(record_path(out_root, case.pid), json.dumps(
        {"pid": case.pid, "method": settings.method, "sources": sources, "files": files, "metrics": row},
        indent=2) + "\n")
    return row
