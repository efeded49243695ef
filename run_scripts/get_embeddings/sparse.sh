#!/usr/bin/env bash
# Sparse embeddings of run_scripts/face/train_sparse_flops.sh (or _l1) for the MegaFace/FaceScrub evaluation.
#   MODEL_DIR=runs/sparse_flops OUT_DIR=embeddings run_scripts/get_embeddings/sparse.sh
# One GPU or CPU; writes embeddings/megaface_sparse.hdf5 and embeddings/facescrub_sparse.hdf5,
# ready for `python -m sparse_embed.search hdf5-to-bin` and `make runmegaface`.
# Variables: see run_scripts/get_embeddings/embed.sh.
set -euo pipefail
MODEL_DIR=${MODEL_DIR:-runs/sparse_flops} exec "$(dirname "$0")/embed.sh" sparse "$@"
