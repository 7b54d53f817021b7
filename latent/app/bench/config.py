"""What ``latent bench`` compares and with which budget: the typed config and the method catalogue."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from latent.core.errors import BadConfigError


def learned_methods() -> list[str]:
    """The trained families the bench compares: every family that translates MR into CT (its class
    says so), each with a shipped recipe ``<family>_<size>.yaml`` (``--size demo|full``)."""
    from latent.translate.models.base import translating_families  # torch: only when the bench needs it

    return translating_families()


def samples_per_case(family: str, samples: int) -> int:
    """``samples`` for a family whose translation is stochastic (mean + ``<pid>_std.mha``), else 1."""
    from latent.translate.models.base import model_class

    return samples if model_class(family).stochastic else 1


def known_methods() -> list[str]:
    """Every method name ``--methods`` accepts (learned variants aside)."""
    return [*BASELINES, *ORACLES, VAE_FLOOR, *learned_methods()]

#: Baselines without a model or a cache.
BASELINES = ("water", "bulk")
#: The grid round trips of the true CT (need the cache's grid): full range and VAE window.
ORACLES = ("grid_floor", "grid_floor_vae")
#: decode(encode(CT)) through the cache's VAE.
VAE_FLOOR = "vae_floor"
#: References, not choices, with the reason: the oracles and the VAE floor see the test CT, and the
#: baselines (no model) are the floors every method must beat. The Pareto plot draws them as
#: labelled lines and its front runs over the other methods, which see only the MR.
REFERENCES: dict[str, str] = {**{name: "baseline" for name in BASELINES},
                              **{name: "sees the CT" for name in (*ORACLES, VAE_FLOOR)}}
#: The DDIM step sweep runs on this family's trained run.
SWEPT = "l2l_ddim"
#: Variants of a learned family, appended to its name: ``+tta`` (flip test-time augmentation) and
#: ``+ensK`` (K fold runs, ``data.fold=k/K``, averaged in HU), e.g. ``regress3d+ens3+tta``.
VARIANT_HELP = "a learned family with +tta and/or +ensK (K >= 2), e.g. regress3d+tta, l2sct+ens3+tta"
#: What ``latent bench`` runs when ``--methods`` is not given.
DEFAULT_METHODS = ("water", "bulk", "grid_floor", "grid_floor_vae", "vae_floor", "l2sct", "l2l_regress", "l2l_ddim",
                   "regress3d", "pix2pix", "unetpp25d")
RECIPE_SIZES = ("demo", "full")


@dataclass(frozen=True)
class Variant:
    """A learned family predicted with flip TTA and/or as an ensemble of K fold runs (K = 1: one run)."""

    family: str
    tta: bool = False
    folds: int = 1


def parse_variant(name: str) -> Variant | None:
    """The :class:`Variant` of ``family[+tta][+ensK]`` (None when ``name`` is no such variant)."""
    family, *suffixes = name.split("+")
    if not suffixes or family not in learned_methods() or len(set(suffixes)) != len(suffixes):
        return None
    tta, folds = False, 1
    for suffix in suffixes:
        if suffix == "tta":
            tta = True
        elif suffix.startswith("ens") and suffix[3:].isdigit() and int(suffix[3:]) >= 2:
            folds = int(suffix[3:])
        else:
            return None
    return Variant(family, tta, folds)


def parse_methods(text: str) -> tuple[str, ...]:
    """Comma-separated method names from :func:`known_methods` or learned variants (order kept,
    duplicates dropped).

    Raises:
        BadConfigError: naming ``--methods`` and the unknown names.
    """
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in known_methods() and parse_variant(name) is None]
    if unknown or not names:
        raise BadConfigError(f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}; "
                             f"known: {', '.join(known_methods())}, or {VARIANT_HELP}")
    return names


def parse_steps(text: str) -> tuple[int, ...]:
    """Comma-separated DDIM step counts (positive integers); empty text gives no sweep.

    Raises:
        BadConfigError: naming ``--ddim-steps``.
    """
    try:
        steps = tuple(int(value) for value in text.split(",") if value.strip())
    except ValueError:
        raise BadConfigError(f"--ddim-steps: {text!r} is not a comma-separated list of integers") from None
    if any(value < 1 for value in steps):
        raise BadConfigError(f"--ddim-steps: {text!r}: every step count must be at least 1")
    return steps


def parse_recipes(pairs: list[str]) -> dict[str, str]:
    """``METHOD=RECIPE`` pairs (a recipe file or a shipped recipe's name) for learned methods.

    Raises:
        BadConfigError: naming ``--recipe`` and the malformed pair or the method that trains nothing.
    """
    recipes = {}
    for pair in pairs:
        method, separator, recipe = pair.partition("=")
        if not separator or not recipe.strip():
            raise BadConfigError(f"--recipe {pair!r}: expected METHOD=RECIPE, e.g. l2sct=configs/l2sct_demo.yaml")
        if method.strip() not in learned_methods():
            raise BadConfigError(f"--recipe {pair!r}: {method!r} is not a trained method "
                                 f"({', '.join(learned_methods())})")
        recipes[method.strip()] = recipe.strip()
    return recipes


@dataclass
class BenchConfig:
    """One benchmark: the data, the cache, the methods and their budgets.

    Attributes:
        data: SynthRAD-layout data set root.
        cache: latent cache (built with ``vae`` and ``grid`` when missing and a method needs it).
        out: report folder (``report.md``, ``report.html``, ``results.{json,csv}``, ``figures/``).
        methods: names from :func:`known_methods`, in report order.
        split_file: split JSON; default: a stratified split of ``data`` (seed 0) written to the work folder.
        runs: training-run folder: ``<runs>/<method>`` is reused when complete, trained otherwise.
        work: predictions, scores and panels (default ``<out>/work``); ``runs`` defaults to ``<work>/runs``.
        seconds: training budget (wall-clock seconds) of each learned method that is trained here.
        size: recipe size, ``demo`` or ``full`` (``<family>_<size>.yaml``).
        recipes: per-method recipe replacing the shipped one.
        overrides: dotted ``key=value`` changes applied to every recipe trained here.
        ddim_steps: DDIM step counts predicted with the trained ``l2l_ddim`` run (step curve).
        samples: samples per case of the diffusion families (> 1 writes the std map).
        vae: VAE spec to build a missing cache and score the VAE floor (default: the cache's).
        grid: canonical grid of a cache built here.
        experiments: experiment counts the cache's one-time cost is amortised over.
        note: free text at the head of the report (the machine's load, say).
        quiet: no progress bars.
    """

    data: Path
    cache: Path
    out: Path
    methods: tuple[str, ...] = DEFAULT_METHODS
    split_file: Path | None = None
    runs: Path | None = None
    work: Path | None = None
    seconds: float = 120.0
    size: str = "demo"
    recipes: dict[str, str] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()
    ddim_steps: tuple[int, ...] = (5, 10, 25)
    samples: int = 2
    vae: str | None = None
    grid: str = "auto"
    experiments: tuple[int, ...] = (1, 5, 20)
    note: str = ""
    quiet: bool = False

    def __post_init__(self) -> None:
        self.data, self.cache, self.out = Path(self.data), Path(self.cache), Path(self.out)
        self.methods = parse_methods(",".join(self.methods))
        if self.size not in RECIPE_SIZES:
            raise BadConfigError(f"--size {self.size!r}: expected one of {', '.join(RECIPE_SIZES)}")
        if not self.seconds > 0:
            raise BadConfigError(f"--seconds {self.seconds}: the training budget must be positive")
        if self.samples < 1:
            raise BadConfigError(f"--samples {self.samples}: at least 1")
        if not self.data.is_dir():
            raise BadConfigError(f"--data {self.data}: not a folder")
        self.work = Path(self.work) if self.work is not None else self.out / "work"
        self.runs = Path(self.runs) if self.runs is not None else self.work / "runs"

    def recipe(self, method: str) -> str:
        """The recipe ``method`` trains with: the given one, else the shipped ``<method>_<size>``."""
        return self.recipes.get(method, f"{method}_{self.size}")

    @property
    def needs_cache(self) -> bool:
        """True when some method reads the latent cache (oracles read its grid)."""
        return any(name not in BASELINES for name in self.methods)
