"""Statistics of a method comparison on one fixed test split: bootstrap CIs, paired tests, tables.

Every method is scored on the same test cases, so methods are compared case by case (paired by
``pid``), never as two independent samples.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats

from latent.evaluation.scoring import summarise

#: Confidence level of every reported interval (the usual 95 %).
CI_LEVEL = 0.95
#: Bootstrap resamples: enough for stable 2.5 / 97.5 percentiles at the few-ms cost of small test splits.
BOOTSTRAP_RESAMPLES = 2000

Values = Sequence[float] | Mapping[str, float]


def _clean(values: Sequence[float]) -> np.ndarray:
    """Values as float64 with NaNs (unscored cases) dropped; infinities are kept."""
    array = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64).ravel()
    return array[~np.isnan(array)]


def bootstrap_ci(values: Sequence[float], level: float = CI_LEVEL, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean.

    Args:
        values: per-case values; NaNs are dropped.
        level: confidence level in (0, 1).
        resamples: number of bootstrap resamples.
        seed: seed of the numpy Generator (the same seed gives the same interval).

    Returns:
        ``(low, high)``; ``(nan, nan)`` with fewer than 2 values. With an infinite value among them
        (an HD95 with no predicted bone) the bounds are taken as observed resample means, so an
        unbounded side reads ``inf`` rather than NaN.
    """
    array = _clean(values)
    if array.size < 2:
        return math.nan, math.nan
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, array.size, size=(resamples, array.size))
    with np.errstate(invalid="ignore"):
        means = array[indices].mean(axis=1)
    # Linear interpolation between two infinite means gives NaN: pick observed means instead.
    method = "linear" if np.all(np.isfinite(array)) else "inverted_cdf"
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail], method=method)
    return float(low), float(high)


def _aligned(a: Values, b: Values) -> tuple[np.ndarray, np.ndarray]:
    """Paired values of two methods: by shared pid for mappings, by position for sequences."""
    if isinstance(a, Mapping) != isinstance(b, Mapping):
        raise TypeError("a and b must both be mappings pid -> value or both be sequences")
    if isinstance(a, Mapping):
        shared = sorted(set(a) & set(b))
        a, b = [a[pid] for pid in shared], [b[pid] for pid in shared]
    elif len(a) != len(b):
        raise ValueError(f"paired values need the same length, got {len(a)} and {len(b)}")
    first = np.asarray([np.nan if v is None else v for v in a], dtype=np.float64)
    second = np.asarray([np.nan if v is None else v for v in b], dtype=np.float64)
    keep = ~(np.isnan(first) | np.isnan(second))
    return first[keep], second[keep]


def _effect_size(differences: np.ndarray) -> float:
    """Cohen's d_z: mean difference over the std (ddof=1) of the differences, without NaN from inf or 0."""
    mean = float(np.mean(differences))
    if math.isinf(mean) or not np.all(np.isfinite(differences)):
        return math.copysign(math.inf, mean) if not math.isnan(mean) else math.nan
    spread = float(np.std(differences, ddof=1))
    if spread == 0.0:
        return 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    return mean / spread


