"""Two-stage training, for any family: a run starts from another run's weights (``init_from``).

The source is a training run (its ``best/``, the lowest validation error, else its ``final/``)
or a model folder, of the same family with tensors of the same names and shapes (the model
section's sizes must match; rates, loss weights and schedules may differ). A resumed run
starts from its checkpoint instead. ``producer.json`` records the folder the weights came from.
"""

from __future__ import annotations

import logging
from pathlib import Path

from latent.core.errors import BadConfigError
from latent.core.model_folder import check_state_fits, read_model_config, read_model_weights, trained_weights_folder
from latent.translate.models.base import TranslationModel

logger = logging.getLogger(__name__)


def init_from_run(model: TranslationModel, source: str) -> Path:
    """Load the weights of run (or model folder) ``source`` into ``model``; returns the folder read.

    Raises:
        BadConfigError: ``source`` is no run or model folder, or holds another family.
        WeightsError: a tensor is missing, unexpected or of another shape (one line naming the
            run and the first such tensor).
    """
    folder = trained_weights_folder(source, "init_from")
    family = read_model_config(folder).get("family")
    if family != model.family:
        raise BadConfigError(f"init_from: {folder} holds a {family!r} model; this run trains {model.family!r}")
    state = read_model_weights(folder)
    check_state_fits(state, model.state_dict(), f"init_from: {folder} does not fit this {model.family} model")
    own = model.state_dict()
    model.load_state_dict({key: value.to(own[key].dtype) for key, value in state.items()})
    logger.info("init_from: %d tensors from %s", len(state), folder)
    return folder
