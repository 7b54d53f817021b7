"""``latent tune``: hyperparameter search over a recipe with Optuna (TPE, pruning, fANOVA), each trial
one run of the project's training loop; application layer, it wires training and validation
(docs/tune.md). Modules: ``space`` (the search space file), ``study`` (storage, resume, counting),
``trial`` (one trial), ``outputs`` (tune.csv / tune.json / best recipe), ``report`` (tune.html),
``run`` (the command)."""
