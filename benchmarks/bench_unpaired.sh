#!/usr/bin/env bash
# The unpaired baselines (CycleGAN, CUT) with a longer budget than the phantom study, on its data,
# cache and split: does more training take them past the water and bulk baselines, and how do
# their validation curves run? Writes benchmarks/results/bench_unpaired/ through `latent bench`.
#
#   bash benchmarks/bench_unpaired.sh [SECONDS] ["note"]    (after benchmarks/bench_phantom.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_METHOD=${1:-600}
NOTE=${2:-""}
WORK=${WORK:-bench_run}
LATENT=${LATENT:-.venv/bin/latent}
OUT=benchmarks/results/bench_unpaired
if [ ! -d "$WORK/cache.zarr" ] || [ ! -f "$WORK/work/splits.json" ]; then
    echo "error: $WORK: no cache.zarr or work/splits.json; run benchmarks/bench_phantom.sh first" >&2
    exit 2
fi
rm -rf "$OUT" "$WORK/unpaired"
"$LATENT" bench --data "$WORK/data" --cache "$WORK/cache.zarr" --split-file "$WORK/work/splits.json" \
    --methods water,bulk,cyclegan,cut --seconds "$SECONDS_PER_METHOD" \
    --runs "$WORK/unpaired/runs" --work "$WORK/unpaired/work" --out "$OUT" \
    --note "Unpaired baselines (bash benchmarks/bench_unpaired.sh): the phantom study's data, cache and split, ${SECONDS_PER_METHOD} s of wall-clock CPU training each. ${NOTE}"
