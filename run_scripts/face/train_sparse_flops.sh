#!/usr/bin/env bash
# Sparse MobileFaceNet on MS1M: 1024-d ReLU embedding with the FLOPs regularizer (Paria et al. 2020).
#   NP=8 MS1M_DIR=/data/ms1m MODEL_DIR=runs/sparse_flops run_scripts/face/train_sparse_flops.sh [--set k=v ...]
# Hardware: NP GPUs, as run_scripts/face/train_dense.sh. The regularizer is per GPU by default, as
# in the original code; --set sparsity.cross_replica=true computes it over the global batch.
# Expected (paper): accuracy close to the dense baseline at about 10x fewer FLOPs per pair.
# Not run to completion in this repository.
set -euo pipefail
MODEL_DIR=${MODEL_DIR:-runs/sparse_flops} exec "$(dirname "$0")/train.sh" face/sparse_mobilefacenet_flops "$@"
