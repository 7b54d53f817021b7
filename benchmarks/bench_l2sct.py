"""The l2sct ablation on the demo's data: what the exact VAE decoder, fine-tuning it, starting
the translator from l2l_regress and the adapted decoder each give, at one CPU budget per variant.

    python benchmarks/bench_l2sct.py [--work bench_l2sct] [--seconds 120] [--note "idle machine"]
    python benchmarks/bench_l2sct.py --long 600 --work bench_l2sct_long   # l2sct at 600 s in all, adapt 600 s
    python benchmarks/bench_l2sct.py --long 600 --long-adapt-seconds 200 --long-from-adapted \
        --work bench_l2sct_long_adapted   # 600 s in all: adapt 200 s + l2l_regress 75 s + l2sct 325 s
    python benchmarks/bench_l2sct.py --long 600 --long-set model.mr_head=true --name bench_l2sct_long_mr_head

Same phantoms, split, grid and shipped stand-in VAE as ``latent demo`` (built afresh under
``--work``; ``--name`` names the record). Rows: the VAE floor, frozen and through the adapted decoder (``latent vae adapt``,
300 s, its recipe's budget); ``l2l_regress`` (75 s, the demo's budget) decoded both ways; and
``l2sct`` with (1) a decoder from scratch, (2) the exact decoder frozen, (3) the exact decoder
fine-tuned, (4) = (3) with the translator started from that ``l2l_regress`` run (the demo's
recipe), (5) = (4) with the residual head on the MR pixels, (6) = (4) without the EMA of the
weights (the recipe's ``train.ema_decay``; every other row keeps it), (7) = (4) with the decoder
started from the adapted one. Seconds include the runs a
row starts from. Each is scored on the test split on the native grid from the raw MR files,
with the per-tissue errors. Writes
``benchmarks/results/bench_l2sct.{json,md}`` with the machine, its load and the git revision.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "benchmarks" / "results"
RECIPE = "l2sct_demo.yaml"
#: Variant -> overrides of the demo recipe. The trunk-from-scratch variants use the lr of the
#: earlier demo recipe (5e-4); the started one the demo's (2e-4, 10 warmup steps).
VARIANTS = {
    "l2sct_scratch_decoder": ["model.decoder=scratch", "model.decoder_channels=[8,16,32]", "model.init_trunk_from=null",
                              "model.lr=5e-4", "train.warmup_steps=0"],
    "l2sct_exact_frozen": ["model.decoder_freeze_steps=1000000000", "model.init_trunk_from=null", "model.lr=5e-4",
                           "train.warmup_steps=0"],
    "l2sct_exact_tuned": ["model.init_trunk_from=null", "model.lr=5e-4", "train.warmup_steps=0"],
    "l2sct_exact_tuned_from_regress": [],
    "l2sct_exact_tuned_from_regress_mr_head": ["model.mr_head=true"],
    "l2sct_exact_tuned_from_regress_no_ema": ["train.ema_decay=null"],
}
#: The demo recipe with its decoder started from the adapted decoder (latent vae adapt).
ADAPTED_VARIANT = "l2sct_exact_tuned_from_regress_and_adapted"
COLUMNS = ("mae", "psnr", "ms_ssim", "bone_dice", "mae_soft", "mae_bone", "mae_above_1000", "bias_bone")


def summary(row: dict) -> dict:
    """The columns this report keeps from a demo comparison row."""
    return {"method": row["method"], **{c: row.get(c) for c in COLUMNS}, "train_seconds": row["train_seconds"],
            "seconds_per_volume": row["seconds_per_volume"], "parameters": row["parameters"]}


def run(work: Path, seconds: float, regress_seconds: float = 75.0, adapt_seconds: float = 300.0) -> list[dict]:
    """Build the demo's data and cache under ``work``, train and score every row."""
    from latent.app.demo import DemoConfig, comparison_rows, prepare_data, vae_and_encode
    from latent.app.methods import predict_method, train_method, vae_floor_result
    from latent.core.recipes import RECIPES_DIR

    config = DemoConfig()
    data, splits = prepare_data(work, config)
    test = splits["test"]
    vae_spec, cache_path, _ = vae_and_encode(data, work, config)
    adapted, adapt_seconds = train_method("decoder_adapt", RECIPES_DIR / "decoder_adapt_demo.yaml", work, adapt_seconds)
    results = [vae_floor_result(data, work, vae_spec, cache_path, test, 0.0),
               vae_floor_result(data, work, vae_spec, cache_path, test, adapt_seconds, adapted, "vae_floor_adapted")]
    regress_dir, regress_seconds = train_method("l2l_regress", RECIPES_DIR / "l2l_regress_demo.yaml", work, regress_seconds)
    results.append(predict_method("l2l_regress", regress_dir, data, work, test, regress_seconds, vae_spec=vae_spec))
    results.append(predict_method("l2l_regress_adapted", regress_dir, data, work, test, regress_seconds + adapt_seconds,
                                  vae_spec=vae_spec, decoder=adapted))
    variants = {**VARIANTS, ADAPTED_VARIANT: [f"model.init_decoder_from={adapted}"]}
    for name, overrides in variants.items():
        starts = [] if "model.init_trunk_from=null" in overrides else [f"model.init_trunk_from={regress_dir}"]
        run_dir, train_seconds = train_method(name, RECIPES_DIR / RECIPE, work, seconds, [*overrides, *starts])
        train_seconds += (regress_seconds if starts else 0.0) + (adapt_seconds if name == ADAPTED_VARIANT else 0.0)
        results.append(predict_method(name, run_dir, data, work, test, train_seconds, vae_spec=vae_spec))
        print(f"{name}: {summary(comparison_rows(results[-1:])[0])}", flush=True)
    return [summary(row) for row in comparison_rows(results)]


