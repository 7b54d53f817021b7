"""What ``latent tune`` writes from a study: ``tune.csv`` (every trial), the fANOVA importances,
``best_recipe.yaml`` (a recipe ``latent train --config`` accepts as is) and ``tune.json``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from latent.app.tune.space import SearchSpace, cell, with_values
from latent.app.tune.study import best_trial
from latent.core.atomic import write_text_atomic
from latent.evaluation.scoring import write_rows_csv

#: fANOVA needs this many complete trials before its importances mean anything.
MIN_FANOVA_TRIALS = 4
BEST_RECIPE = "best_recipe.yaml"


def trial_rows(study: optuna.Study, space: SearchSpace) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, one column per searched field, seconds, reason."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        labels = {name: d.labels() for name, d in space.root.items() if d.type == "categorical"}
        params = {name: labels.get(name, {}).get(value, value) for name, value in trial.params.items()}
        rows.append({"number": trial.number, "state": trial.state.name,
                     "value": trial.value if trial.state == TrialState.COMPLETE else None,
                     **{name: cell(params.get(name)) for name in space.root},
                     "seconds": trial.user_attrs.get("seconds"), "reason": trial.user_attrs.get("reason", ""),
                     "run_dir": trial.user_attrs.get("run_dir", "")})
    return rows


def importances(study: optuna.Study) -> tuple[dict[str, float], str]:
    """fANOVA importances (Optuna's evaluator, seeded) of the complete trials, or ``({}, why not)``."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < MIN_FANOVA_TRIALS:
        return {}, (f"fANOVA importances need at least {MIN_FANOVA_TRIALS} complete trials; "
                    f"the study has {len(complete)}")
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    try:
        found = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (ValueError, RuntimeError) as error:
        return {}, f"fANOVA importances could not be computed ({error})"
    return {name: float(value) for name, value in found.items()}, ""


def best_recipe(raw: dict[str, Any], space: SearchSpace, trial: optuna.trial.FrozenTrial, out: Path) -> dict[str, Any]:
    """The recipe with the best trial's values and its own run folder ``<out>/best_run``."""
    values = {name: space.root[name].labels().get(value, value) if space.root[name].type == "categorical" else value
              for name, value in trial.params.items() if name in space.root}
    return with_values(raw, {**values, "run_dir": str(Path(out) / "best_run")})


def write_best_recipe(path: Path, recipe: dict[str, Any], trial: optuna.trial.FrozenTrial, study_name: str) -> Path:
    """The best recipe as YAML with a comment naming the study and the trial."""
    header = (f"# Written by latent tune: trial {trial.number} of study {study_name!r}, "
              f"native-grid validation MAE {trial.value:.2f} HU.\n# Train it: latent train --config {path}\n")
    return write_text_atomic(path, header + yaml.safe_dump(recipe, sort_keys=False))


def summary(study: optuna.Study, rows: list[dict[str, Any]], found: dict[str, float], note: str,
            settings: dict[str, Any]) -> dict[str, Any]:
    """``tune.json``: settings, counts by state, the best trial, importances, every trial."""
    best = best_trial(study)
    counts = {state.name: sum(1 for row in rows if row["state"] == state.name) for state in TrialState}
    return {"study": study.study_name, "settings": settings, "counts": {k: v for k, v in counts.items() if v},
            "best": None if best is None else {"number": best.number, "value": best.value,
                                               "params": next(r for r in rows if r["number"] == best.number)},
            "importances": found, "importances_note": note, "trials": rows}


def write_json(path: Path, record: dict[str, Any]) -> Path:
    """JSON with NaN written as null (a value that never came)."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return write_text_atomic(path, json.dumps(clean(record), indent=2, default=str) + "\n")


def write_outputs(study: optuna.Study, raw: dict[str, Any], space: SearchSpace, out: Path,
                  settings: dict[str, Any]) -> dict[str, Path]:
    """Write ``tune.csv``, ``tune.json``, ``tune.html`` and (when a trial completed) ``best_recipe.yaml``."""
    from latent.app.tune.report import write_html

    rows = trial_rows(study, space)
    found, note = importances(study)
    written = {"csv": write_rows_csv(rows, out / "tune.csv") if rows else None}
    best = best_trial(study)
    if best is not None:
        written["recipe"] = write_best_recipe(out / BEST_RECIPE, best_recipe(raw, space, best, out), best,
                                              study.study_name)
    record = summary(study, rows, found, note, settings)
    written["json"] = write_json(out / "tune.json", record)
    intermediate = {t.number: dict(t.intermediate_values) for t in study.get_trials(deepcopy=False)
                    if t.intermediate_values}
    written["html"] = write_html(out / "tune.html", record, space, intermediate)
    return {key: path for key, path in written.items() if path is not None}
