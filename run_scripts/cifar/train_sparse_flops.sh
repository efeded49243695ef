#!/usr/bin/env bash
# Sparse NIN on CIFAR-100: 64-d ReLU embedding, semi-hard triplet loss, FLOPs regularizer (weight 1e-3).
#   CIFAR_DIR=data/cifar100 MODEL_DIR=runs/cifar_flops run_scripts/cifar/train_sparse_flops.sh [--set k=v ...]
# Hardware: one GPU (NP=1), batch 512 as 64 classes x 8 images, Adam 1e-3, 50k steps, as the original.
# Expected (paper): retrieval precision close to the dense embedding at far fewer FLOPs per query.
# Not run to completion in this repository.
set -euo pipefail
MODEL_DIR=${MODEL_DIR:-runs/cifar_flops} exec "$(dirname "$0")/train.sh" cifar/sparse_nin_triplet_flops "$@"
