#!/usr/bin/env bash
# Shared by the CIFAR-100 recipes: sparse_embed.train on one process, or horovodrun over NP.
#   run_scripts/cifar/train.sh CONFIG [--set key=value ...]
# Environment (defaults in brackets):
#   NP [1]                 processes; above 1, horovodrun -np NP (one per GPU)
#   CIFAR_DIR [data/cifar100]  holds tfrecords/train-* and labels.txt (python -m sparse_embed.preprocessing.build_cifar_tfrecords)
#   MODEL_DIR              output directory; re-running resumes
#   PYTHON [python]        the interpreter with sparse_embed installed (e.g. .venv/bin/python)
#   HOROVODRUN [horovodrun next to $PYTHON, else on PATH]
#   HOROVODRUN_ARGS []     extra launcher flags, e.g. --gloo
set -euo pipefail
config=$1
shift
NP=${NP:-1}
CIFAR_DIR=${CIFAR_DIR:-data/cifar100}
PYTHON=${PYTHON:-python}
: "${MODEL_DIR:?set MODEL_DIR to the run directory}"
train=("$PYTHON" -m sparse_embed.train --config="$config" --data_dir="$CIFAR_DIR" --model_dir="$MODEL_DIR" "$@")
if [ "$NP" = 1 ]; then
  exec "${train[@]}"
fi
default_launcher=$(dirname "$(command -v "$PYTHON")")/horovodrun
[ -x "$default_launcher" ] || default_launcher=horovodrun
HOROVODRUN=${HOROVODRUN:-$default_launcher}
# shellcheck disable=SC2086  # HOROVODRUN_ARGS is a list of flags
exec "$HOROVODRUN" -np "$NP" -H "localhost:$NP" ${HOROVODRUN_ARGS:-} "${train[@]}"
