"""Converts a metric-learning retrieval benchmark (CUB, Cars196, SOP, In-shop) into TFRecords per split.

    python -m sparse_embed.preprocessing.build_retrieval_tfrecords --dataset=cub --root=CUB_200_2011 \\
        --output=data/cub --shards=8 --workers=2

Reads the dataset's published list files and writes its standard open-set
splits (see sparse_embed/data/retrieval.py): the training split to
`<output>/tfrecords/`, the others to `<output>/<split>/`, each with labels.txt.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from sparse_embed.cli import make_parser, user_errors_exit
from sparse_embed.data import add_writer_flags, format_summary


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sparse_embed.preprocessing.build_retrieval_tfrecords`."""
    from sparse_embed.data.retrieval import DATASETS

    parser = make_parser(__doc__, "python -m sparse_embed.preprocessing.build_retrieval_tfrecords")
    parser.add_argument("--dataset", required=True, choices=DATASETS.names())
    parser.add_argument("--root", required=True, help="The dataset's top folder.")
    parser.add_argument("--output", required=True, help="Output directory.")
    add_writer_flags(parser, "Shards per split.")
    return parser


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: parse flags, convert, print the summary table.

    Args:
        argv: Arguments without the program name; None reads sys.argv.
    """
    args = build_parser().parse_args(argv)
    from sparse_embed.data.retrieval import split_dir, write_retrieval_tfrecords

    summaries = write_retrieval_tfrecords(args.dataset, args.root, args.output,
                                          num_shards=args.shards, num_workers=args.workers,
                                          seed=args.seed)
    rows = []
    for split, summary in summaries.items():
        rows += [(f"{split} output", split_dir(args.output, split))]
        rows += [(f"{split} {key}", summary[key]) for key in ("images", "skipped", "classes")]
        rows += [(f"  skipped {path}", reason) for path, reason in summary["skipped_examples"]]
    print(format_summary(f"{args.dataset} TFRecords", rows))


def run() -> None:
    """Console-script entry point."""
    main()


if __name__ == "__main__":
    run()
