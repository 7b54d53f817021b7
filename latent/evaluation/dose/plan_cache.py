"""Plan cache: a plan optimised on a patient's CT is stored once and reused for every sCT.

Each entry is keyed by a SHA-256 over everything the plan depends on: the planning CT on the
dose grid (HU bytes), the grid, the body and structure masks, the plan-relevant protocol fields
of the modality, the pyRadPlan version and this cache's schema. A different CT, structure set,
dose grid, beam template or engine version gives another key, so a stale plan is never reused;
the full key is stored in the entry and checked on load. An entry appears under its final
name only once complete (written to a temporary folder, then renamed).

Entry layout: ``<root>/<pid>/<mode>-<key[:16]>/{plan.json, stf.pkl, weights.npy, reference_dose.npy}``.
``stf.pkl`` is pyRadPlan's beam geometry pickled (it has no other serialised form); it is only
ever read by the pyRadPlan version named in the key. Unpickling runs code, so a pickle is
loaded only when its HMAC-SHA256 under this user's secret key (:func:`signing_key`, a file
outside the cache) matches the one recorded at write time: an entry copied from elsewhere, or
altered, is ignored with a warning and the plan is optimised again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import pickle
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

from latent.evaluation.dose.planning import PlanningInputs, TreatmentPlan
from latent.evaluation.dose.protocol import DoseProtocol

#: Bump when the entry layout or the meaning of a stored array changes.
CACHE_SCHEMA = 1
#: Environment variable that moves the default cache.
CACHE_ENV = "LATENT_DOSE_PLAN_CACHE"
#: Environment variable that moves the signing key file.
KEY_ENV = "LATENT_DOSE_PLAN_KEY"

logger = logging.getLogger(__name__)


def signing_key() -> bytes:
    """This user's secret for plan pickles: ``$LATENT_DOSE_PLAN_KEY`` or
    ``~/.config/latent-sct/plan-cache.key``, created (mode 0600) on first use."""
    configured = os.environ.get(KEY_ENV)
    path = Path(configured) if configured else Path.home() / ".config" / "latent-sct" / "plan-cache.key"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_bytes(secrets.token_bytes(32))
        os.chmod(temporary, 0o600)
        try:
            os.link(temporary, path)  # never replaces a key another process created meanwhile
        except FileExistsError:
            pass
        finally:
            temporary.unlink(missing_ok=True)
    return path.read_bytes()


def _signature(data: bytes, key: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def default_cache_dir() -> Path:
    """``$LATENT_DOSE_PLAN_CACHE`` or ``~/.cache/latent-sct/dose-plans``: shared by all prediction folders."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "latent-sct" / "dose-plans"


def _engine_version() -> str:
    try:
        return metadata.version("pyRadPlan")
    except metadata.PackageNotFoundError:
        return "unknown"


def plan_key(mode: str, inputs: PlanningInputs, protocol: DoseProtocol) -> str:
    """SHA-256 identifying the plan of ``mode`` for these planning inputs and protocol."""
    digest = hashlib.sha256()
    header = {
        "schema": CACHE_SCHEMA,
        "mode": mode,
        "protocol": protocol.plan_fingerprint(mode),
        "engine": _engine_version(),
        "grid": inputs.grid.to_dict(),
        "structures": [(s.name, s.kind) for s in inputs.structures],
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(inputs.hu, dtype=np.float32).tobytes())
    region = inputs.body if inputs.dose_region is None else inputs.dose_region
    for mask in [inputs.body, region, *(s.mask for s in inputs.structures)]:
        digest.update(np.packbits(mask).tobytes())
    return digest.hexdigest()


class PlanCache:
    """Folder of optimised plans, addressed by patient, modality and :func:`plan_key`."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()

    def entry(self, pid: str, mode: str, key: str) -> Path:
        """Folder of one plan."""
        return self.root / pid / f"{mode}-{key[:16]}"

    def load(self, pid: str, mode: str, key: str) -> TreatmentPlan | None:
        """The cached plan, or None when absent, incomplete or made for another key."""
        folder = self.entry(pid, mode, key)
        try:
            record = json.loads((folder / "plan.json").read_text())
            if record.get("key") != key:
                return None
            data = (folder / "stf.pkl").read_bytes()
            if not hmac.compare_digest(str(record.get("stf_hmac", "")), _signature(data, signing_key())):
                logger.warning("%s: plan not signed by this user's key (copied or altered); optimising it again",
                               folder / "stf.pkl")
                return None
            stf = pickle.loads(data)
            weights = np.load(folder / "weights.npy")
            reference = np.load(folder / "reference_dose.npy")
        except (OSError, ValueError, pickle.UnpicklingError, EOFError, AttributeError, ImportError):
            return None
        return TreatmentPlan(mode, stf, weights, reference, record.get("info", {}))

    def save(self, pid: str, mode: str, key: str, plan: TreatmentPlan) -> Path:
        """Store ``plan`` atomically; a concurrent writer of the same key wins harmlessly."""
        folder = self.entry(pid, mode, key)
        folder.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            data = pickle.dumps(plan.stf, protocol=pickle.HIGHEST_PROTOCOL)
            (temporary / "stf.pkl").write_bytes(data)
            np.save(temporary / "weights.npy", plan.weights)
            np.save(temporary / "reference_dose.npy", plan.reference_dose)
            record = {"key": key, "pid": pid, "mode": mode, "engine": _engine_version(), "info": plan.info,
                      "stf_hmac": _signature(data, signing_key())}
            (temporary / "plan.json").write_text(json.dumps(record, indent=2, default=float) + "\n")
            if folder.exists():
                shutil.rmtree(folder)  # an incomplete or outdated entry of the same key prefix
            os.replace(temporary, folder)
        except OSError:
            if folder.exists() and (folder / "plan.json").exists():
                return folder  # someone else stored it first
            raise
        finally:
            if temporary.exists():
                shutil.rmtree(temporary, ignore_errors=True)
        return folder
