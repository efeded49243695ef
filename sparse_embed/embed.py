"""Export embeddings of a trained model to HDF5 (`embedding`, `label`, `filename`).

    python -m sparse_embed.embed --model_dir=runs/sparse_mfn --images=data/lfw --output=lfw.hdf5
    python -m sparse_embed.embed --model_dir=runs/sparse_mfn --tfrecords='data/val-*' --output=val.hdf5
    python -m sparse_embed.embed --model_dir=runs/sparse_mfn --pairs=data/pairs.txt \
        --pairs_images=data/lfw --output=pairs.hdf5 --flip=concat
    python -m sparse_embed.embed --model_dir=runs/sparse_mfn --manifest=data/megaface/megaface.tsv \
        --output=megaface_sparse_mfn.hdf5
"""

from __future__ import annotations

from absl import app, flags

from sparse_embed.cli import user_errors_exit
from sparse_embed.errors import ConfigError, DataError

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Directory written by sparse_embed.train.")
_OUTPUT = flags.DEFINE_string("output", None, "HDF5 file to write.")
_IMAGES = flags.DEFINE_string("images", None, "Image folder tree, one subfolder per identity.")
_TFRECORDS = flags.DEFINE_string("tfrecords", None, "Glob of TFRecord shards.")
_PAIRS = flags.DEFINE_string("pairs", None, "Verification pairs file (LFW format).")
_PAIRS_IMAGES = flags.DEFINE_string("pairs_images", None, "Image root of --pairs.")
_MANIFEST = flags.DEFINE_string("manifest", None,
                                "Image manifest TSV (preprocessing/prepare_megaface.py); "
                                "labels are its identity labels.")
_FLIP = flags.DEFINE_enum("flip", None, ["none", "sum", "concat"],
                          "Flip test-time augmentation; default: the run's eval.flip.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Images per batch; default: eval.batch_size.")


@user_errors_exit
def main(argv: list[str]) -> None:
    """Builds the input, embeds it and writes the HDF5 file."""
    del argv
    sources = [s for s in (_IMAGES.value, _TFRECORDS.value, _PAIRS.value, _MANIFEST.value) if s]
    if not _MODEL_DIR.value or not _OUTPUT.value or len(sources) != 1:
        raise ConfigError("need --model_dir, --output and exactly one of --images, --tfrecords, "
                          "--pairs, --manifest")
    from sparse_embed.config import config_from_model_dir
    from sparse_embed.data import verification
    from sparse_embed.data.megaface import read_manifest

    config_from_model_dir(_MODEL_DIR.value)
    manifest = read_manifest(_MANIFEST.value) if _MANIFEST.value else None
    pair_paths = None
    if _PAIRS.value:
        if not _PAIRS_IMAGES.value:
            raise ConfigError("--pairs needs --pairs_images (the image root it refers to)")
        pair_paths, _, _ = verification.unique_images(
            verification.read_pairs(_PAIRS.value, _PAIRS_IMAGES.value))
    # TensorFlow is imported only once the inputs are known to be usable.
    from sparse_embed.data import format_summary, pipeline, tfrecord
    from sparse_embed.data.embeddings import write_hdf5
    from sparse_embed.inference import embed_dataset, load_backbone

    backbone, config = load_backbone(_MODEL_DIR.value)
    batch = _BATCH_SIZE.value or config.eval.batch_size
    size = config.model.input_shape
    if _TFRECORDS.value:
        dataset, total = pipeline.eval_dataset(_TFRECORDS.value, batch, size), None
    elif _IMAGES.value or manifest is not None:
        if manifest is not None:
            paths, labels = [row.path for row in manifest], [row.label for row in manifest]
        else:
            paths, labels, _ = tfrecord.image_folder(_IMAGES.value)
        dataset, total = pipeline.files_dataset(paths, labels, batch, size), len(paths)
    else:
        dataset, total = pipeline.files_dataset(list(pair_paths), None, batch, size), len(pair_paths)
    embeddings = embed_dataset(backbone, dataset, _FLIP.value or config.eval.flip, total=total)
    unreadable = []
    if _IMAGES.value or manifest is not None:
        unreadable = pipeline.missing_paths(paths, embeddings.filename)
    elif pair_paths is not None:
        unreadable = pipeline.missing_paths(pair_paths, embeddings.filename)
        if unreadable:
            # A pair with a missing side cannot be scored: the output would not match the pairs.
            raise DataError(f"{len(unreadable)} image(s) of --pairs do not decode, first: "
                            f"{unreadable[0]}; replace or re-align them")
    write_hdf5(_OUTPUT.value, embeddings)
    n, d = embeddings.embedding.shape
    rows = [("output", _OUTPUT.value), ("embeddings", n), ("dims", d),
            ("skipped", len(unreadable))]
    rows += [(f"  skipped {path}", "not a decodable image") for path in unreadable]
    print(format_summary("embed", rows))


def run() -> None:
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
