#!/usr/bin/env bash
# Integer path vs reference path: same recipe, same seeds, final validation loss.
# TASK=text (default): small text transformer (2 layers, width 128, 16×64 tokens per
# step), 3 epochs × 200 steps. TASK=fashion-mnist: PreAct-ResNet-20, batch 128, 3 epochs
# on an 8,000-image subset (63 steps each), evaluated on 2,000 test images — every
# convolution GEMM on its integer kernels (oneDNN, kernel-row ∇W) against the simulated
# float convolutions. 1 thread each. Writes $OUT/<backend>-s<seed>/ (default
# benchmarks/results/parity for text, benchmarks/results/parity-cnn for fashion-mnist;
# metrics only, kept apart from results/ so that `lowbit report` does not mix them with
# the study). A finished run (metrics of epoch 3 present) is not run again.
set -euo pipefail
cd "$(dirname "$0")/.."
TASK=${TASK:-text}
case $TASK in
  text)
    OUT=${OUT:-benchmarks/results/parity}
    ARGS=(--task text --model gpt --epochs 3 --steps-per-epoch 200 --batch-size 16
          --model-arg n_layer=2 --model-arg n_embd=128 --model-arg block_size=64) ;;
  fashion-mnist)
    OUT=${OUT:-benchmarks/results/parity-cnn}
    ARGS=(--task fashion-mnist --model preact-resnet20 --epochs 3 --subset 8000
          --eval-subset 2000) ;;
  *) echo "parity.sh: TASK must be text or fashion-mnist, got '$TASK'" >&2; exit 2 ;;
esac
for seed in 0 1 2; do
  for backend in auto reference; do
    out=$OUT/$backend-s$seed
    [ -f "$out/metrics.json" ] && grep -q '"epoch": 3' "$out/metrics.json" && continue
    python -m lowbit.cli train "${ARGS[@]}" --recipe fqt-psq-8 --backend $backend \
      --seed $seed --out $out --threads 1 --no-progress
  done
done