def run_long(work: Path, total_seconds: float, regress_seconds: float = 75.0, adapt_seconds: float = 600.0,
             from_adapted: bool = False, overrides: tuple[str, ...] = ()) -> list[dict]:
    """The demo's l2sct recipe at a longer total budget (its l2l_regress start included), beside the
    VAE floor, frozen and adapted for ``adapt_seconds``: the comparison with the recorded 600 s rows
    of the phantom study (same data and split). ``from_adapted``: the l2sct decoder starts from that
    adapted decoder, whose seconds count in the total too. ``overrides``: recipe overrides of the
    l2sct run (``model.mr_head=true``); the row's name then ends in ``_variant``."""
    from latent.app.demo import DemoConfig, comparison_rows, prepare_data, vae_and_encode
    from latent.app.methods import predict_method, train_method, vae_floor_result
    from latent.core.recipes import RECIPES_DIR

    data, splits = prepare_data(work, DemoConfig())
    test = splits["test"]
    vae_spec, cache_path, _ = vae_and_encode(data, work, DemoConfig())
    adapted, adapt_seconds = train_method("decoder_adapt", RECIPES_DIR / "decoder_adapt_demo.yaml", work, adapt_seconds)
    results = [vae_floor_result(data, work, vae_spec, cache_path, test, 0.0),
               vae_floor_result(data, work, vae_spec, cache_path, test, adapt_seconds, adapted, "vae_floor_adapted")]
    regress_dir, regress_seconds = train_method("l2l_regress", RECIPES_DIR / "l2l_regress_demo.yaml", work, regress_seconds)
    name = (f"l2sct_{total_seconds:.0f}s" + ("_from_adapted" if from_adapted else "")
            + ("_variant" if overrides else ""))
    starts = [f"model.init_trunk_from={regress_dir}"] + ([f"model.init_decoder_from={adapted}"] if from_adapted else [])
    spent = regress_seconds + (adapt_seconds if from_adapted else 0.0)
    run_dir, seconds = train_method(name, RECIPES_DIR / RECIPE, work, total_seconds - spent, [*overrides, *starts])
    results.append(predict_method(name, run_dir, data, work, test, seconds + spent, vae_spec=vae_spec))
    return [summary(row) for row in comparison_rows(results)]


