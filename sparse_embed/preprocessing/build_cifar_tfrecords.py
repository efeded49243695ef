"""Converts the CIFAR-100 Python pickles into TFRecords (train and test splits) and a label map.

    python -m sparse_embed.preprocessing.build_cifar_tfrecords --root=cifar-100-python \\
        --output=data/cifar100 --labels=fine --shards=8 --workers=2

Reads `train`, `test` and `meta` of the unpacked "python version" archive
without running any code in them (see sparse_embed/data/cifar.py) and writes
`<output>/tfrecords/{train,test}-*` and `<output>/tfrecords/labels.txt`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from sparse_embed.cli import make_parser, user_errors_exit
from sparse_embed.data import add_writer_flags, format_summary


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sparse_embed.preprocessing.build_cifar_tfrecords`."""
    parser = make_parser(__doc__, "python -m sparse_embed.preprocessing.build_cifar_tfrecords")
    parser.add_argument("--root", required=True, help="The unpacked cifar-100-python folder.")
    parser.add_argument("--output", required=True, help="Output directory (tfrecords/ inside).")
    parser.add_argument("--labels", choices=("fine", "coarse"), default="fine",
                        help="100 fine classes or 20 coarse superclasses.")
    add_writer_flags(parser, "Shards per split.")
    return parser


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: parse flags, convert, print the summary table.

    Args:
        argv: Arguments without the program name; None reads sys.argv.
    """
    args = build_parser().parse_args(argv)
    from sparse_embed.data.cifar import write_cifar_tfrecords

    summaries = write_cifar_tfrecords(args.root, args.output, labels=args.labels,
                                      num_shards=args.shards, num_workers=args.workers,
                                      seed=args.seed)
    rows = [(f"{split} {key}", summary[key]) for split, summary in summaries.items()
            for key in ("images", "skipped", "classes", "shards")]
    print(format_summary(f"CIFAR-100 TFRecords in {args.output}/tfrecords", rows))


def run() -> None:
    """Console-script entry point."""
    main()


if __name__ == "__main__":
    run()
