#!/usr/bin/env bash
# LFW verification of a TFLite model on the device (MLPerf edge protocol), no TensorFlow needed there.
#   run_scripts/edge/inference_lfw.sh [extra sparse_embed.edge.lfw flags, e.g. --output=results.json]
# Prints accuracy and the pre-process / inference / post-process seconds, ms per inference.
# Raw LFW images are detected and aligned with MTCNN's three .tflite networks, written beforehand
# (where TensorFlow is installed) by
#   python -m sparse_embed.faces.mtcnn_tflite --output=models/mtcnn
# and copied to the device with the model; the device needs numpy, opencv-python and ai-edge-litert.
# Environment (defaults in brackets):
#   MODEL [models/model.tflite]   the embedding model (sparse_embed.export --format=tflite)
#   PAIRS [data/lfw/pairs.txt]    LFW-format pairs file
#   LFW_DIR [data/lfw/images]     image root, one folder per identity
#   MTCNN_DIR [models/mtcnn]      pnet/rnet/onet.tflite, for raw images
#   ALIGNED [0]                   1: LFW_DIR holds aligned crops already (MTCNN_DIR unused)
#   FIRST [600]                   pairs evaluated, from the top of PAIRS (MLPerf: 600; all: 0)
#   THREADS [all cores]           interpreter threads
#   PYTHON [python]               an interpreter with sparse_embed, numpy, opencv and ai-edge-litert
set -euo pipefail
MODEL=${MODEL:-models/model.tflite}
PAIRS=${PAIRS:-data/lfw/pairs.txt}
LFW_DIR=${LFW_DIR:-data/lfw/images}
MTCNN_DIR=${MTCNN_DIR:-models/mtcnn}
ALIGNED=${ALIGNED:-0}
FIRST=${FIRST:-600}
THREADS=${THREADS:-$(nproc)}
PYTHON=${PYTHON:-python}

if [ "$ALIGNED" = 1 ]; then source_flag=--aligned; else source_flag=--align=$MTCNN_DIR; fi
first_flag=()
if [ "$FIRST" != 0 ]; then first_flag=(--first="$FIRST"); fi
exec "$PYTHON" -m sparse_embed.edge.lfw --model="$MODEL" --pairs="$PAIRS" --images="$LFW_DIR" \
  "$source_flag" "${first_flag[@]}" --num_threads="$THREADS" "$@"
