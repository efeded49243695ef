"""Extracts an InsightFace RecordIO pack (MS1M, ...) into a folder-per-identity image tree.

    python -m sparse_embed.preprocessing.msceleb_to_jpeg $MS1M_DIR --workers=16

Reads `DATASET_DIR/train.rec` with `train.idx` (and `property`, when present)
beside it, no MXNet needed, and writes every image to
`DATASET_DIR/images/<label>/<key>.jpg` with its bytes unchanged (a PNG record
becomes `<key>.png`). Records that cannot be read or decoded are skipped and
listed by key in the closing summary. The tree is the `--input` of
build_tfrecords.py; `build_tfrecords.py --recordio` converts the pack directly.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from sparse_embed.cli import make_parser, user_errors_exit
from sparse_embed.data import format_summary
from sparse_embed.data.recordio import extract_images, open_recordio

RECORDS = "train.rec"
IMAGES = "images"


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sparse_embed.preprocessing.msceleb_to_jpeg`."""
    parser = make_parser(__doc__, "python -m sparse_embed.preprocessing.msceleb_to_jpeg")
    parser.add_argument("dataset_dir", help=f"Directory holding {RECORDS} and train.idx.")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="Processes reading and writing images.",
    )
    return parser


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: parse flags, extract, print the summary table.

    Args:
        argv: Arguments without the program name; None reads sys.argv.
    """
    args = build_parser().parse_args(argv)
    dataset_dir = Path(args.dataset_dir)
    pack = open_recordio(dataset_dir / RECORDS)
    summary = extract_images(pack, dataset_dir / IMAGES, num_workers=args.workers)
    rows = [(key, summary[key]) for key in ("output", "layout", "images", "identities")]
    if pack.property is not None:
        prop = pack.property
        rows.append(("property", f"{prop.num_classes} classes, {prop.height}x{prop.width}"))
    rows.append(("skipped", summary["skipped"]))
    rows += [(f"  skipped key {key}", reason) for key, reason in summary["skipped_examples"]]
    print(format_summary(f"RecordIO {pack.rec.name}", rows))


def run() -> None:
    """Console-script entry point."""
    main()


if __name__ == "__main__":
    run()
