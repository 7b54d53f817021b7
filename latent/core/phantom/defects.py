"""Optional defects of the phantom, so that a quality-control tool can be tested against known
answers (docs/phantom.md, "Defects").

Each defect is off by default, draws from its own random stream (so it never shifts the clean
case or another defect) and records where it was put in the case's ``info["defects"]``:
``{name: {"slices": [z, ...], ...}}`` with z the slice index of the written volume (array axis 0).
Metal, misregistration and deformation are drawn by :mod:`latent.core.phantom.artefacts`; this module only
records them. The injectors live in :mod:`latent.core.phantom.defect_injectors`.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

from latent.core.errors import BadConfigError
from latent.core.phantom.anatomy import TISSUES
from latent.core.phantom.defect_injectors import (
    add_banding,
    add_ct_offset,
    add_extra_object,
    add_signal_void,
    cut_field_of_view,
)

#: Every defect name, in the order they are listed in records.
DEFECTS = ("banding", "fov_cut", "extra_object", "signal_void", "ct_offset", "metal", "misregistration",
           "deformation")
#: Defects injected by this module (each one's random stream is fixed by its position here).
INJECTED = ("fov_cut", "extra_object", "signal_void", "banding", "ct_offset")
#: ``"all"``: a chosen case gets every named defect; ``"one"``: the chosen cases get the named
#: defects one each, round robin in case order.
DefectsPerCase = Literal["all", "one"]
#: Salt of the stream that picks which cases carry defects (from the dataset seed only).
_PICK_SALT = 0x51A7


def check_defects(defects: Sequence[str]) -> tuple[str, ...]:
    """Validated defect names, in :data:`DEFECTS` order."""
    if isinstance(defects, str):
        defects = [d.strip() for d in defects.split(",") if d.strip()]
    names = list(defects)
    unknown = [d for d in names if d not in DEFECTS]
    if unknown:
        raise BadConfigError(f"defects: unknown defect {unknown[0]!r}; expected some of {', '.join(DEFECTS)}")
    if len(set(names)) != len(names):
        raise BadConfigError(f"defects: {', '.join(names)} names a defect twice")
    return tuple(d for d in DEFECTS if d in names)


def defect_plan(pids: Sequence[str], defects: Sequence[str], fraction: float = 1.0, seed: int = 0,
                per_case: DefectsPerCase = "all") -> dict[str, tuple[str, ...]]:
    """Defects of each case: ``round(fraction * len(pids))`` cases (halves round up) carry them.

    The cases are the first of a permutation seeded from ``seed`` only, so the same arguments
    always pick the same cases; with ``per_case="one"`` the chosen cases, in case order, get the
    defects one each, round robin.
    """
    names = check_defects(defects)
    if not 0.0 <= float(fraction) <= 1.0:
        raise BadConfigError(f"defect_fraction must be between 0 and 1, got {float(fraction):g}")
    if per_case not in ("all", "one"):
        raise BadConfigError(f"defects_per_case must be 'all' or 'one', got {per_case!r}")
    plan: dict[str, tuple[str, ...]] = {pid: () for pid in pids}
    if not names:
        return plan
    count = int(np.floor(float(fraction) * len(pids) + 0.5))
    order = np.random.default_rng(np.random.SeedSequence([seed, _PICK_SALT])).permutation(len(pids))
    for k, index in enumerate(sorted(int(i) for i in order[:count])):
        plan[pids[index]] = names if per_case == "all" else (names[k % len(names)],)
    return plan


def inject_defects(names: Sequence[str], rng: np.random.Generator, mr: np.ndarray, ct: np.ndarray,
                   fov: np.ndarray, labels: np.ndarray, spacing_zyx, info: dict) -> np.ndarray:
    """Inject the named defects of :data:`INJECTED` into ``mr`` and ``ct`` (float, in place) before
    the mask is derived; records go to ``info["defects"]``. Returns the (possibly cut) field of view.

    ``rng`` gives one seed per injected defect whether it is named or not, so each defect's
    stream is the same in every combination.
    """
    streams = dict(zip(INJECTED, (np.random.default_rng(s) for s in rng.integers(0, 2**63, size=len(INJECTED)))))
    records = info.setdefault("defects", {})
    body = labels > 0
    pixel = float(spacing_zyx[2])
    if "fov_cut" in names:
        fov, records["fov_cut"] = cut_field_of_view(fov, body, streams["fov_cut"])
    if "extra_object" in names:
        records["extra_object"] = add_extra_object(mr, ct, body & fov, fov, pixel, streams["extra_object"], info)
    if "signal_void" in names:
        soft = np.isin(labels, [TISSUES[t].label for t in _SOFT_TISSUES]) & fov
        records["signal_void"] = add_signal_void(mr, body & fov, soft, spacing_zyx, streams["signal_void"], info)
    if "banding" in names:
        records["banding"] = add_banding(mr, fov, streams["banding"])
    if "ct_offset" in names:
        records["ct_offset"] = add_ct_offset(ct, fov, streams["ct_offset"])
    return fov


#: Tissues a signal void may be centred in (not air, lung, bone or metal, already dark on MR).
_SOFT_TISSUES = ("fat", "muscle", "soft_tissue", "liver", "kidney", "spleen", "white_matter", "grey_matter",
                 "gland")


def record_artefacts(info: dict, labels: np.ndarray, fov: np.ndarray, metal: bool, void,
                     misregistration: bool, deformation: bool = False) -> None:
    """Add the metal (``void``: its MR void ``(occupancy, box)`` from artefacts.py, or None) and
    misregistration (and deformation) records to ``info["defects"]``, on the final labels and field of view."""
    records = info.setdefault("defects", {})
    covered = [int(z) for z in np.flatnonzero(fov.any(axis=(1, 2)))]
    if metal:
        present = labels == TISSUES["metal"].label
        slices = [int(z) for z in np.flatnonzero(present.any(axis=(1, 2)))]
        streaks = info.get("metal_streak_slices", [])
        near = sorted({z + d for z in streaks + slices for d in (-1, 0, 1)} & set(covered))  # the CT's blur
        occupancy, box = void if void is not None else (np.zeros((0, 1, 1)), (slice(0, 0),))
        in_void = box[0].start + np.flatnonzero(occupancy.max(axis=(1, 2)) > 0)
        records["metal"] = {"slices": slices, "voxels": int(present.sum()), "ct_slices": near,
                            "streak_slices": sorted(set(streaks) & set(covered)),
                            "mr_void_slices": sorted({int(z) for z in in_void} & set(covered)),
                            "mr_void_voxels": int((occupancy >= 0.5).sum()), "site_mm": dict(info.get("metal", {}))}
    if misregistration:
        records["misregistration"] = {"slices": covered, **info["misregistration"]}
    if deformation:
        records["deformation"] = {"slices": covered, **info["deformation"]}
    # one key order for every case: that of DEFECTS
    info["defects"] = {name: records[name] for name in DEFECTS if name in records}
