"""Export embeddings of a trained model to HDF5 (`embedding`, `label`, `filename`[, `confidence`]).

    python -m sparse_embed.embed --model_dir=runs/sparse_mfn --images=data/lfw --output=lfw.hdf5
    python -m sparse_embed.embed --model_dir=runs/sparse_mfn --tfrecords='data/val-*' --output=val.hdf5
    python -m sparse_embed.embed --model_dir=runs/sparse_mfn --pairs=data/pairs.txt \\
        --pairs_images=data/lfw --output=pairs.hdf5 --flip=concat
    python -m sparse_embed.embed --model_dir=runs/sparse_mfn --manifest=data/megaface/megaface.tsv \\
        --output=megaface_sparse_mfn.hdf5
    # the verification pairs of the run's own data (data.pairs under the data_dir it was trained on)
    python -m sparse_embed.embed --model_dir=runs/sparse_mfn --output=pairs.hdf5

A probabilistic run (`model.distribution` other than `dirac`) also writes each
image's `confidence` (its distribution's: -mean log sigma^2 for a Gaussian,
log kappa for a vMF; higher is surer); `embedding` is the L2-normalised mean,
with the zeros of a sparse mean kept. With --flip=sum or concat an image is
embedded as it is and mirrored, and its confidence is the smaller of the two
views' confidences (as a pair's confidence is the smaller of its two images').
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sparse_embed.cli import make_parser, program, user_errors_exit
from sparse_embed.errors import ConfigError, DataError
from sparse_embed.fileio import native_stderr_to_file


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sparse_embed.embed`."""
    parser = make_parser(__doc__, program(__name__))
    parser.add_argument("--model_dir", required=True, help="Directory written by sparse_embed.train.")
    parser.add_argument("--output", required=True, help="HDF5 file to write.")
    parser.add_argument("--images", help="Image folder tree, one subfolder per identity.")
    parser.add_argument("--tfrecords", help="Glob of TFRecord shards.")
    parser.add_argument("--pairs", help="Verification pairs file (LFW format).")
    parser.add_argument("--pairs_images",
                        help="Image root of --pairs; default: data.pairs_images under --data_dir.")
    parser.add_argument("--data_dir",
                        help="The run's data directory, for its data.pairs / data.pairs_images when no "
                             "other input is given; default: the one the run was trained on "
                             "(<model_dir>/run.json).")
    parser.add_argument("--manifest", help="Image manifest TSV (sparse-embed-prepare-megaface); "
                                           "labels are its identity labels.")
    parser.add_argument("--flip", choices=["none", "sum", "concat"],
                        help="Flip test-time augmentation; default: the run's eval.flip.")
    parser.add_argument("--batch_size", type=int, help="Images per batch; default: eval.batch_size.")
    return parser


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """Builds the input, embeds it and writes the HDF5 file.

    Args:
        argv: Arguments after the program name; None reads sys.argv.
    """
    args = build_parser().parse_args(argv)
    sources = [s for s in (args.images, args.tfrecords, args.pairs, args.manifest) if s]
    if len(sources) > 1:
        raise ConfigError("pass one of --images, --tfrecords, --pairs, --manifest")
    from sparse_embed.config import config_from_model_dir
    from sparse_embed.data import verification
    from sparse_embed.data.megaface import read_manifest
    from sparse_embed.run_record import default_data_dir

    config = config_from_model_dir(args.model_dir)
    manifest = read_manifest(args.manifest) if args.manifest else None
    pairs, pairs_images = args.pairs, args.pairs_images
    if not sources or (pairs and not pairs_images):
        # The run's own verification pairs, or the images of --pairs, under its data directory.
        data_dir = default_data_dir(args.model_dir, args.data_dir, required=True)
        if data_dir is None and not sources:
            raise ConfigError("need one of --images, --tfrecords, --pairs, --manifest (or --data_dir for "
                              "the run's own pairs: this run directory records none)")
        if data_dir is None:
            raise ConfigError("--pairs needs --pairs_images (the image root it refers to)")
        pairs = pairs or Path(data_dir) / config.data.pairs
        pairs_images = pairs_images or Path(data_dir) / config.data.pairs_images
    pair_paths = None
    if pairs:
        pair_paths, _, _ = verification.unique_images(verification.read_pairs(pairs, pairs_images))
    # TensorFlow is imported only once the inputs are known to be usable.
    from sparse_embed.data import format_summary, pipeline, tfrecord
    from sparse_embed.data.embeddings import write_hdf5
    from sparse_embed.inference import embed_dataset, load_backbone

    backbone, config = load_backbone(args.model_dir)
    batch = args.batch_size or config.eval.batch_size
    size = config.model.input_shape
    if args.tfrecords:
        dataset, total = pipeline.eval_dataset(args.tfrecords, batch, size), None
    elif args.images or manifest is not None:
        if manifest is not None:
            paths, labels = [row.path for row in manifest], [row.label for row in manifest]
        else:
            paths, labels, _ = tfrecord.image_folder(args.images)
        dataset, total = pipeline.files_dataset(paths, labels, batch, size), len(paths)
    else:
        dataset, total = pipeline.files_dataset(list(pair_paths), None, batch, size), len(pair_paths)
    # libjpeg reports a corrupt JPEG on the process's stderr itself ("Improper call to JPEG
    # library in state 201"); such a file is skipped and listed in the summary instead.
    with native_stderr_to_file(replay_on_error=False, keep_python=True):
        embeddings = embed_dataset(backbone, dataset, args.flip or config.eval.flip, total=total,
                                   distribution=config.model.distribution.build(
                                       config.model.embedding_size))
    unreadable = []
    if args.images or manifest is not None:
        unreadable = pipeline.missing_paths(paths, embeddings.filename)
    elif pair_paths is not None:
        unreadable = pipeline.missing_paths(pair_paths, embeddings.filename)
        if unreadable:
            # A pair with a missing side cannot be scored: the output would not match the pairs.
            raise DataError(f"{len(unreadable)} image(s) of --pairs do not decode, first: "
                            f"{unreadable[0]}; replace or re-align them")
    write_hdf5(args.output, embeddings)
    n, d = embeddings.embedding.shape
    rows = [("output", args.output), ("embeddings", n), ("dims", d),
            ("skipped", len(unreadable))]
    if embeddings.confidence is not None:
        low, high = np.min(embeddings.confidence), np.max(embeddings.confidence)
        rows.append(("confidence", f"{np.mean(embeddings.confidence):.4g} mean, "
                                   f"{low:.4g} to {high:.4g}"))
    rows += [(f"  skipped {path}", "not a decodable image") for path in unreadable]
    print(format_summary("embed", rows))


def run() -> None:
    """Console-script entry point."""
    main()


if __name__ == "__main__":
    run()
