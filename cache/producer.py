"""Provenance of cached latents: the producer record, its key, and file hashing.

A producer is everything that decides what a cached latent means: the VAE weights (by
SHA-256), the VAE config, the canonical grid, the intensity normalisation and the cache
schema version. Its key is a short hash of the canonical JSON of that record; latents
with different keys live in different groups of the store and are never mixed.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

from latent.core.hashing import sha256_file

#: Bump when the on-disk layout or the meaning of a stored array changes; old groups then
#: get a different producer key and are never read as if they were new ones.
CACHE_SCHEMA_VERSION = 1

#: Hex characters of the SHA-256 kept in a producer key (64 bits: collisions are not a
#: practical concern for the handful of producers one store holds).
PRODUCER_KEY_LENGTH = 16

#: vae_info entries that say where the weights came from, not what they compute: kept in
#: the record for the reader, left out of the key (the same bytes from another path or
#: hub revision are the same producer). Every other entry (config, class, layout, ...) is hashed.
VAE_LOCATION_KEYS = ("name", "path", "weights_path", "filename", "repo_id", "revision", "cache_dir", "url")

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def is_sha256(value: Any) -> bool:
    """True when ``value`` is a lower-case 64-character hex SHA-256 digest."""
    return isinstance(value, str) and _SHA256_RE.match(value) is not None


def canonical_value(value: Any, where: str = "record", *, for_key: bool = True) -> Any:
    """Return ``value`` as plain JSON types (lists, dicts, str, int, float, bool, None).

    Tuples become lists and numpy scalars and arrays become Python numbers and lists. With
    ``for_key`` (the spelling that is hashed) a float with an integral value becomes an int
    (a spacing of ``1.0`` and ``1`` is the same grid and must give the same key) and NaN/inf
    are refused; without it floats are kept as they are (case attributes).

    Raises:
        TypeError / ValueError naming the offending entry (non-string dict keys, objects
        JSON cannot hold, non-finite numbers in a key).
    """
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: dict key {key!r} is not a string")
            out[key] = canonical_value(item, f"{where}.{key}", for_key=for_key)
        return out
    if isinstance(value, (list, tuple)):
        return [canonical_value(item, f"{where}[{i}]", for_key=for_key) for i, item in enumerate(value)]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy types
        return canonical_value(value.tolist(), where, for_key=for_key)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not for_key:
            return float(value)
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value} is not a finite number")
        return int(value) if value.is_integer() else value
    raise TypeError(f"{where}: {type(value).__name__} is not JSON data")


def canonical_json(value: Any) -> str:
    """Compact JSON with sorted keys of :func:`canonical_value` (the hashed spelling)."""
    return json.dumps(
        canonical_value(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True
    )


def producer_record(
    vae_info: dict,
    grid: dict,
    normalisation: dict,
    schema_version: int = CACHE_SCHEMA_VERSION,
) -> dict:
    """Build the producer record that identifies how latents were made.

    Args:
        vae_info: must hold ``weights_sha256`` (hex SHA-256 of the weights file) and
            ``config`` (the VAE constructor config); other entries (class name, layout,
            name) are hashed too, except the :data:`VAE_LOCATION_KEYS` (where the file
            was found), which are kept under ``vae_location`` but not hashed.
        grid: the canonical grid record (spacing, shape, orientation, ...).
        normalisation: the intensity normalisation record for MR and CT.
        schema_version: cache layout version.

    Returns:
        ``{"producer_key", "schema_version", "vae_weights_sha256", "vae_config",
        "vae_other", "grid", "normalisation", "vae_location"}`` as plain JSON values
        (floats stay floats); the key hashes their canonical spelling.

    Raises:
        ValueError / TypeError naming the entry that is missing or not JSON data.
    """
    if not isinstance(vae_info, dict):
        raise TypeError(f"vae_info must be a dict, got {type(vae_info).__name__}")
    missing = [name for name in ("weights_sha256", "config") if name not in vae_info]
    if missing:
        raise ValueError(f"vae_info lacks {missing}; it has {sorted(vae_info)}")
    if not is_sha256(vae_info["weights_sha256"]):
        raise ValueError(
            f"vae_info.weights_sha256 must be 64 lower-case hex characters, "
            f"got {vae_info['weights_sha256']!r}"
        )
    for name, value in (("vae_info.config", vae_info["config"]), ("grid", grid),
                        ("normalisation", normalisation)):
        if not isinstance(value, dict):
            raise TypeError(f"{name} must be a dict, got {type(value).__name__}")
    other = {k: v for k, v in vae_info.items()
             if k not in ("weights_sha256", "config", *VAE_LOCATION_KEYS)}
    location = {k: v for k, v in vae_info.items() if k in VAE_LOCATION_KEYS}
    hashed = {
        "schema_version": int(schema_version),
        "vae_weights_sha256": vae_info["weights_sha256"],
        "vae_config": canonical_value(vae_info["config"], "vae_info.config", for_key=False),
        "vae_other": canonical_value(other, "vae_info", for_key=False),
        "grid": canonical_value(grid, "grid", for_key=False),
        "normalisation": canonical_value(normalisation, "normalisation", for_key=False),
    }
    return {
        "producer_key": _key_of(hashed),
        **hashed,
        "vae_location": canonical_value(location, "vae_info", for_key=False),
    }


def producer_key(
    vae_info: dict,
    grid: dict,
    normalisation: dict,
    schema_version: int = CACHE_SCHEMA_VERSION,
) -> str:
    """Short stable key (first 16 hex chars of a SHA-256) of :func:`producer_record`."""
    return producer_record(vae_info, grid, normalisation, schema_version)["producer_key"]


def key_of_record(record: dict) -> str:
    """Recompute the key of a stored producer record (detects edited or foreign records)."""
    missing = [name for name in _HASHED_FIELDS if name not in record]
    if missing:
        raise ValueError(f"producer record lacks {missing}; it has {sorted(record)}")
    return _key_of({name: record[name] for name in _HASHED_FIELDS})


_HASHED_FIELDS = ("schema_version", "vae_weights_sha256", "vae_config", "vae_other", "grid",
                  "normalisation")


def _key_of(hashed: dict) -> str:
    # canonical_json canonicalises: 1.0 == 1, tuple == list, key order irrelevant, no NaN
    return hashlib.sha256(canonical_json(hashed).encode("ascii")).hexdigest()[:PRODUCER_KEY_LENGTH]
