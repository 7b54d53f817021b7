"""Translation model families, one per file; :func:`translate.models.base.model_class` finds them."""
