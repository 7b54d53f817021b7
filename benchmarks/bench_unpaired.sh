#!/usr/bin/env bash
# The unpaired baselines (CycleGAN, CUT) with a longer budget than the phantom study, on its data,
# cache and split: does more training take them past the water and bulk baselines, and how do
# their validation curves run? Writes benchmarks/results/bench_unpaired/ (bench_budget.sh).
#
#   bash benchmarks/bench_unpaired.sh [SECONDS] ["note"]    (after benchmarks/bench_phantom.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash benchmarks/bench_budget.sh bench_unpaired water,bulk,cyclegan,cut "${1:-600}" "${2:-}"
