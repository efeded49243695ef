"""Command-line tools around the search index.

    python -m sparse_embed.search hdf5-to-bin EMB.hdf5 OUT.bin [--threshold T]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from sparse_embed.cli import user_errors_exit
from sparse_embed.search.index import DEFAULT_ZERO_THRESHOLD, hdf5_to_bin


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """Command-line tools around the search index.

    Args:
        argv: Arguments after the program name; None reads sys.argv.
    """
    parser = argparse.ArgumentParser(prog="python -m sparse_embed.search",
                                     description="Tools for the sparse search index.")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser(
        "hdf5-to-bin", help="convert an embedding HDF5 file to the .bin format of search/search")
    convert.add_argument("hdf5", help="HDF5 file with datasets 'embedding' [N, D] and 'label' [N]")
    convert.add_argument("output", help=".bin file to write")
    convert.add_argument("--threshold", type=float, default=DEFAULT_ZERO_THRESHOLD,
                         help="keep entries with |x| above it (default: %(default)s)")
    args = parser.parse_args(argv)
    rows, dims, nnz = hdf5_to_bin(args.hdf5, args.output, args.threshold)
    per_row = nnz / rows if rows else 0.0
    print(f"wrote {args.output}: {rows} rows, {dims} dims, {per_row:.2f} non-zeros per row "
          f"({100 * per_row / dims:.2f}%)")


def run() -> None:
    """Console-script entry point."""
    main()


if __name__ == "__main__":
    run()
