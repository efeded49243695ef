#!/usr/bin/env bash
# Sparse NIN on CIFAR-100 with the L1 regularizer (weight 1e-3): the paper's baseline for FLOPs.
#   CIFAR_DIR=data/cifar100 MODEL_DIR=runs/cifar_l1 run_scripts/cifar/train_sparse_l1.sh [--set k=v ...]
# Hardware and schedule as run_scripts/cifar/train_sparse_flops.sh; only the regularizer differs.
# Expected (paper): at equal FLOPs per query, lower precision than FLOPs (non-zeros pile up on few
# dimensions). Not run to completion in this repository.
set -euo pipefail
MODEL_DIR=${MODEL_DIR:-runs/cifar_l1} exec "$(dirname "$0")/train.sh" cifar/sparse_nin_triplet_flops \
  --set sparsity.type=l1 "$@"
