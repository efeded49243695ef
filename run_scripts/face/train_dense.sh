#!/usr/bin/env bash
# Dense MobileFaceNet baseline on MS1M: 512-d, ArcFace, no sparsity regularizer.
#   NP=8 MS1M_DIR=/data/ms1m MODEL_DIR=runs/dense_mfn run_scripts/face/train_dense.sh [--set k=v ...]
# Hardware: NP GPUs (one process each; HOSTS=host1:4,host2:4 for several hosts); the global batch
# train.batch_size is split over them (--set distributed.scale_lr=true makes it per GPU and
# scales the learning rate by NP). Expected: LFW ~99.5% as in the MobileFaceNet paper; the dense
# reference of the sparse recipes. Not run to completion in this repository.
set -euo pipefail
MODEL_DIR=${MODEL_DIR:-runs/dense_mfn} exec "$(dirname "$0")/train.sh" face/dense_mobilefacenet "$@"
