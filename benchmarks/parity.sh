#!/usr/bin/env bash
# Integer path vs reference path: same recipe, same seeds, final validation loss.
# Small text transformer (2 layers, width 128, 16×64 tokens per step), 3 epochs × 200
# steps, 1 thread each. Writes $OUT/<backend>-s<seed>/ (default benchmarks/results/parity;
# metrics only, kept apart from results/ so that `lowbit report` does not mix them with the
# study). A finished run (metrics of epoch 3 present) is not run again.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/parity}
for seed in 0 1 2; do
  for backend in auto reference; do
    out=$OUT/$backend-s$seed
    [ -f "$out/metrics.json" ] && grep -q '"epoch": 3' "$out/metrics.json" && continue
    python -m lowbit.cli train --task text --model gpt --recipe fqt-psq-8 --backend $backend \
      --epochs 3 --steps-per-epoch 200 --batch-size 16 --model-arg n_layer=2 \
      --model-arg n_embd=128 --model-arg block_size=64 --seed $seed --out $out \
      --threads 1 --no-progress
  done
done
