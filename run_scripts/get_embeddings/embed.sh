#!/usr/bin/env bash
# Shared by the embedding recipes: MegaFace distractors and FaceScrub probes of one trained run to HDF5.
#   run_scripts/get_embeddings/embed.sh SUFFIX [extra sparse_embed.embed flags]
# Writes $OUT_DIR/megaface_$SUFFIX.hdf5 and $OUT_DIR/facescrub_$SUFFIX.hdf5 (datasets embedding,
# label, filename), the names the MegaFace evaluation looks for.
# Environment (defaults in brackets):
#   MODEL_DIR                      the run directory written by sparse_embed.train
#   MEGAFACE_IMAGES [data/megaface/distractors]   aligned distractor images, one folder per identity
#   FACESCRUB_IMAGES [data/megaface/facescrub]    aligned probe images, one folder per identity
#   OUT_DIR [embeddings]
#   FLIP [sum]                     flip test-time augmentation: none | sum | concat
#   PYTHON [python]
set -euo pipefail
suffix=$1
shift
: "${MODEL_DIR:?set MODEL_DIR to the run directory}"
MEGAFACE_IMAGES=${MEGAFACE_IMAGES:-data/megaface/distractors}
FACESCRUB_IMAGES=${FACESCRUB_IMAGES:-data/megaface/facescrub}
OUT_DIR=${OUT_DIR:-embeddings}
FLIP=${FLIP:-sum}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT_DIR"
for set_name in megaface facescrub; do
  if [ "$set_name" = megaface ]; then images=$MEGAFACE_IMAGES; else images=$FACESCRUB_IMAGES; fi
  echo "== $set_name: $images -> $OUT_DIR/${set_name}_$suffix.hdf5"
  "$PYTHON" -m sparse_embed.embed --model_dir="$MODEL_DIR" --images="$images" \
    --output="$OUT_DIR/${set_name}_$suffix.hdf5" --flip="$FLIP" "$@"
done
