"""Case discovery in the SynthRAD2025 / SynthRAD2023 layouts, grid checks and data splits."""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from latent.core.atomic import write_text_atomic
from latent.core.duplicates import same_volumes
from latent.core.io import VolumeError, VolumeProperties, is_volume_path, read_image
from latent.core.errors import BadConfigError, BadFileError, InputError

#: Regions of SynthRAD2025 (Task 1) and SynthRAD2023 (Task 1); values are region codes in the pid.
REGION_CODES = {"AB": "AB", "HN": "HN", "TH": "TH", "brain": "B", "pelvis": "P"}
#: SynthRAD2025 pid: 1 + region + centre letter + 3 digits; SynthRAD2023: 1 + B|P + centre + 3 digits.
PID_PATTERN = re.compile(r"^1(?P<region>AB|HN|TH|B|P)(?P<centre>[A-Z])(?P<number>\d{3})$")
#: Volume roles and the file stems they are stored under.
ROLES = ("mr", "ct", "mask")

logger = logging.getLogger(__name__)


class CaseError(InputError, ValueError):
    """A case is incomplete or inconsistent (message names the case)."""


@dataclass(frozen=True)
class Case:
    """One patient: paths of its MR (always), CT and mask (when present)."""

    pid: str
    region: str
    centre: str
    mr: Path
    ct: Path | None = None
    mask: Path | None = None

    @property
    def folder(self) -> Path:
        """The case's folder."""
        return self.mr.parent


def parse_pid(pid: str) -> tuple[str, str]:
    """Return ``(region, centre)`` of a SynthRAD patient id, e.g. ``'1ABA005' -> ('AB', 'A')``.

    Raises:
        CaseError: the id does not follow the SynthRAD convention.
    """
    match = PID_PATTERN.match(pid)
    if match is None:
        raise CaseError(f"{pid}: not a SynthRAD patient id (expected e.g. 1ABA005 or 1BA001)")
    region = match["region"]
    region = {"B": "brain", "P": "pelvis"}.get(region, region)
    return region, match["centre"]


def _find_role_file(folder: Path, role: str) -> Path | None:
    """The ``role`` volume of a case folder; a broken link or unreadable entry is returned too,
    so that reading it gives an error naming it instead of a silent skip."""
    for entry in sorted(folder.iterdir()):
        name = entry.name.lower()
        if is_volume_path(entry) and name.split(".")[0] == role and (entry.is_file() or entry.is_symlink()):
            return entry
    return None


@dataclass(frozen=True)
class CaseScan:
    """What a walk over a data folder found: usable cases and the folders it had to skip."""

    cases: list[Case]
    #: case folder name -> why it was skipped (for example "no mr volume; folder is empty").
    skipped: dict[str, str]


def _skip_reason(folder: Path) -> str:
    names = sorted(entry.name for entry in folder.iterdir())
    return "no mr volume; folder is empty" if not names else f"no mr volume (holds {', '.join(names[:5])})"


