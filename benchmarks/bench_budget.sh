#!/usr/bin/env bash
# Chosen methods with a longer CPU budget than the phantom study, on its data, cache and split:
# does more training change their order, and how do their validation curves run? Writes
# benchmarks/results/<NAME>/ through `latent bench` (runs and predictions under $WORK/<NAME>/).
#
#   bash benchmarks/bench_budget.sh NAME METHODS [SECONDS] ["note"]   (after benchmarks/bench_phantom.sh)
#   bash benchmarks/bench_budget.sh bench_regress3d water,bulk,regress3d,pix2pix 600
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
    echo "usage: bash benchmarks/bench_budget.sh NAME METHODS [SECONDS] [\"note\"]" >&2
    exit 2
fi
NAME=$1
METHODS=$2
SECONDS_PER_METHOD=${3:-600}
NOTE=${4:-""}
WORK=${WORK:-bench_run}
LATENT=${LATENT:-.venv/bin/latent}
OUT=benchmarks/results/$NAME
if [ ! -d "$WORK/cache.zarr" ] || [ ! -f "$WORK/work/splits.json" ]; then
    echo "error: $WORK: no cache.zarr or work/splits.json; run benchmarks/bench_phantom.sh first" >&2
    exit 2
fi
rm -rf "$OUT" "${WORK:?}/$NAME"
"$LATENT" bench --data "$WORK/data" --cache "$WORK/cache.zarr" --split-file "$WORK/work/splits.json" \
    --methods "$METHODS" --seconds "$SECONDS_PER_METHOD" \
    --runs "$WORK/$NAME/runs" --work "$WORK/$NAME/work" --out "$OUT" \
    --note "${METHODS} with a longer budget (bash benchmarks/bench_budget.sh ${NAME}): the phantom study's data, cache and split, ${SECONDS_PER_METHOD} s of wall-clock CPU training each. ${NOTE}"
