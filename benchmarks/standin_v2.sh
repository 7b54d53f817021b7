#!/usr/bin/env bash
# Train the stand-in VAE v2 (latent/configs/vae_standin_v2.yaml) within one command's wall-clock
# limit, resumably: on a GPU node, repeat the same call until it reports the last step.
#
#   bash benchmarks/standin_v2.sh OUT [SECONDS] [recipe override ...]
#
# Writes the shipped stand-in's phantom set (seed 9001) and split under OUT when they are absent,
# then trains OUT/vae for SECONDS (default 480) of its loop, with a checkpoint every minute; a
# second call continues from the latest checkpoint. CASES (default 60) sizes the phantom set;
# LATENT names the CLI (default: latent). Then compare its floor with the shipped one:
#   python benchmarks/ship_standin_vae.py --run OUT ...   (only if it is lower)
set -euo pipefail
OUT=${1:?usage: bash benchmarks/standin_v2.sh OUT [SECONDS] [recipe override ...]}
BUDGET=${2:-480}
shift $(( $# >= 2 ? 2 : 1 ))
CASES=${CASES:-60}
LATENT=${LATENT:-latent}
if [ ! -f "$OUT/splits.json" ]; then
  if [ ! -d "$OUT/data" ]; then
    rm -rf "$OUT/data.partial"  # left by an interrupted call: never read, written afresh
    $LATENT phantom --out "$OUT/data.partial" --cases "$CASES" --seed 9001
    mv "$OUT/data.partial" "$OUT/data"
  fi
  $LATENT split --data "$OUT/data" --out "$OUT/splits.json" --val 0.25 --test 0.0
fi
RESUME=()
if [ -d "$OUT/vae/checkpoints" ] && [ -n "$(ls -A "$OUT/vae/checkpoints")" ]; then RESUME=(--resume); fi
$LATENT train --config vae_standin_v2 data.root="$OUT/data" data.split_file="$OUT/splits.json" \
  run_dir="$OUT/vae" train.max_seconds="$BUDGET" "${RESUME[@]}" "$@"
