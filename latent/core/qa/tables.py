"""The QA outputs as tables: ``qa.csv`` (one row per case), ``slices.csv`` and ``qa.json`` (docs/qa.md)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from latent.core.atomic import write_text_atomic
from latent.core.qa.case import CaseQA
from latent.core.qa.cohort import Cohort
from latent.core.qa.config import QAConfig

#: First columns of ``qa.csv``, in this order (stable: ``latent split --qa`` reads them).
LEAD_COLUMNS = ("pid", "region", "label", "flags", "reasons", "notes")
#: Columns of ``slices.csv``.
SLICE_COLUMNS = ("pid", "slice", "reason")


def _cell(value: object) -> object:
    """Floats at 6 significant digits, NaN as empty, whole numbers without a decimal point."""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return int(value) if value.is_integer() and abs(value) < 1e15 else float(f"{value:.6g}")
    return value


def case_row(qa: CaseQA) -> dict[str, object]:
    """One ``qa.csv`` row: the lead columns, then every descriptor followed by its ``_zscore`` when there is one."""
    judged = [f for f in qa.findings if f.level != "NOTE"]
    row: dict[str, object] = {"pid": qa.pid, "region": qa.region, "label": qa.values.get("label", ""),
                              "flags": ";".join(f.code for f in judged),
                              "reasons": "; ".join(f.text for f in judged),
                              "notes": "; ".join(f.text for f in qa.findings if f.level == "NOTE")}
    for name, value in qa.values.items():
        if name == "label" or name.endswith("_zscore"):
            continue
        row[name] = _cell(value)
        if f"{name}_zscore" in qa.values:
            row[f"{name}_zscore"] = _cell(qa.values[f"{name}_zscore"])
    return row


def _csv(rows: list[dict[str, object]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_tables(out: Path, cohort: Cohort, config: QAConfig, failures: dict[str, str],
                 skipped: dict[str, str]) -> dict[str, Path]:
    """Write ``qa.csv``, ``slices.csv`` and ``qa.json`` under ``out`` atomically; returns them by name."""
    rows = [case_row(qa) for qa in cohort.cases]
    columns = list(dict.fromkeys([*LEAD_COLUMNS, *(key for row in rows for key in row)]))
    slices = [{"pid": qa.pid, "slice": k, "reason": reason} for qa in cohort.cases for k, reason in qa.slices]
    record = {"config": config.model_dump(mode="json"), "notes": cohort.notes,
              "counts": {label: sum(qa.values.get("label") == label for qa in cohort.cases)
                         for label in ("GREEN", "YELLOW", "RED")},
              "cases": [{"pid": qa.pid, "region": qa.region, "label": qa.values.get("label"),
                         "findings": [vars(f) for f in qa.findings],
                         "slices": [[k, reason] for k, reason in qa.slices],
                         "values": {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                    for k, v in qa.values.items()}} for qa in cohort.cases],
              "failures": dict(sorted(failures.items())), "skipped": dict(sorted(skipped.items()))}
    return {"qa.csv": write_text_atomic(out / "qa.csv", _csv(rows, columns)),
            "slices.csv": write_text_atomic(out / "slices.csv", _csv(slices, list(SLICE_COLUMNS))),
            "qa.json": write_text_atomic(out / "qa.json", json.dumps(record, indent=2) + "\n")}