def scan_cases(root: str | os.PathLike, regions: Iterable[str] | None = None) -> CaseScan:
    """Find every case under ``root`` and every case folder that cannot be used.

    Accepts the data set root (holding ``Task1/``), the ``Task1`` folder itself or one region
    folder. A case folder needs an ``mr`` volume (.mha, .nii.gz, .nii, .nrrd); ``ct`` and
    ``mask`` are optional (validation/test cases have no CT). A folder without an MR is
    returned in ``skipped`` with the reason.

    Raises:
        CaseError: ``root`` is missing or holds no case at all; two folders share a patient id,
            or hold one MR (a folder or file link, or a byte-identical copy: :mod:`latent.core.duplicates`).
    """
    root = Path(root)
    if not root.is_dir():
        raise CaseError(f"{root}: data folder not found")
    if (root / "Task1").is_dir():
        root = root / "Task1"
    region_dirs = [root] if root.name in REGION_CODES else [
        d for d in sorted(root.iterdir()) if d.is_dir() and d.name in REGION_CODES
    ]
    wanted = set(regions) if regions else None
    cases, skipped = [], {}
    for region_dir in region_dirs:
        if wanted is not None and region_dir.name not in wanted:
            continue
        for folder in sorted(p for p in region_dir.iterdir() if p.is_dir()):
            if folder.name.lower() == "overviews":
                continue
            mr = _find_role_file(folder, "mr")
            if mr is None:
                skipped[folder.name] = f"{folder}: {_skip_reason(folder)}"
                continue
            try:
                region, centre = parse_pid(folder.name)
            except CaseError:
                region, centre = region_dir.name, "?"
            cases.append(Case(
                pid=folder.name, region=region, centre=centre, mr=mr,
                ct=_find_role_file(folder, "ct"), mask=_find_role_file(folder, "mask"),
            ))
    if not cases:
        detail = f"; skipped {len(skipped)} folder(s), e.g. {next(iter(skipped.values()))}" if skipped else ""
        raise CaseError(f"{root}: no cases found (expected Task1/<region>/<pid>/mr.mha){detail}")
    seen: dict[str, Case] = {}
    for case in cases:
        if case.pid in seen:
            raise CaseError(f"{case.pid}: the same patient id in {seen[case.pid].folder} and {case.folder}; "
                            "ids must be unique across regions")
        seen[case.pid] = case
    duplicates = same_volumes({case.folder: case.mr for case in cases})
    if duplicates:
        first, second, why = duplicates[0]
        more = f" (and {len(duplicates) - 1} more pair(s))" if len(duplicates) > 1 else ""
        raise CaseError(f"{first} and {second}: the same mr volume, {why}; they would count as two patients "
                        f"and could land in train and test at once: remove one{more}")
    return CaseScan(sorted(cases, key=lambda case: case.pid), skipped)


def discover_cases(root: str | os.PathLike, regions: Iterable[str] | None = None) -> list[Case]:
    """The usable cases under ``root`` (see :func:`scan_cases`), sorted by patient id.

    Every skipped case folder is logged as a warning naming the folder and the reason.

    Raises:
        CaseError: no cases found under ``root``.
    """
    scan = scan_cases(root, regions)
    for message in scan.skipped.values():
        logger.warning("skipped case folder %s", message)
    return scan.cases


def check_case_grid(case: Case) -> VolumeProperties:
    """Check that the case's MR, CT and mask share one grid; return that grid.

    Raises:
        CaseError: naming the case, the volume and what differs.
        VolumeError: a file is unreadable.
    """
    reference = VolumeProperties.from_image(read_image(case.mr))
    for role in ("ct", "mask"):
        path = getattr(case, role)
        if path is None:
            continue
        other = VolumeProperties.from_image(read_image(path))
        differences = reference.grid_differences(other)
        if differences:
            raise CaseError(f"{case.pid}: {role} {path} is on another grid than the MR: {'; '.join(differences)}")
    return reference


def stratify(labels: Mapping[str, tuple[str, str]], seed: int = 0, by_centre: bool = True
             ) -> dict[tuple[str, str], list[str]]:
    """Patient ids grouped by (region, centre) (or region alone), each group shuffled with ``seed``.

    Args:
        labels: patient id -> (region, centre).

    Returns:
        ``{(region, centre or ""): [pid, ...]}`` in sorted key order; the same input and seed
        always give the same order.
    """
    strata: dict[tuple[str, str], list[str]] = defaultdict(list)
    for pid, (region, centre) in labels.items():
        strata[(region, centre if by_centre else "")].append(pid)
    shuffled = {}
    for key in sorted(strata):
        pids = sorted(strata[key])
        random.Random(f"{seed}:{key[0]}:{key[1]}").shuffle(pids)
        shuffled[key] = pids
    return shuffled


