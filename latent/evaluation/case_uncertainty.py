"""Does a method's std map flag its bad cases? The per-case Spearman of mean std against MAE.

The per-voxel ``std_error_spearman`` says whether the std ranks the errors inside one case; this
cohort figure says whether a case's mean std (``std_mean``, over its mask) ranks the cases by
their MAE, so that a user can tell which predictions to distrust before looking at a CT.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping

import numpy as np

#: The per-case column: the std map's mean over the mask (HU).
STD_COLUMN = "std_mean"
#: Error column the mean std is ranked against.
ERROR_COLUMN = "mae"
#: Fewest cases with a std map for a correlation: with 2 every ranking is +-1 and says nothing.
MIN_CASES = 3


def std_mae_spearman(std_means: Iterable[float], maes: Iterable[float]) -> dict[str, float | int]:
    """Spearman correlation of per-case mean std and MAE (pairs with a non-finite value dropped).

    Returns:
        ``{"n", "spearman", "p"}`` (two-sided p of :func:`scipy.stats.spearmanr`); the correlation
        and p are NaN with fewer than :data:`MIN_CASES` pairs or when either side is constant.
    """
    from scipy.stats import spearmanr

    pairs = np.asarray([(s, e) for s, e in zip(std_means, maes)], dtype=np.float64).reshape(-1, 2)
    pairs = pairs[np.all(np.isfinite(pairs), axis=1)]
    result: dict[str, float | int] = {"n": int(len(pairs)), "spearman": math.nan, "p": math.nan}
    if len(pairs) < MIN_CASES or np.all(pairs[:, 0] == pairs[0, 0]) or np.all(pairs[:, 1] == pairs[0, 1]):
        return result
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # small samples: scipy warns, the value stands
        test = spearmanr(pairs[:, 0], pairs[:, 1])
    result["spearman"], result["p"] = float(test.statistic), float(test.pvalue)
    return result


def case_uncertainty(rows: Iterable[Mapping], group_key: str = "region") -> list[dict]:
    """:func:`std_mae_spearman` per group of the rows that have a std map, and over all of them.

    Returns:
        ``[{group_key, "n", "spearman", "p"}, ..., {group_key: "all", ...}]``; empty when no row
        has :data:`STD_COLUMN`.
    """
    rows = [row for row in rows if row.get(STD_COLUMN) is not None]
    if not rows:
        return []
    groups = sorted({str(row[group_key]) for row in rows}) + ["all"]
    out = []
    for group in groups:
        members = [row for row in rows if group == "all" or str(row[group_key]) == group]
        out.append({group_key: group, **std_mae_spearman([float(r[STD_COLUMN]) for r in members],
                                                          [float(r.get(ERROR_COLUMN, math.nan)) for r in members])})
    return out


def format_case_uncertainty(entries: list[dict], group_key: str = "region") -> str:
    """Markdown table of :func:`case_uncertainty` output."""
    lines = ["Per-case uncertainty: Spearman (case mean std, case MAE)",
             f"| {group_key} | n | Spearman | p |", "|---|---|---|---|"]
    for entry in entries:
        rho, p = entry["spearman"], entry["p"]
        lines.append(f"| {entry[group_key]} | {entry['n']} | {'n/a' if math.isnan(rho) else f'{rho:.3f}'} | "
                     f"{'n/a' if math.isnan(p) else f'{p:.3g}'} |")
    return "\n".join(lines)