def markdown(rows: list[dict], header: str) -> str:
    """The ablation table."""
    names = ["method", "MAE", "PSNR", "MS-SSIM", "bone Dice", "MAE soft", "MAE bone 250-1000", "MAE > 1000",
             "bias bone", "train s", "s/volume"]
    lines = [header, "", "| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for row in rows:
        cells = [f"{row[c]:.3f}" if c in ("ms_ssim", "bone_dice") else f"{row[c]:.1f}" for c in COLUMNS]
        lines.append(f"| {row['method']} | " + " | ".join(cells)
                     + f" | {row['train_seconds']:.0f} | {row['seconds_per_volume']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench_l2sct"), help="scratch folder (data, cache, runs)")
    parser.add_argument("--seconds", type=float, default=120.0, help="CPU training seconds per l2sct variant")
    parser.add_argument("--regress-seconds", type=float, default=75.0, help="l2l_regress budget (the demo's)")
    parser.add_argument("--adapt-seconds", type=float, default=300.0, help="latent vae adapt budget (its recipe's)")
    parser.add_argument("--long", type=float, default=None, metavar="SECONDS",
                        help="instead of the ablation: the demo's l2sct at this total budget (bench_l2sct_long.*)")
    parser.add_argument("--long-adapt-seconds", type=float, default=600.0, help="with --long: latent vae adapt budget")
    parser.add_argument("--long-from-adapted", action="store_true",
                        help="with --long: l2sct's decoder starts from that adapted one, within the same total "
                             "(bench_l2sct_long_adapted.*)")
    parser.add_argument("--long-set", action="append", default=[], metavar="KEY=VALUE",
                        help="with --long: an override of the l2sct recipe (repeatable), e.g. model.mr_head=true")
    parser.add_argument("--name", default=None,
                        help="file name of the record without suffix (default: bench_l2sct, bench_l2sct_long or "
                             "bench_l2sct_long_adapted; another name keeps a record of another CPU kind beside it)")
    parser.add_argument("--note", default="", help="recorded with the results (machine state, purpose)")
    args = parser.parse_args()
    if args.long_set and args.long is None:
        parser.error("--long-set: only with --long (the ablation's variants are fixed)")
    sys.path.insert(0, str(REPOSITORY))
    from latent.core.provenance import git_revision, machine_description

    load_before = os.getloadavg()
    started = time.perf_counter()
    if args.long is not None:
        rows = run_long(args.work.resolve(), args.long, args.regress_seconds, args.long_adapt_seconds,
                        args.long_from_adapted, tuple(args.long_set))
    else:
        rows = run(args.work.resolve(), args.seconds, args.regress_seconds, args.adapt_seconds)
    stem = args.name or ("bench_l2sct" if args.long is None
                         else "bench_l2sct_long" + ("_adapted" if args.long_from_adapted else ""))
    record = {"script": "benchmarks/bench_l2sct.py", "git": git_revision(), "machine": machine_description(),
              "date": f"{datetime.now(timezone.utc):%Y-%m-%d}", "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "seconds_per_variant": args.seconds,
              "regress_seconds": args.regress_seconds, "adapt_seconds": args.adapt_seconds, "long_seconds": args.long,
              "long_adapt_seconds": args.long_adapt_seconds if args.long is not None else None,
              "long_from_adapted": args.long_from_adapted, "long_overrides": args.long_set,
              "wall_seconds": time.perf_counter() - started, "note": args.note, "variants": VARIANTS, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    header = (f"<!-- written by benchmarks/bench_l2sct.py at git {record['git']}, {record['date']}, {record['machine']}, "
              f"load average {load_before[0]:.2f} before / {record['load_average_after'][0]:.2f} after; "
              + (f"{args.seconds:.0f} s per l2sct variant" if args.long is None else
                 f"l2sct at {args.long:.0f} s in all ({args.regress_seconds:.0f} s of them its l2l_regress start"
                 + (f", {args.long_adapt_seconds:.0f} s its adapted decoder" if args.long_from_adapted else "") + ")"
                 + (f"; l2sct overrides {' '.join(args.long_set)}" if args.long_set else ""))
              + f". {args.note} -->\n"
              + ("# l2sct ablation" if args.long is None else "# l2sct at a longer budget")
              + " (demo phantoms, test split, native grid, HU)")
    (RESULTS / f"{stem}.md").write_text(markdown(rows, header))
    print(markdown(rows, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