def make_splits(
    cases: Sequence[Case],
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    by_centre: bool = True,
) -> dict[str, list[str]]:
    """Deterministic train/val/test split stratified by region (and centre).

    Each stratum is shuffled with ``seed`` and cut by ``fractions``; a stratum with at least
    three cases gives every split at least one case, so small phantom sets still have a
    validation and a test case per region.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` of patient ids, each sorted.
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise BadConfigError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    strata = stratify({case.pid: (case.region, case.centre) for case in cases}, seed, by_centre)
    # Small strata are merged per region so that rounding does not starve val/test.
    if by_centre and any(len(pids) < 3 for pids in strata.values()):
        return make_splits(cases, fractions, seed, by_centre=False)
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for pids in strata.values():
        count = len(pids)
        n_val = round(count * fractions[1])
        n_test = round(count * fractions[2])
        if count >= 3:
            n_val, n_test = max(n_val, 1 if fractions[1] > 0 else 0), max(n_test, 1 if fractions[2] > 0 else 0)
        n_train = count - n_val - n_test
        splits["train"] += pids[:n_train]
        splits["val"] += pids[n_train:n_train + n_val]
        splits["test"] += pids[n_train + n_val:]
    return {name: sorted(pids) for name, pids in splits.items()}


def parse_fold(text: object) -> tuple[int, int]:
    """``"k/K"`` -> ``(k, K)`` with ``1 <= k <= K`` and ``K >= 2``.

    Raises:
        ValueError: anything else (the message shows the value).
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text) if isinstance(text, str) else None
    if match is None or not 1 <= int(match[1]) <= int(match[2]) or int(match[2]) < 2:
        raise ValueError(f"expected k/K with 1 <= k <= K and K >= 2 (e.g. 2/5), got {text!r}")
    return int(match[1]), int(match[2])


def make_folds(labels: Mapping[str, tuple[str, str]], folds: int, seed: int = 0) -> list[list[str]]:
    """``folds`` disjoint folds covering ``labels``, stratified by region and centre.

    Each stratum (:func:`stratify`) is shuffled with ``seed`` and dealt round-robin, the deal
    continuing from one stratum to the next, so fold sizes differ by at most one and every
    region (and centre) is spread as evenly as its size allows.

    Args:
        labels: patient id -> (region, centre).

    Returns:
        ``folds`` lists of patient ids, each sorted.
    """
    out: list[list[str]] = [[] for _ in range(folds)]
    position = 0
    for pids in stratify(labels, seed).values():
        for pid in pids:
            out[position % folds].append(pid)
            position += 1
    return [sorted(fold) for fold in out]


def fold_of_splits(splits: Mapping[str, Sequence[str]], pool: Sequence[str], labels: Mapping[str, tuple[str, str]],
                   fold: str, seed: int = 0) -> tuple[list[str], list[str]]:
    """Training and validation ids of fold ``"k/K"`` over ``pool`` (the train + val cases).

    The ``test`` split's ids are never used, even if the pool names one of them.

    Returns:
        ``(train_ids, val_ids)``: the other K - 1 folds and fold k, each sorted.
    """
    index, count = parse_fold(fold)
    held_out = set(splits.get("test", ()))
    usable = sorted(set(pool) - held_out)
    folds = make_folds({pid: labels[pid] for pid in usable}, count, seed)
    if any(not ids for ids in folds):
        raise BadConfigError(f"{count} folds need at least {count} train + val cases, got {len(usable)}")
    train = sorted(pid for number, ids in enumerate(folds, 1) if number != index for pid in ids)
    return train, folds[index - 1]


def save_splits(splits: dict[str, list[str]], path: str | os.PathLike) -> Path:
    """Write splits as JSON (atomic)."""
    path = Path(path)
    return write_text_atomic(path, json.dumps(splits, indent=2) + "\n")


#: The list of a split file that holds the cases ``latent split --qa`` kept out of training.
QA_EXCLUDED = "qa_excluded"


