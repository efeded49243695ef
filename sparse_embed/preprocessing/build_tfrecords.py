"""Converts a folder-per-class image tree or a RecordIO pack into sharded TFRecords and a label map.

    python -m sparse_embed.preprocessing.build_tfrecords --input=data/synth/train \\
        --output=data/synth/tfrecords --name=train --shards=8 --workers=4
    python -m sparse_embed.preprocessing.build_tfrecords --recordio=$MS1M_DIR/train.rec \\
        --output=$MS1M_DIR/tfrecords --shards=1000 --workers=16

Writes `<output>/<name>-0000i-of-0000N` (schema: sparse_embed/data/tfrecord.py)
and `<output>/labels.txt`. Files that are not decodable images are skipped and
listed in the closing summary.

`--recordio` reads an InsightFace / MXNet `.rec` (with its `.idx` beside it)
directly, copying the encoded JPEGs: the class names are the pack's integer
labels as strings, sorted numerically, and label i of the TFRecords is line i
of labels.txt. Unreadable records are skipped and listed by key.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from sparse_embed.cli import make_parser, user_errors_exit
from sparse_embed.data import add_writer_flags, format_summary, image_folder
from sparse_embed.data.recordio import open_recordio


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sparse_embed.preprocessing.build_tfrecords`."""
    parser = make_parser(__doc__, "python -m sparse_embed.preprocessing.build_tfrecords")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="Directory with one sub-folder per class.")
    source.add_argument(
        "--recordio", help="InsightFace / MXNet train.rec, with train.idx beside it."
    )
    parser.add_argument("--output", required=True, help="Directory for the shards and labels.txt.")
    parser.add_argument("--name", default="train", help="Shard name prefix.")
    add_writer_flags(parser)
    return parser


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: parse flags, convert, print the summary table.

    Args:
        argv: Arguments without the program name; None reads sys.argv.
    """
    args = build_parser().parse_args(argv)
    # Check the input before TensorFlow is imported: a bad path fails fast and plainly.
    if args.recordio is not None:
        pack = open_recordio(args.recordio)
    else:
        paths, labels, class_names = image_folder(args.input)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from sparse_embed.data.tfrecord import write_recordio_tfrecords, write_tfrecords

    options = dict(
        name=args.name, num_shards=args.shards, num_workers=args.workers, seed=args.seed
    )
    if args.recordio is not None:
        summary = write_recordio_tfrecords(pack, args.output, **options)
    else:
        summary = write_tfrecords(paths, labels, class_names, args.input, args.output, **options)
    rows = [
        (key, summary[key])
        for key in (
            "output",
            "images",
            "reencoded",
            "skipped",
            "classes",
            "shards",
            "stale_shards_removed",
        )
    ]
    rows += [(f"  skipped {path}", reason) for path, reason in summary["skipped_examples"]]
    print(format_summary(f"TFRecords {args.name}", rows))


def run() -> None:
    """Console-script entry point."""
    main()


if __name__ == "__main__":
    run()
