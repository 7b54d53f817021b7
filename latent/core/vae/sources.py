"""Where VAE weights come from: the released MAISI weights on the Hugging Face hub (pinned
revision and SHA-256) and the small VAEs that ship inside the package (pinned SHA-256)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from latent.core.hashing import sha256_file
from latent.core.vae.network import LAYOUT_MAISI, MAISI_CONFIG, VAEError


@dataclass(frozen=True)
class HubWeights:
    """One released VAE on the Hugging Face hub, pinned by revision and content hash."""

    repo_id: str
    filename: str
    revision: str
    sha256: str
    license: str
    class_name: str = "AutoencoderKlMaisi"
    config: Mapping[str, Any] = field(default_factory=lambda: dict(MAISI_CONFIG))
    layout: str = LAYOUT_MAISI


#: The registry of released weights. Read-only: a caller (or a test) that needs another entry
#: passes its own mapping to ``load_vae(..., registry=...)`` instead of mutating this one.
HUB_VAES: Mapping[str, HubWeights] = MappingProxyType(
    {
        "maisi-ct": HubWeights(
            repo_id="nvidia/NV-Generate-CT",
            filename="models/autoencoder_v1.pt",
            # Commit hash quoted (with this file's sha256) in a public project that pins it; it
            # could not be confirmed against the hub from this offline machine. The sha256 below
            # is what guarantees the content whatever the revision resolves to.
            revision="a481248bbd6462129efb2a3514e142bb95f87b25",
            sha256="1f8a7a056d0ebc00486edc43c26768bf1c12eaa6df9dd172e34598003be95eb3",
            license="NVIDIA Open Model License",
        ),
        "maisi-mr": HubWeights(
            repo_id="nvidia/NV-Generate-MR",
            filename="models/autoencoder_v2.pt",
            # No commit hash of this repository could be found offline, so the branch is pinned;
            # the sha256 check refuses any content other than the released file.
            revision="main",
            sha256="b5ed556dc64872cae11ebe67cc33e84fbd05ebdf7e35e40c74d956404e7c1ef0",
            license="NVIDIA non-commercial license",
        ),
    }
)


@dataclass(frozen=True)
class ShippedVAE:
    """A small pretrained VAE that ships inside the package, pinned by the SHA-256 of its two files."""

    folder: str
    weights_sha256: str
    config_sha256: str


#: Folder of the shipped weights inside the package.
SHIPPED_ROOT = Path(__file__).resolve().parents[2] / "weights"


#: Shipped VAEs by ``--vae`` name. ``standin``: the demo's frozen stand-in for MAISI, trained
#: once on phantoms of a seed no test or demo uses (latent/weights/standin_vae/PROVENANCE.md).
SHIPPED_VAES: Mapping[str, ShippedVAE] = MappingProxyType(
    {
        "standin": ShippedVAE(
            folder="standin_vae",
            weights_sha256="fd436c2efe6a489e51a24b4ac82e61773db74baddb130c5318a5a7bba26eefdb",
            config_sha256="2ca658cced5f48491b5ac49b55e2e4f8da1027ca6f5a9b84a1715070fddaca0f",
        ),
    }
)


def _offline_mode() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    import huggingface_hub.constants as hub_constants

    value = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return value in {"1", "ON", "YES", "TRUE"} or bool(hub_constants.HF_HUB_OFFLINE)


def _fetch_hub_weights(name: str, entry: HubWeights, cache_dir: str | None) -> Path:
    """Path of the hub file: the local hub cache first, then (unless ``HF_HUB_OFFLINE``) one
    quick request to the hub, then the download; any failure becomes one VAEError that says what
    to do. The hub client's own retries (about a minute of them) never run."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache

    cached = try_to_load_from_cache(entry.repo_id, entry.filename, cache_dir=cache_dir, revision=entry.revision)
    if isinstance(cached, str):
        return Path(cached)
    where = cache_dir or "the default hub cache (HF_HUB_CACHE)"
    advice = (f"on a connected machine run `hf download {entry.repo_id} {entry.filename} --revision "
              f"{entry.revision}` (older clients: `huggingface-cli download ...`) and copy the hub cache "
              f"here, or pass --vae /path/to/{Path(entry.filename).name}")
    if _offline_mode():
        raise VAEError(f"VAE weights {name!r} ({entry.repo_id}/{entry.filename}@{entry.revision}) are not in "
                       f"{where} and HF_HUB_OFFLINE is set; {advice}")
    try:
        get_hf_file_metadata(hf_hub_url(entry.repo_id, entry.filename, revision=entry.revision), timeout=10)
        path = hf_hub_download(repo_id=entry.repo_id, filename=entry.filename, revision=entry.revision,
                               cache_dir=cache_dir)
    except Exception as exc:  # no network, DNS, proxy, HTTP status: the hub client raises many kinds
        raise VAEError(
            f"VAE weights {name!r} ({entry.repo_id}/{entry.filename}@{entry.revision}) are not in "
            f"{where} and could not be downloaded ({type(exc).__name__}); {advice}"
        ) from exc
    return Path(path)


def _check_sha256(path: Path, expected: str) -> str:
    actual = sha256_file(path)
    if actual != expected:
        raise VAEError(
            f"SHA-256 mismatch for {path}: expected {expected}, got {actual}; delete the cached copy "
            f"({path.resolve()}) so it is downloaded again, or point --vae at a local copy of the released file"
        )
    return actual
