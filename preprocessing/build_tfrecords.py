"""Converts a folder-per-class image tree into sharded TFRecords and a label map.

    python preprocessing/build_tfrecords.py --input=data/synth/train --output=data/synth/tfrecords \
        --name=train --shards=8 --workers=4

Writes `<output>/<name>-0000i-of-0000N` (schema: sparse_embed/data/tfrecord.py)
and `<output>/labels.txt`. Files that are not decodable images are skipped and
listed in the closing summary.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from sparse_embed.cli import user_errors_exit
from sparse_embed.data import format_summary, image_folder


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parses the command line.

    Args:
        argv: Arguments without the program name.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="Directory with one sub-folder per class.")
    parser.add_argument("--output", required=True, help="Directory for the shards and labels.txt.")
    parser.add_argument("--name", default="train", help="Shard name prefix.")
    parser.add_argument("--shards", type=int, default=8, help="Number of shards.")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="Processes decoding images."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the example order.")
    return parser.parse_args(argv)


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: parse flags, convert, print the summary table.

    Args:
        argv: Arguments without the program name; None reads sys.argv.
    """
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # List (and check) the input before TensorFlow is imported: a bad path fails fast and plainly.
    paths, labels, class_names = image_folder(args.input)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from sparse_embed.data.tfrecord import write_tfrecords

    summary = write_tfrecords(
        paths,
        labels,
        class_names,
        args.input,
        args.output,
        name=args.name,
        num_shards=args.shards,
        num_workers=args.workers,
        seed=args.seed,
    )
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


if __name__ == "__main__":
    main()
