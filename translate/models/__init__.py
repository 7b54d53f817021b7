"""Translation model families, one per file; :func:`latent.translate.models.base.model_class` finds them."""
