"""Why `latent register --method feature` does not recover the phantom's deformations: the optimiser or the features?

    python benchmarks/bench_feature_gap.py [--cases 10] [--feature-network DIR] [--note "idle machine"]

On the deformation cohort of ``bench_register.py`` (small phantoms, seed 0, each with a known smooth
deformation of about 1 mm), the feature fit of ``latent.core.registration.feature`` (default
settings, started from no motion, so that only the smooth fit is measured) runs on three kinds of
features and two pairings:

- **MR vs CT**: the method as shipped, the MR's features against the moved CT's;
- **true CT vs CT**: the same fit when the fixed image is the true, aligned CT: one modality, so the
  features agree wherever the anatomy does. What it reaches is the optimiser's own limit.

Feature kinds: the images themselves (each after the project's normalisation), the stand-in VAE's
first encoder level (the shipped default), and optionally the named layers of a segmentation
weights folder (``--feature-network``, e.g. from ``benchmarks/train_phantom_segmenter.py``). Per
row: the in-plane residual (mm, mean over the mask and the cases) before and after, the cases
improved, and for MR vs CT the floor (the in-plane motion found between the MR and the true CT,
where the right answer is none), and the median seconds of one fit (features computed once per
case and kind; the record at cb567cd also timed the fixed image's features). Writes
``benchmarks/results/<name>.{json,md}`` (default ``bench_feature_gap``) with the machine, its load
and the git revision.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "benchmarks" / "results"
PAIRINGS = ("MR vs CT", "true CT vs CT")


def feature_kinds(network_dir: Path | None) -> dict:
    """name -> function(image, modality, mask) giving (1, C, z, y, x) features."""
    import numpy as np
    import torch

    from latent.core.intensity import ct_to_vae, fit_mr_scaling, mr_to_unit
    from latent.core.registration.feature import feature_extractor, feature_maps, network_feature_maps
    from latent.core.segmentation_network import load_segmentation_network
    from latent.core.vae.loading import load_vae

    def normalised(image, modality, mask):
        return mr_to_unit(image, fit_mr_scaling(image, mask)) if modality == "mr" else ct_to_vae(image)

    def raw(image, modality, mask):
        return torch.from_numpy(np.ascontiguousarray(normalised(image, modality, mask), np.float32))[None, None]

    loaded = load_vae("standin")
    extractor = feature_extractor(loaded)
    kinds = {"images themselves": raw,
             "stand-in VAE, first level": lambda image, modality, mask: feature_maps(
                 extractor, normalised(image, modality, mask), loaded.layout)}
    if network_dir is not None:
        network = load_segmentation_network(network_dir)

        def segmentation(image, modality, mask):
            if modality == "mr":
                return network_feature_maps(network, network.intensity.from_unit(raw(image, modality, mask)[0, 0]))
            return network_feature_maps(network, network.intensity.from_hu(torch.from_numpy(np.ascontiguousarray(image, np.float32))))
        kinds[f"segmentation network {network_dir.name} ({', '.join(network.layers)})"] = segmentation
    return kinds


def in_plane(field, mask) -> float:
    """Mean in-plane length (mm) of a (3, z, y, x) field over the mask."""
    import numpy as np

    return float(np.linalg.norm(field[1:], axis=0)[mask > 0].mean())


def measure(cases: int, seed: int, network_dir: Path | None) -> list[dict]:
    """One row per feature kind and pairing."""
    from latent.core.phantom.generate import case_ids, case_rng, render_case
    from latent.core.registration.elastix import dilate_mask
    from latent.core.registration.feature import optimise_displacement
    from latent.core.registration.settings import FeatureSettings
    from latent.core.registration.truth import residual_motion

    settings = FeatureSettings(initial="identity")
    kinds = feature_kinds(network_dir)
    rows = {(kind, pairing): {"kind": kind, "pairing": pairing, "before": [], "after": [], "floor": [], "seconds": []}
            for kind in kinds for pairing in PAIRINGS}
    for region, pid in case_ids(cases, ["AB", "HN", "TH"]):
        case = render_case(pid, region, case_rng(seed, pid), "small", defects=("deformation",))
        spacing = tuple(float(s) for s in reversed(case.properties.spacing))
        region_mask = dilate_mask(case.mask, spacing)
        for kind, features in kinds.items():
            moving, truth = features(case.ct, "ct", case.mask), features(case.ct_true, "ct", case.mask)
            mr = features(case.mr, "mr", case.mask)
            for pairing, fixed in zip(PAIRINGS, (mr, truth)):
                row = rows[(kind, pairing)]
                started = time.perf_counter()
                field = optimise_displacement(fixed, moving, region_mask, spacing, settings)
                row["seconds"].append(time.perf_counter() - started)
                row["before"].append(in_plane(case.motion_mm, case.mask))
                row["after"].append(in_plane(residual_motion(field, case.motion_mm, spacing), case.mask))
                if pairing == PAIRINGS[0]:
                    row["floor"].append(in_plane(optimise_displacement(mr, truth, region_mask, spacing, settings),
                                                 case.mask))
    summary = []
    for row in rows.values():
        mean = lambda values: round(statistics.fmean(values), 3) if values else None  # noqa: E731
        summary.append({"kind": row["kind"], "pairing": row["pairing"], "in_plane_mm_before": mean(row["before"]),
                        "in_plane_mm_after": mean(row["after"]), "floor_in_plane_mm": mean(row["floor"]),
                        "improved": sum(a < b for a, b in zip(row["after"], row["before"])), "cases": len(row["before"]),
                        "median_seconds": round(statistics.median(row["seconds"]), 2),
                        "per_case_after": [round(v, 3) for v in row["after"]]})
    return summary


def markdown(record: dict) -> str:
    """The report."""
    lines = [f"<!-- {record['header']} -->", "# Feature registration: the optimiser or the features?", "",
             f"Deformation cohort of bench_register ({record['cases']} small phantoms, seed {record['seed']}); the feature "
             "fit with default settings from no motion (docs/registration.md). In-plane residual: mean length (mm) over "
             "the mask of the in-plane motion left against the true CT. Floor: the in-plane motion found between the MR "
             "and the true, aligned CT (right answer 0). 'true CT vs CT' replaces the MR by the true CT: one modality.", "",
             "| features | pairing | in-plane residual mm | improved | floor mm | median s / fit |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in record["rows"]:
        floor = row["floor_in_plane_mm"] if row["floor_in_plane_mm"] is not None else "-"
        lines.append(f"| {row['kind']} | {row['pairing']} | {row['in_plane_mm_before']} -> {row['in_plane_mm_after']} | "
                     f"{row['improved']} of {row['cases']} | {floor} | {row['median_seconds']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10, help="deformed phantoms")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (bench_register's)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--feature-network", type=Path, default=None, help="also a segmentation weights folder")
    parser.add_argument("--name", default="bench_feature_gap", help="file stem of the report")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the report goes")
    parser.add_argument("--note", default="", help="recorded with the results (machine state, purpose)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPOSITORY))
    import torch

    from latent.core.provenance import git_revision, machine_description

    torch.set_num_threads(args.threads)
    load_before, started = os.getloadavg(), time.perf_counter()
    rows = measure(args.cases, args.seed, args.feature_network)
    record = {"script": "benchmarks/bench_feature_gap.py", "git": git_revision(), "machine": machine_description(),
              "date": f"{datetime.now(timezone.utc):%Y-%m-%d}", "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "note": args.note, "cases": args.cases, "seed": args.seed,
              "feature_network": str(args.feature_network) if args.feature_network else None, "rows": rows,
              "wall_seconds": round(time.perf_counter() - started, 1)}
    record["header"] = (f"written by benchmarks/bench_feature_gap.py at git {record['git']}, {record['date']}, "
                        f"{record['machine']}, load average {load_before[0]:.2f} before / "
                        f"{record['load_average_after'][0]:.2f} after. {args.note}")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{args.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.results / f"{args.name}.md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
