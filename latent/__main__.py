"""``python -m latent ...``: the ``latent`` command (what ``translate/train.py`` hands over to)."""

from latent.app.cli import main

main()
