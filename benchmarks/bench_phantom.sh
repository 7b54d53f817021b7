#!/usr/bin/env bash
# The full phantom study: `latent bench` over every method on the demo's phantom set (30 cases,
# seed 0, the demo's stratified split), the shipped stand-in VAE, the demo grid and one CPU
# training budget per learned method. Writes benchmarks/results/bench_phantom/ (report.md,
# report.html, results.json, results.csv, figures/); runs, predictions and scores go to $WORK.
#
#   bash benchmarks/bench_phantom.sh "note on the machine's load" [SECONDS]
#
# RETRAIN=regress3d (a family name) keeps $WORK and retrains only that family's runs (its
# folds too) with the shipped recipe; every other complete run is reused as recorded (its
# training seconds and memory are read back) and every method is predicted and scored again.
set -euo pipefail
cd "$(dirname "$0")/.."
NOTE=${1:-""}
SECONDS_PER_METHOD=${2:-120}
WORK=${WORK:-bench_run}
LATENT=${LATENT:-.venv/bin/latent}
OUT=benchmarks/results/bench_phantom
METHODS=water,bulk,grid_floor,grid_floor_vae,vae_floor,l2sct,l2sct+tta,l2l_regress,l2l_regress+tta,l2l_regress+ens3,l2l_ddim,l2l_controlnet,regress3d,regress3d+tta,regress3d+ens3,pix2pix,pix2pix+tta,cyclegan,cut

if [ -n "${RETRAIN:-}" ]; then
    rm -rf "$WORK/work/runs/$RETRAIN" "$WORK/work/runs/${RETRAIN}"_fold* "$OUT"
    NOTE="$NOTE Partial rerun (RETRAIN=$RETRAIN): only $RETRAIN was retrained; the other runs are the recorded ones."
else
    rm -rf "$WORK" "$OUT"
    "$LATENT" phantom --out "$WORK/data" --cases 30 --regions AB,HN,TH --seed 0
fi
"$LATENT" bench --data "$WORK/data" --cache "$WORK/cache.zarr" --vae standin --grid 3x3x5:32x128x128 \
    --methods "$METHODS" --seconds "$SECONDS_PER_METHOD" --ddim-steps 5,10,25 --samples 2 \
    --work "$WORK/work" --out "$OUT" \
    --note "Phantom study (bash benchmarks/bench_phantom.sh): 30 phantom cases (seed 0), the shipped stand-in VAE, grid 3x3x5:32x128x128, ${SECONDS_PER_METHOD} s of wall-clock CPU training per learned method (the ControlNet as much again for its prior). ${NOTE}"
