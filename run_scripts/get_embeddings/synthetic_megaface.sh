#!/usr/bin/env bash
# A MegaFace-style identification set from the synthetic generator, embedded by a dense and a sparse run.
#   run_scripts/get_embeddings/synthetic_megaface.sh
#   python -m sparse_embed.evaluate identification --embeddings_dir=data/megaface_synth/embeddings \
#       --sparse_suffix=sparse.hdf5 --dense_suffix=dense.hdf5 --score_threshold=0.25 --rerank_topk=1000
# CPU is enough: on 2 cores the default 100k distractors take 2 min to render (15 min on a busy
# machine) and about 2 min per run to embed. Both sets are new identities (seeds other than the demo's training
# seed 0): DISTRACTORS images of DISTRACTORS / 2 identities (two each, the generator's minimum)
# and PROBES identities of PROBE_IMAGES images each, rendered at the model's input size.
# Writes $ROOT/embeddings/{megaface,facescrub}_{dense,sparse}.hdf5, the names
# `evaluate identification --embeddings_dir` looks for.
# Environment (defaults in brackets):
#   ROOT [data/megaface_synth]
#   DENSE_RUN [runs/demo/dense]  SPARSE_RUN [runs/demo/sparse]
#   DISTRACTORS [100000]  PROBES [200]  PROBE_IMAGES [5]  IMAGE_SIZE [48]  WORKERS [2]
#   PYTHON [python]
set -euo pipefail
ROOT=${ROOT:-data/megaface_synth}
DENSE_RUN=${DENSE_RUN:-runs/demo/dense}
SPARSE_RUN=${SPARSE_RUN:-runs/demo/sparse}
DISTRACTORS=${DISTRACTORS:-100000}
PROBES=${PROBES:-200}
PROBE_IMAGES=${PROBE_IMAGES:-5}
IMAGE_SIZE=${IMAGE_SIZE:-48}
WORKERS=${WORKERS:-2}
PYTHON=${PYTHON:-python}
here=$(dirname "$0")

if [ ! -d "$ROOT/distractors/train" ]; then
  # The generator wants a held-out part (at least 2 identities); it is not used.
  "$PYTHON" -m sparse_embed.data.synthetic --output="$ROOT/distractors" --seed=2 \
    --identities=$((DISTRACTORS / 2)) --images_per_identity=2 --test_identities=2 --image_size="$IMAGE_SIZE" \
    --workers="$WORKERS" --pairs_folds=1 --pairs_per_fold=1
fi
if [ ! -d "$ROOT/probes/test" ]; then
  "$PYTHON" -m sparse_embed.data.synthetic --output="$ROOT/probes" --seed=1 \
    --identities=2 --images_per_identity="$PROBE_IMAGES" --test_identities="$PROBES" --image_size="$IMAGE_SIZE" \
    --workers="$WORKERS" --pairs_folds=1 --pairs_per_fold=1
fi
export MEGAFACE_IMAGES=$ROOT/distractors/train FACESCRUB_IMAGES=$ROOT/probes/test
export OUT_DIR=$ROOT/embeddings PYTHON
MODEL_DIR=$DENSE_RUN "$here/embed.sh" dense
MODEL_DIR=$SPARSE_RUN "$here/embed.sh" sparse
