"""Cohort figures of the bench report: StructB per method and region, and the per-case uncertainty.

Both are one value per method (and region), not a mean over cases: StructB compares the mean
structure masks of the method's sCTs and of the real CTs (``latent.evaluation.structb``), and the
per-case uncertainty ranks the test cases' mean std against their MAE
(``latent.evaluation.case_uncertainty``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from latent.evaluation.case_uncertainty import case_uncertainty
from latent.evaluation.structb import STRUCTURES

Table = tuple[list[str], list[list[str]]]

CASE_UNCERTAINTY_TITLE = ("Per-case uncertainty: Spearman correlation of each test case's mean std (inside the mask) "
                          "with its MAE (methods with a std map; does the std map flag the bad cases?)")


def cohort_results(rows_by_method: Mapping[str, Sequence[dict]],
                   structural_bias: Mapping[str, Mapping | None]) -> dict:
    """``{"structural_bias": method -> structb_by_region output, "case_uncertainty": method -> entries}``,
    each only for the methods that have one."""
    uncertainty = {name: case_uncertainty(rows) for name, rows in rows_by_method.items()}
    return {"structural_bias": {name: dict(value) for name, value in structural_bias.items()
                                if value and name in rows_by_method},
            "case_uncertainty": {name: entries for name, entries in uncertainty.items() if entries}}


def _number(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def cohort_columns(cohort: Mapping) -> dict[str, dict[str, float]]:
    """Per method, the flat ``results.csv`` columns: ``structb_<structure>`` (all regions),
    ``<region>_structb_<structure>`` and ``case_std_mae_spearman`` with its ``_n`` and ``_p``."""
    columns: dict[str, dict[str, float]] = {}
    for name, result in cohort["structural_bias"].items():
        for entry in result["regions"]:
            prefix = "" if entry["region"] == "all" else f"{entry['region']}_"
            columns.setdefault(name, {}).update({f"{prefix}structb_{s}": entry[s] for s in STRUCTURES})
    for name, entries in cohort["case_uncertainty"].items():
        overall = entries[-1]
        columns.setdefault(name, {}).update({"case_std_mae_spearman": overall["spearman"],
                                             "case_std_mae_spearman_n": overall["n"],
                                             "case_std_mae_spearman_p": overall["p"]})
    return columns


def cohort_tables(cohort: Mapping) -> dict[str, Table]:
    """One StructB table per structure (methods x regions) and the per-case uncertainty table."""
    tables: dict[str, Table] = {}
    structb = cohort["structural_bias"]
    if structb:
        grids = sorted({result["grid"] for result in structb.values()})
        regions = list(dict.fromkeys(e["region"] for result in structb.values() for e in result["regions"]))
        regions = [r for r in regions if r != "all"] + ["all"]
        for structure, low in STRUCTURES.items():
            title = (f"StructB of {structure} (HU >= {low:g} inside the mask) per region, on the common grid "
                     f"{' / '.join(grids)} (0: the mean masks of sCT and CT agree)")
            rows = []
            for name, result in structb.items():
                lookup = {e["region"]: e for e in result["regions"]}
                rows.append([name, *(f"{_number(lookup[r][structure])} (n={lookup[r]['n']})" if r in lookup else "-"
                                     for r in regions)])
            tables[title] = (["method", *regions], rows)
    if cohort["case_uncertainty"]:
        tables[CASE_UNCERTAINTY_TITLE] = (["method", "n", "Spearman (mean std, MAE)", "p"], [
            [name, str(entries[-1]["n"]), _number(entries[-1]["spearman"]),
             "n/a" if math.isnan(entries[-1]["p"]) else f"{entries[-1]['p']:.3g}"]
            for name, entries in cohort["case_uncertainty"].items()])
    return tables
