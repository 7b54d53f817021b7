"""Imported once by the recalculation pool's fork server, so every worker forks with pyRadPlan loaded."""

from latent.evaluation.dose.extra import load_pyradplan

load_pyradplan(quiet=True)
