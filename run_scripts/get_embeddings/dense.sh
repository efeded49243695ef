#!/usr/bin/env bash
# Dense embeddings of run_scripts/face/train_dense.sh for the MegaFace/FaceScrub evaluation.
#   MODEL_DIR=runs/dense_mfn OUT_DIR=embeddings run_scripts/get_embeddings/dense.sh
# One GPU or CPU; writes embeddings/megaface_dense.hdf5 and embeddings/facescrub_dense.hdf5
# (1M distractors x 512 float32: about 2 GB). Variables: see run_scripts/get_embeddings/embed.sh.
set -euo pipefail
MODEL_DIR=${MODEL_DIR:-runs/dense_mfn} exec "$(dirname "$0")/embed.sh" dense "$@"