def exclude_by_label(splits: Mapping[str, Sequence[str]], labels: Mapping[str, str], exclude: Iterable[str],
                     kept_whole: Iterable[str] = ("test",)) -> dict[str, list[str]]:
    """``splits`` with the cases whose QA label is in ``exclude`` moved from every split but
    ``kept_whole`` (the test split is always scored whole) into :data:`QA_EXCLUDED`."""
    exclude, kept_whole = {label.upper() for label in exclude}, set(kept_whole)
    out: dict[str, list[str]] = {name: [] for name in splits}
    out[QA_EXCLUDED] = []
    for name, pids in splits.items():
        for pid in pids:
            moved = name not in kept_whole and labels.get(pid, "").upper() in exclude
            out[QA_EXCLUDED if moved else name].append(pid)
    return out


def load_splits(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read splits written by :func:`save_splits`, checked by :func:`check_splits`.

    Raises:
        CaseError: the file is missing or malformed.
        BadFileError: an id listed twice, or a case in two splits.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CaseError(f"{path}: split file not found") from None
    except json.JSONDecodeError as error:
        raise CaseError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise CaseError(f"{path}: expected an object of lists, e.g. {{'train': [...], 'val': [...]}}")
    splits = {str(name): [str(pid) for pid in pids] for name, pids in data.items()}
    check_splits(splits, path)
    return splits


def _some(ids: Sequence[str], shown: int = 5) -> str:
    """The first ``shown`` ids, then how many there are in all."""
    return ", ".join(ids[:shown]) + (f", ... ({len(ids)} in all)" if len(ids) > shown else "")


def check_splits(splits: Mapping[str, Sequence[str]], path: str | os.PathLike) -> None:
    """Refuse splits with an id listed twice in one split or a case in more than one split.

    Raises:
        BadFileError: naming ``path``, the split(s) and the ids (the first few and the count).
    """
    problems = []
    homes: dict[str, list[str]] = defaultdict(list)
    for name, pids in splits.items():
        counts = Counter(pids)
        twice = sorted(pid for pid, count in counts.items() if count > 1)
        if twice:
            problems.append(f"{len(twice)} id(s) listed more than once in {name!r}: {_some(twice)}")
        for pid in counts:
            homes[pid].append(name)
    shared = sorted(pid for pid, names in homes.items() if len(names) > 1)
    if shared:
        problems.append(f"{len(shared)} case(s) in more than one split: "
                        + _some([f"{pid} ({'/'.join(homes[pid])})" for pid in shared]))
    if problems:
        raise BadFileError(f"{path}: " + "; ".join(problems))


def check_split_ids(path: str | os.PathLike, splits: Mapping[str, Sequence[str]], names: Iterable[str],
                    known: Iterable[str], where: str | os.PathLike) -> None:
    """Refuse ids of the splits ``names`` (the ones a command uses) that ``where`` does not hold.

    Args:
        known: the case ids of ``where`` (a data folder or a cache).

    Raises:
        BadFileError: naming ``path``, the split, ``where`` and the unknown ids.
    """
    known = set(known)
    problems = []
    for name in names:
        unknown = sorted(set(splits.get(name, ())) - known)
        if unknown:
            problems.append(f"{len(unknown)} id(s) of {name!r} not in {where}: {_some(unknown)}")
    if problems:
        raise BadFileError(f"{path}: " + "; ".join(problems))


def read_split(path: str | os.PathLike, name: str) -> list[str]:
    """Patient ids of split ``name`` of a split file.

    Raises:
        CaseError: the file is missing or malformed, or has no split of that name.
    """
    splits = load_splits(path)
    if name not in splits:
        raise CaseError(f"{path}: no split {name!r} (has {', '.join(sorted(splits)) or 'none'})")
    return splits[name]


__all__ = [
    "Case", "CaseError", "CaseScan", "read_split", "VolumeError", "check_case_grid", "check_split_ids", "check_splits",
    "discover_cases", "scan_cases", "load_splits",
    "fold_of_splits", "make_folds", "make_splits", "parse_fold", "parse_pid", "save_splits", "stratify",
]
