#!/usr/bin/env bash
# Sparse MobileFaceNet on MS1M with the L1 regularizer: the paper's baseline for the FLOPs regularizer.
#   NP=8 MS1M_DIR=/data/ms1m MODEL_DIR=runs/sparse_l1 run_scripts/face/train_sparse_l1.sh [--set k=v ...]
# Hardware: NP GPUs, as run_scripts/face/train_dense.sh. Expected (paper): at the same accuracy,
# more FLOPs per pair than the FLOPs regularizer, because L1 does not spread the non-zeros evenly
# over the dimensions. Not run to completion in this repository.
set -euo pipefail
MODEL_DIR=${MODEL_DIR:-runs/sparse_l1} exec "$(dirname "$0")/train.sh" face/sparse_mobilefacenet_l1 "$@"