def paired_tests(a: Values, b: Values) -> dict[str, float | int]:
    """Paired comparison of two methods scored on the same test cases.

    This follows how synthetic-CT papers and challenge reports compare methods on a shared test
    set: the mean per-case difference, a two-sided Wilcoxon signed-rank test (no normality
    assumption; the primary test for small splits), a two-sided paired t-test, and Cohen's d_z
    (mean difference / std of the differences) as the effect size.

    Args:
        a: per-case values of the first method (a sequence, or a mapping pid -> value).
        b: the second method's values on the same cases (same order, or a mapping by pid: only
            shared pids are compared). Pairs with a NaN on either side are dropped; two equal
            infinities count as a difference of 0.

    Returns:
        ``{"n", "mean_difference" (a - b), "wilcoxon_p", "ttest_p", "cohens_dz"}``. Both p-values
        are 1.0 when every difference is 0 and NaN with fewer than 2 pairs; ``ttest_p`` is NaN
        when a difference is infinite (the t statistic is undefined; the rank test still works).
    """
    first, second = _aligned(a, b)
    with np.errstate(invalid="ignore"):
        differences = np.where(first == second, 0.0, first - second)
    n = int(differences.size)
    result: dict[str, float | int] = {"n": n, "mean_difference": math.nan, "wilcoxon_p": math.nan,
                                      "ttest_p": math.nan, "cohens_dz": math.nan}
    if n == 0:
        return result
    result["mean_difference"] = float(np.mean(differences))
    if n < 2:
        return result
    result["cohens_dz"] = _effect_size(differences)
    if np.all(differences == 0.0):
        result["wilcoxon_p"] = result["ttest_p"] = 1.0
        return result
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # Small splits trigger scipy's precision and normal-approximation warnings; the p-values stand.
        warnings.simplefilter("ignore", RuntimeWarning)
        wilcoxon = scipy_stats.wilcoxon(differences, alternative="two-sided")
        result["wilcoxon_p"] = float(wilcoxon.pvalue)
        if np.all(np.isfinite(differences)):
            result["ttest_p"] = float(scipy_stats.ttest_rel(first, second, alternative="two-sided").pvalue)
    return result


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error over several comparisons; NaNs kept).

    Args:
        p_values: raw p-values, one per comparison.

    Returns:
        Adjusted p-values in the input order, each in [0, 1].
    """
    indexed = [(p, i) for i, p in enumerate(p_values) if not math.isnan(p)]
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(indexed)):
        running = max(running, min(1.0, (len(indexed) - rank) * p))
        adjusted[i] = running
    return adjusted


def method_table(rows_by_method: Mapping[str, Sequence[dict]], metrics: Sequence[str],
                 group_key: str = "region") -> list[dict]:
    """Per method and per group (and ``"all"``): n, mean, std and the bootstrap CI of each metric.

    Args:
        rows_by_method: method name -> per-case evaluation rows (``latent.evaluation.scoring`` rows).
        metrics: metric columns to summarise.
        group_key: row key that groups cases (the SynthRAD region by default).

    Returns:
        One dict per (method, group): ``{"method", group_key, "n", m, m_std, m_ci_low, m_ci_high}``
        for each metric ``m``; std as in :func:`latent.evaluation.scoring.summarise` (ddof=0).
    """
    table = []
    for method, rows in rows_by_method.items():
        rows = list(rows)
        if not rows:
            continue
        for entry in summarise(rows, group_key=group_key, columns=metrics):
            group = entry[group_key]
            members = [row for row in rows if group == "all" or str(row[group_key]) == group]
            out = {"method": method, group_key: group, "n": entry["n"]}
            for metric in metrics:
                values = [float(row[metric]) for row in members if row.get(metric) is not None]
                out[metric], out[f"{metric}_std"] = entry[metric], entry[f"{metric}_std"]
                out[f"{metric}_ci_low"], out[f"{metric}_ci_high"] = bootstrap_ci(values)
            table.append(out)
    return table


def _values_by_pid(rows: Sequence[dict], metric: str) -> dict[str, float]:
    """``pid -> metric`` of the rows that have the metric."""
    return {str(row["pid"]): float(row[metric]) for row in rows if row.get(metric) is not None}


def compare_to_best(rows_by_method: Mapping[str, Sequence[dict]], metric: str = "mae",
                    lower_is_better: bool = True) -> tuple[str | None, list[dict]]:
    """The best method by mean ``metric`` over all its cases, and every other method paired against it.

    Args:
        rows_by_method: method name -> per-case evaluation rows (each with ``pid``).
        metric: the metric that ranks the methods.
        lower_is_better: True for errors (MAE), False for similarities (PSNR, SSIM, Dice).

    Returns:
        ``(best name, comparisons)``: one dict per other method, ``{"method", "reference", "metric",
        **paired_tests(method, best)}`` on the cases both have, plus ``wilcoxon_p_holm`` (Holm
        adjusted over the comparisons). ``(None, [])`` when no method has a finite mean.
    """
    by_pid = {name: _values_by_pid(rows, metric) for name, rows in rows_by_method.items()}
    means = {}
    for name, values in by_pid.items():
        finite = [v for v in values.values() if not math.isnan(v)]
        if finite:
            means[name] = float(np.mean(finite))
    if not means:
        return None, []
    best = (min if lower_is_better else max)(means, key=lambda name: means[name])
    comparisons = [{"method": name, "reference": best, "metric": metric, **paired_tests(by_pid[name], by_pid[best])}
                   for name in rows_by_method if name != best]
    for comparison, adjusted in zip(comparisons, holm_adjust([c["wilcoxon_p"] for c in comparisons])):
        comparison["wilcoxon_p_holm"] = adjusted
    return best, comparisons


def pareto_front(points: Sequence[dict]) -> list[dict]:
    """The methods no other method beats on both MAE and inference time, among the choices.

    Args:
        points: ``{"name", "mae", "seconds_per_volume"}`` per method (lower is better for both),
            with ``"reference"`` (why: ``"sees the CT"``, ``"baseline"``) for a reference that is
            no choice (:data:`latent.app.bench.config.REFERENCES`): it neither joins nor bounds the front.

    Returns:
        The non-dominated points, fastest first; points with a NaN coordinate are left out.
    """
    valid = [p for p in points if not (p.get("reference") or math.isnan(float(p["mae"]))
                                       or math.isnan(float(p["seconds_per_volume"])))]

    def dominates(q: dict, p: dict) -> bool:
        no_worse = q["mae"] <= p["mae"] and q["seconds_per_volume"] <= p["seconds_per_volume"]
        return no_worse and (q["mae"] < p["mae"] or q["seconds_per_volume"] < p["seconds_per_volume"])

    front = [p for p in valid if not any(dominates(q, p) for q in valid if q is not p)]
    return sorted(front, key=lambda p: (p["seconds_per_volume"], p["mae"]))
