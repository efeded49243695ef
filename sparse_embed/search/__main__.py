"""Command-line tools around the search index.

    python -m sparse_embed.search hdf5-to-bin EMB.hdf5 OUT.bin [--threshold T]
    python -m sparse_embed.search shard --embeddings=EMB.hdf5 --shards=N --output=DIR
    python -m sparse_embed.search query --index=A.idx,B.idx --queries=Q.hdf5 --k=10 [--output=R.npz|R.json] \
        [--mode=exhaustive|pruned|approx [--max_blocks=B]]
    python -m sparse_embed.search to-milvus --embeddings=EMB.hdf5 --uri=./milvus.db --collection=NAME \
        [--dense=DENSE.hdf5]
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from sparse_embed.cli import user_errors_exit
from sparse_embed.errors import ConfigError, DataError
from sparse_embed.fileio import atomic_path
from sparse_embed.registry import Registry
from sparse_embed.search.index import (
    DEFAULT_NUM_THREADS,
    DEFAULT_SEARCH_MODE,
    DEFAULT_ZERO_THRESHOLD,
    SEARCH_MODES,
    hdf5_to_bin,
)

# Sub-command name -> handler of its parsed arguments.
COMMANDS: Registry[Callable[[argparse.Namespace], None]] = Registry("search command")


@COMMANDS.register("hdf5-to-bin")
def _hdf5_to_bin(args: argparse.Namespace) -> None:
    rows, dims, nnz = hdf5_to_bin(args.hdf5, args.output, args.threshold)
    per_row = nnz / rows if rows else 0.0
    print(f"wrote {args.output}: {rows} rows, {dims} dims, {per_row:.2f} non-zeros per row "
          f"({100 * per_row / dims:.2f}%)")


@COMMANDS.register("shard")
def _shard(args: argparse.Namespace) -> None:
    import h5py

    from sparse_embed.search.sharded import ShardedIndex

    if args.shards < 1:
        raise ConfigError(f"--shards must be >= 1, got {args.shards}")
    if not args.zero_threshold >= 0:
        raise ConfigError(f"--zero_threshold must be >= 0, got {args.zero_threshold}")
    if not Path(args.embeddings).is_file():
        raise DataError(f"embedding file {args.embeddings} not found; write it with "
                        "python -m sparse_embed.embed")
    try:
        f = h5py.File(args.embeddings, "r")
    except OSError as e:
        reason = " ".join(str(e).split())
        raise DataError(f"{args.embeddings} is not a readable HDF5 file ({reason})") from None
    with f:
        if "embedding" not in f or f["embedding"].ndim != 2:
            raise DataError(f"{args.embeddings} has no 'embedding' dataset [N, D]; write it with "
                            "python -m sparse_embed.embed")
        embedding = f["embedding"]
        shard_rows = max(1, math.ceil(embedding.shape[0] / args.shards))
        index = ShardedIndex.build(embedding, shard_rows, args.output, args.zero_threshold)
    print(f"wrote {len(index.shards)} shards to {args.output}: {len(index)} rows, {index.dim} dims, "
          f"{index.stats['nnz']} non-zeros")


@COMMANDS.register("query")
def _query(args: argparse.Namespace) -> None:
    from sparse_embed.data.embeddings import read_hdf5
    from sparse_embed.search.sharded import ShardedIndex

    paths = [p for p in args.index.split(",") if p]
    if not paths:
        raise ConfigError("--index needs one or more index files, separated by commas")
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"index file {path} not found; write it with python -m sparse_embed.search shard")
    if args.k < 1:
        raise ConfigError(f"--k must be >= 1, got {args.k}")
    if (args.mode == "approx") != (args.max_blocks is not None):
        raise ConfigError("--max_blocks goes with --mode=approx, and --mode=approx needs --max_blocks")
    if args.max_blocks is not None and args.max_blocks < 1:
        raise ConfigError(f"--max_blocks must be >= 1, got {args.max_blocks}")
    if args.output and Path(args.output).suffix not in (".npz", ".json"):
        raise ConfigError(f"--output must end in .npz or .json, got {args.output}")
    queries = read_hdf5(args.queries).embedding
    try:
        index = ShardedIndex(paths)
        ids, scores = index.search(queries, args.k, args.threshold, num_threads=args.num_threads,
                                   mode=args.mode, max_blocks=args.max_blocks)
    except ValueError as e:
        raise DataError(f"{args.queries}: {e}") from None
    stats = index.stats
    print(f"{len(ids)} queries, {len(index.shards)} shards, {len(index)} rows: "
          f"{1e3 * stats['wall_seconds'] / max(len(ids), 1):.3f} ms/query (wall), "
          f"{stats['postings_per_query']:.0f} postings/query, {stats['blocks_per_query']:.1f} blocks/query "
          f"({args.mode})")
    if args.output:
        with atomic_path(args.output) as tmp:
            if args.output.endswith(".npz"):
                with open(tmp, "wb") as f:
                    np.savez(f, ids=ids, scores=scores)
            else:
                # JSON has no infinity: the padding of short result lists is null.
                doc = {"k": args.k, "ids": ids.tolist(),
                       "scores": [[float(s) if np.isfinite(s) else None for s in row] for row in scores]}
                Path(tmp).write_text(json.dumps(doc))
        print(f"wrote {args.output}")


@COMMANDS.register("to-milvus")
def _to_milvus(args: argparse.Namespace) -> None:
    try:
        from sparse_embed.search.milvus import to_milvus
    except ImportError as e:
        raise ConfigError(f"Milvus support is not installed ({e}); "
                          "run pip install -e \".[milvus]\"") from None
    if not args.zero_threshold >= 0:
        raise ConfigError(f"--zero_threshold must be >= 0, got {args.zero_threshold}")
    summary = to_milvus(args.embeddings, args.uri, args.collection, dense_path=args.dense,
                        zero_threshold=args.zero_threshold, overwrite=args.overwrite)
    dense = f", dense vectors of {summary['dense_dim']} dims" if summary["dense_dim"] else ""
    print(f"wrote collection {args.collection} to {args.uri}: {summary['rows']} rows, {summary['dim']} dims, "
          f"{summary['nnz']} non-zeros{dense} in {summary['seconds']:.1f} s")


def _add_commands(commands: argparse._SubParsersAction) -> None:
    """Declares every registered command's arguments."""
    convert = commands.add_parser(
        "hdf5-to-bin", help="convert an embedding HDF5 file to the .bin format of search/search")
    convert.add_argument("hdf5", help="HDF5 file with datasets 'embedding' [N, D] and 'label' [N]")
    convert.add_argument("output", help=".bin file to write")
    convert.add_argument("--threshold", type=float, default=DEFAULT_ZERO_THRESHOLD,
                         help="keep entries with |x| above it (default: %(default)s)")

    shard = commands.add_parser("shard", help="split an embedding HDF5 file into index shards by row range")
    shard.add_argument("--embeddings", required=True, help="HDF5 file with dataset 'embedding' [N, D]")
    shard.add_argument("--shards", type=int, required=True, help="number of shards (equal row ranges)")
    shard.add_argument("--output", required=True, help="directory for shard-00000.idx, ...")
    shard.add_argument("--zero_threshold", type=float, default=DEFAULT_ZERO_THRESHOLD,
                       help="keep entries with |x| above it (default: %(default)s)")

    query = commands.add_parser("query", help="exact top-k of HDF5 queries over one or more index shards")
    query.add_argument("--index", required=True, help="index files, comma-separated, in row order")
    query.add_argument("--queries", required=True, help="HDF5 file with dataset 'embedding' [Q, D]")
    query.add_argument("--k", type=int, default=10, help="results per query (default: %(default)s)")
    query.add_argument("--threshold", type=float, default=None,
                       help="only rows scoring strictly above it qualify (default: every row)")
    query.add_argument("--num_threads", type=int, default=DEFAULT_NUM_THREADS,
                       help="worker threads in all, 0: every core (default: %(default)s)")
    query.add_argument("--mode", choices=SEARCH_MODES, default=DEFAULT_SEARCH_MODE,
                       help="every mode but approx is exact; approx scores --max_blocks blocks per "
                            "shard (default: %(default)s)")
    query.add_argument("--max_blocks", type=int, default=None,
                       help="blocks scored per query and shard with --mode=approx")
    query.add_argument("--output", default=None, help="write ids and scores to a .npz or .json file")

    milvus = commands.add_parser("to-milvus", help="write an embedding HDF5 file into a Milvus collection")
    milvus.add_argument("--embeddings", required=True, help="HDF5 file: 'embedding' [N, D] >= 0, 'label', "
                                                            "'filename'")
    milvus.add_argument("--uri", required=True,
                        help="Milvus server (http://host:19530) or a local path for Milvus Lite "
                             "(./milvus.db)")
    milvus.add_argument("--collection", required=True, help="collection to create")
    milvus.add_argument("--dense", default=None, help="HDF5 file whose 'embedding' [N, Dd] is stored for "
                                                      "re-ranking")
    milvus.add_argument("--zero_threshold", type=float, default=DEFAULT_ZERO_THRESHOLD,
                        help="keep entries with |x| above it (default: %(default)s)")
    milvus.add_argument("--overwrite", action="store_true",
                        help="replace an existing collection of that name")


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """Command-line tools around the search index.

    Args:
        argv: Arguments after the program name; None reads sys.argv.
    """
    parser = argparse.ArgumentParser(prog="python -m sparse_embed.search",
                                     description="Tools for the sparse search index.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_commands(commands)
    args = parser.parse_args(argv)
    COMMANDS.get(args.command)(args)


def run() -> None:
    """Console-script entry point."""
    main()


if __name__ == "__main__":
    run()
