#!/usr/bin/env bash
# Dense NIN on CIFAR-100: the same 64-d triplet recipe without a sparsity regularizer (the reference).
#   CIFAR_DIR=data/cifar100 MODEL_DIR=runs/cifar_dense run_scripts/cifar/train_dense.sh [--set k=v ...]
# Hardware and schedule as run_scripts/cifar/train_sparse_flops.sh; final activation none, no regularizer.
# Not run to completion in this repository.
set -euo pipefail
MODEL_DIR=${MODEL_DIR:-runs/cifar_dense} exec "$(dirname "$0")/train.sh" cifar/sparse_nin_triplet_flops \
  --set sparsity.type=none --set model.final_activation=none "$@"
