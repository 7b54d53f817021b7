"""Latent cache: zarr v3 store of VAE posterior means and canonical-grid volumes per case.

One store per data set, one group per producer (VAE weights, VAE config, canonical grid,
normalisation, schema version), atomic per-case writes, latent statistics, and a PyTorch
dataset that reads it. The dataset names load torch on first use only, so tools that just
read or write the store (and writer subprocesses) start quickly.
"""

from latent.cache.producer import (
    CACHE_SCHEMA_VERSION,
    canonical_json,
    producer_key,
    producer_record,
    sha256_file,
)
from latent.cache.store import (
    ARRAY_KEYS,
    CacheError,
    CaseExistsError,
    CaseNotFoundError,
    LatentCache,
    ProducerNotFoundError,
    latent_statistics,
    list_producers,
    pick_producer,
)

_DATASET_NAMES = ("LatentPairDataset", "destandardise", "read_split", "standardise")

__all__ = [
    "ARRAY_KEYS",
    "CACHE_SCHEMA_VERSION",
    "CacheError",
    "CaseExistsError",
    "CaseNotFoundError",
    "LatentCache",
    "ProducerNotFoundError",
    "canonical_json",
    "latent_statistics",
    "list_producers",
    "pick_producer",
    "producer_key",
    "producer_record",
    "sha256_file",
    *_DATASET_NAMES,
]


def __getattr__(name: str):
    if name in _DATASET_NAMES:
        from latent.cache import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'cache' has no attribute {name!r}")
