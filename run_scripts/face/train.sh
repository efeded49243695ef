#!/usr/bin/env bash
# Shared by the face recipes: horovodrun over NP processes (one per GPU) of sparse_embed.train.
#   run_scripts/face/train.sh CONFIG [--set key=value ...]
# Environment (defaults in brackets):
#   NP [8]                 processes, one per GPU
#   HOSTS [localhost:$NP]  horovodrun -H, e.g. host1:4,host2:4 for two 4-GPU hosts
#   MS1M_DIR [data/ms1m]   holds tfrecords/train-* and tfrecords/labels.txt (python -m sparse_embed.preprocessing.build_tfrecords)
#   MODEL_DIR              output directory; re-running resumes, with any NP
#   PYTHON [python]        the interpreter with sparse_embed installed (e.g. .venv/bin/python)
#   HOROVODRUN [horovodrun next to $PYTHON, else on PATH]
#   HOROVODRUN_ARGS []     extra launcher flags, e.g. --gloo or --mpi-args="..."
set -euo pipefail
config=$1
shift
NP=${NP:-8}
HOSTS=${HOSTS:-localhost:$NP}
MS1M_DIR=${MS1M_DIR:-data/ms1m}
PYTHON=${PYTHON:-python}
: "${MODEL_DIR:?set MODEL_DIR to the run directory}"
default_launcher=$(dirname "$(command -v "$PYTHON")")/horovodrun
[ -x "$default_launcher" ] || default_launcher=horovodrun
HOROVODRUN=${HOROVODRUN:-$default_launcher}

# shellcheck disable=SC2086  # HOROVODRUN_ARGS is a list of flags
exec "$HOROVODRUN" -np "$NP" -H "$HOSTS" ${HOROVODRUN_ARGS:-} \
  "$PYTHON" -m sparse_embed.train --config="$config" \
  --data_dir="$MS1M_DIR" --model_dir="$MODEL_DIR" "$@"
