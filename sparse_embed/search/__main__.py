"""Command-line tools around the search index.

    python -m sparse_embed.search hdf5-to-bin EMB.hdf5 OUT.bin [--zero_threshold T]
    python -m sparse_embed.search shard --embeddings=EMB.hdf5 --shards=N --output=DIR \\
        [--value_type=int8 [--keep_float]]
    python -m sparse_embed.search query --index=A.idx,B.idx | --index=DIR --queries=Q.hdf5 --k=10 \\
        [--output=R.npz|R.json] [--mode=exhaustive|pruned|approx|auto [--max_blocks=B]] \\
        [--rescore_k=R|exact] [--min_row_confidence=C]
    python -m sparse_embed.search query --uri=./milvus.db --collection=NAME --queries=Q.hdf5 --k=10
    python -m sparse_embed.search to-milvus --embeddings=EMB.hdf5 --uri=./milvus.db --collection=NAME \\
        [--dense=DENSE.hdf5]

A mutable gallery (`MutableIndex`: a directory with `manifest.json`), changed in place; every
command that changes it saves the directory atomically and prints one summary line (`info` a table):

    python -m sparse_embed.search mutable-create --embeddings=EMB.hdf5 --index=DIR \\
        [--ids_from=next|label] [--overwrite] [--value_type=int8 [--keep_float]]
    python -m sparse_embed.search add --index=DIR --embeddings=NEW.hdf5 \\
        [--ids_from=next|label | --ids_file=F]
    python -m sparse_embed.search remove --index=DIR [--ids=3,17] [--ids_file=F]
    python -m sparse_embed.search compact --index=DIR
    python -m sparse_embed.search info --index=DIR

Ids are the caller's int64 ids (>= 0): `next` assigns the ids after every id the index has held
(0 .. N-1 for a new index: the rows of EMB.hdf5), `label` takes each row's `label`, an ids file
holds integers separated by commas or white space. `query --index=DIR` searches the live rows and
returns those ids.

`--value_type=int8` stores one-byte posting values (3 bytes a posting instead of 6) and
`--keep_float` the float32 rows beside them; `query --rescore_k=R` then re-scores the top R rows
by quantized score in float32, `--rescore_k=exact` returns the float32 index's results.

An embedding file with a `confidence` dataset gives its rows (shard, mutable-create, add) or its
queries (query) a confidence: the index keeps the rows', `query --output` writes `row_confidence`
and `query_confidence` beside ids and scores, and `--min_row_confidence=C` leaves out the rows
below C before the top-k (ranking is otherwise unchanged).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sparse_embed.cli import deprecated_alias, make_parser, program, user_errors_exit
from sparse_embed.errors import ConfigError, DataError
from sparse_embed.fileio import atomic_path
from sparse_embed.registry import Registry
from sparse_embed.search.index import (
    DEFAULT_BLOCK_ROWS,
    DEFAULT_NUM_THREADS,
    DEFAULT_SEARCH_MODE,
    DEFAULT_VALUE_TYPE,
    DEFAULT_ZERO_THRESHOLD,
    SEARCH_MODES,
    VALUE_TYPES,
    hdf5_to_bin,
)

if TYPE_CHECKING:
    import h5py

    from sparse_embed.data.embeddings import Embeddings
    from sparse_embed.search.mutable import MutableIndex

# Sub-command name -> handler of its parsed arguments.
COMMANDS: Registry[Callable[[argparse.Namespace], None]] = Registry("search command")
# --ids_from value -> the ids of the rows of an embedding file (its path for messages); None: the
# index assigns the next free ids.
ID_SOURCES: Registry[Callable[[Embeddings, str], np.ndarray | None]] = Registry("id source")
_CREATE_COMMAND = "python -m sparse_embed.search mutable-create"


@ID_SOURCES.register("next")
def _next_ids(embeddings: Embeddings, path: str) -> np.ndarray | None:
    return None


@ID_SOURCES.register("label")
def _label_ids(embeddings: Embeddings, path: str) -> np.ndarray | None:
    negative = np.flatnonzero(embeddings.label < 0)
    if len(negative):
        raise DataError(f"{path}: --ids_from=label needs a 'label' dataset of ids >= 0, row {negative[0]} "
                        f"has {embeddings.label[negative[0]]}; use --ids_from=next or --ids_file")
    return embeddings.label


def _check_zero_threshold(value: float) -> None:
    if not value >= 0:
        raise ConfigError(f"--zero_threshold must be >= 0, got {value}")


def _parse_ids(text: str, source: str) -> np.ndarray:
    """int64 ids from integers separated by commas or white space; `source` names them in errors."""
    tokens = [t for t in re.split(r"[\s,]+", text) if t]
    bad = [t for t in tokens if not re.fullmatch(r"[+-]?\d+", t)]
    if bad:
        raise DataError(f"{source} must hold integer ids separated by commas or white space, "
                        f"got {bad[0]!r}")
    ids = np.array([int(t) for t in tokens], np.int64)
    if len(ids) and ids.min() < 0:
        raise DataError(f"{source}: ids must be >= 0, got {ids.min()}")
    return ids


def _read_ids_file(path: str) -> np.ndarray:
    if not Path(path).is_file():
        raise DataError(f"ids file {path} not found; give one integer id per line (or comma-separated)")
    return _parse_ids(Path(path).read_text(), f"ids file {path}")


def _open_mutable(path: str) -> MutableIndex:
    """Loads the mutable index directory `path`, or says in one line why it is not one."""
    from sparse_embed.search.mutable import MutableIndex

    directory = Path(path)
    if not directory.exists():
        raise DataError(f"mutable index directory {path} not found; create it with {_CREATE_COMMAND}")
    if not directory.is_dir():
        raise DataError(f"{path} is a file, not a mutable index directory; create one with {_CREATE_COMMAND}")
    return MutableIndex.load(directory)


def _layout(index: MutableIndex) -> str:
    stats = index.stats
    return (f"{stats['rows']} rows, {stats['dim']} dims ({stats['base_rows']} base, "
            f"{stats['delta_rows']} delta, {stats['tombstones']} tombstones)")


def _id_span(ids: np.ndarray) -> str:
    if not len(ids):
        return "no ids"
    if len(ids) == ids[-1] - ids[0] + 1 and (np.diff(ids) == 1).all():
        return f"ids {ids[0]}..{ids[-1]}"
    return f"{len(ids)} ids in {ids.min()}..{ids.max()}"


def _add_rows(index: MutableIndex, embeddings: Embeddings, args: argparse.Namespace) -> np.ndarray:
    """Adds the rows of --embeddings (read as `embeddings`) with the ids --ids_from or --ids_file choose."""
    dim = embeddings.embedding.shape[1]
    if dim != index.dim:
        raise DataError(f"{args.embeddings} has {dim} dims, the index {index.dim}; "
                        "add embeddings of the model the index was built from")
    if args.ids_file is not None:
        ids = _read_ids_file(args.ids_file)
        if len(ids) != len(embeddings.embedding):
            raise DataError(f"ids file {args.ids_file} holds {len(ids)} ids, {args.embeddings} "
                            f"{len(embeddings.embedding)} rows; give one id per row")
    else:
        ids = ID_SOURCES.get(args.ids_from)(embeddings, args.embeddings)
    try:
        return index.add(embeddings.embedding, ids, args.zero_threshold, confidence=embeddings.confidence)
    except ValueError as e:
        raise DataError(f"{args.embeddings}: {e}") from None


@COMMANDS.register("hdf5-to-bin")
def _hdf5_to_bin(args: argparse.Namespace) -> None:
    rows, dims, nnz = hdf5_to_bin(args.hdf5, args.output, args.zero_threshold)
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
        confidence = _read_confidence(f, args.embeddings, embedding.shape[0])
        shard_rows = max(1, math.ceil(embedding.shape[0] / args.shards))
        _check_value_arguments(args)
        index = ShardedIndex.build(embedding, shard_rows, args.output, args.zero_threshold,
                                   args.value_type, args.keep_float, confidence=confidence)
    print(f"wrote {len(index.shards)} shards to {args.output}: {len(index)} rows, {index.dim} dims, "
          f"{index.stats['nnz']} non-zeros")


def _read_confidence(f: h5py.File, path: str, rows: int) -> np.ndarray | None:
    """The `confidence` dataset of an open embedding file (one finite value per row), or None."""
    if "confidence" not in f:
        return None
    confidence = np.asarray(f["confidence"][:], np.float32)
    if confidence.shape != (rows,):
        raise DataError(f"{path}: 'confidence' must hold one value per embedding ({rows}), got shape "
                        f"{confidence.shape}; write the file again with python -m sparse_embed.embed")
    if not np.isfinite(confidence).all():
        raise DataError(f"{path}: 'confidence' has {int(np.sum(~np.isfinite(confidence)))} non-finite "
                        "value(s); write the file again with python -m sparse_embed.embed")
    return confidence


@COMMANDS.register("query")
def _query(args: argparse.Namespace) -> None:
    from sparse_embed.data.embeddings import read_hdf5
    from sparse_embed.search.sharded import ShardedIndex

    if (args.index is None) == (args.uri is None):
        raise ConfigError("query needs --index (index files or a mutable index directory) or --uri and "
                          "--collection (a Milvus collection), not both")
    if args.uri is not None:
        _query_milvus(args)
        return
    if args.collection is not None:
        raise ConfigError("--collection goes with --uri (a Milvus collection), not with --index")
    paths = [p for p in args.index.split(",") if p]
    if not paths:
        raise ConfigError("--index needs one or more index files, separated by commas, or a mutable "
                          "index directory")
    if len(paths) > 1 and any(Path(p).is_dir() for p in paths):
        raise ConfigError("a mutable index directory is queried alone: --index=DIR, not in a list of shards")
    for path in paths:
        if not Path(path).exists():
            raise DataError(f"index file {path} not found; write it with python -m sparse_embed.search shard "
                            f"(or a mutable index directory with mutable-create)")
    _check_query_arguments(args)
    if (args.mode == "approx") != (args.max_blocks is not None):
        raise ConfigError("--max_blocks goes with --mode=approx, and --mode=approx needs --max_blocks")
    if args.max_blocks is not None and args.max_blocks < 1:
        raise ConfigError(f"--max_blocks must be >= 1, got {args.max_blocks}")
    if Path(paths[0]).is_dir():
        index = _open_mutable(paths[0])
        layout = f"mutable index of {_layout(index)}"
    else:
        try:
            index = ShardedIndex(paths)
        except ValueError as e:
            raise DataError(f"--index: {e}") from None
        layout = f"{len(index.shards)} shards, {len(index)} rows"
    query_file = read_hdf5(args.queries)
    rescore = _rescore_options(args.rescore_k)
    if args.min_row_confidence is not None and not math.isfinite(args.min_row_confidence):
        raise ConfigError(f"--min_row_confidence must be a finite number, got {args.min_row_confidence}")
    try:
        ids, scores, row_conf, query_conf = index.search(
            query_file.embedding, args.k, args.score_threshold, num_threads=args.num_threads,
            mode=args.mode, max_blocks=args.max_blocks, query_confidence=query_file.confidence,
            min_row_confidence=args.min_row_confidence, return_confidence=True, **rescore)
    except ValueError as e:
        if rescore and "rescore" in str(e):
            raise ConfigError(f"--rescore_k: {e}") from None
        if args.min_row_confidence is not None and "min_row_confidence" in str(e):
            raise ConfigError(f"--min_row_confidence: {e}; build the index from an HDF5 file with a "
                              "'confidence' dataset") from None
        raise DataError(f"{args.queries}: {e}") from None
    stats = index.stats
    print(f"{len(ids)} queries, {layout}: "
          f"{1e3 * stats['wall_seconds'] / max(len(ids), 1):.3f} ms/query (wall), "
          f"{stats['postings_per_query']:.0f} postings/query, {stats['blocks_per_query']:.1f} blocks/query "
          f"({args.mode})")
    with_confidence = query_file.confidence is not None or index.confidence is not None
    _write_results(args, ids, scores, (row_conf, query_conf) if with_confidence else None)


def _check_value_arguments(args: argparse.Namespace) -> None:
    if args.keep_float and args.value_type != "int8":
        raise ConfigError("--keep_float goes with --value_type=int8 (a float32 index holds its float rows)")


def _rescore_options(value: str | None) -> dict[str, int | bool]:
    """The search keywords of --rescore_k: none, rescore_k=R or rescore_exact=True."""
    if value is None:
        return {}
    if value == "exact":
        return {"rescore_exact": True}
    if not re.fullmatch(r"[0-9]+", value):
        raise ConfigError(f"--rescore_k must be a number of rows or 'exact', got {value!r}")
    return {"rescore_k": int(value)}


def _check_query_arguments(args: argparse.Namespace) -> None:
    if args.k < 1:
        raise ConfigError(f"--k must be >= 1, got {args.k}")
    if args.output and Path(args.output).suffix not in (".npz", ".json"):
        raise ConfigError(f"--output must end in .npz or .json, got {args.output}")


def _query_milvus(args: argparse.Namespace) -> None:
    """`query --uri --collection`: the exact top-k of a collection written by to-milvus."""
    from sparse_embed.data.embeddings import read_hdf5

    if args.collection is None:
        raise ConfigError("--uri needs --collection, the collection written by to-milvus")
    if args.mode != DEFAULT_SEARCH_MODE or args.max_blocks is not None or args.rescore_k is not None:
        raise ConfigError("--mode, --max_blocks and --rescore_k choose how the index searches; Milvus "
                          "searches its own way: drop them with --uri")
    if args.min_row_confidence is not None:
        raise ConfigError("--min_row_confidence filters an index built with a confidence per row; a "
                          "Milvus collection keeps none: drop it with --uri")
    _check_query_arguments(args)
    try:
        from sparse_embed.search.milvus import MilvusIndex
    except ImportError as e:
        raise ConfigError(f"Milvus support is not installed ({e}); "
                          "run pip install -e \".[milvus]\"") from None
    queries = read_hdf5(args.queries).embedding
    with MilvusIndex(args.uri, args.collection) as index:
        try:
            ids, scores = index.search(queries, args.k, args.score_threshold)
        except ValueError as e:
            raise DataError(f"{args.queries}: {e}") from None
        stats = index.stats
    print(f"{len(ids)} queries, collection {args.collection} in {args.uri}, {stats['rows']} rows: "
          f"{stats['ms_per_query']:.3f} ms/query (wall), {stats['requests']} search requests")
    _write_results(args, ids, scores)


def _write_results(args: argparse.Namespace, ids: np.ndarray, scores: np.ndarray,
                   confidence: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Writes ids and scores (and each hit's row and query confidence) to --output when it is given."""
    if args.output:
        arrays = {"ids": ids, "scores": scores}
        if confidence is not None:
            arrays.update(row_confidence=confidence[0], query_confidence=confidence[1])
        with atomic_path(args.output) as tmp:
            if args.output.endswith(".npz"):
                with open(tmp, "wb") as f:
                    np.savez(f, **arrays)
            else:
                # JSON has no infinity or NaN: padding and missing confidences are null.
                doc = {"k": args.k, "ids": ids.tolist(),
                       **{name: [[float(s) if np.isfinite(s) else None for s in row] for row in values]
                          for name, values in arrays.items() if name != "ids"}}
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


@COMMANDS.register("mutable-create")
def _mutable_create(args: argparse.Namespace) -> None:
    from sparse_embed.data.embeddings import read_hdf5
    from sparse_embed.search.mutable import MANIFEST_NAME, MutableIndex

    _check_zero_threshold(args.zero_threshold)
    out = Path(args.index)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file; --index names the directory of the mutable index")
    if (out / MANIFEST_NAME).is_file() and not args.overwrite:
        raise DataError(f"{out} already holds a mutable index; change it with add / remove, or pass "
                        "--overwrite to replace it")
    start = time.perf_counter()
    embeddings = read_hdf5(args.embeddings)
    _check_value_arguments(args)
    try:
        index = MutableIndex(embeddings.embedding.shape[1], args.block_rows, args.value_type,
                             args.keep_float)
    except ValueError as e:
        raise ConfigError(f"--block_rows: {e}") from None
    new_ids = _add_rows(index, embeddings, args)
    # One base segment from the start: the delta is for the rows added later.
    index.compact()
    index.save(out)
    print(f"created mutable index {out} from {args.embeddings} ({_id_span(np.sort(new_ids))}): "
          f"{_layout(index)} in {time.perf_counter() - start:.2f} s")


@COMMANDS.register("add")
def _add(args: argparse.Namespace) -> None:
    from sparse_embed.data.embeddings import read_hdf5

    _check_zero_threshold(args.zero_threshold)
    index = _open_mutable(args.index)
    new_ids = _add_rows(index, read_hdf5(args.embeddings), args)
    index.save(args.index)
    print(f"added {len(new_ids)} rows ({_id_span(np.sort(new_ids))}) to {args.index}: {_layout(index)}")


@COMMANDS.register("remove")
def _remove(args: argparse.Namespace) -> None:
    if args.ids is None and args.ids_file is None:
        raise ConfigError("remove needs --ids=3,17 and/or --ids_file=F")
    gone = [np.zeros(0, np.int64)]
    if args.ids is not None:
        gone.append(_parse_ids(args.ids, "--ids"))
    if args.ids_file is not None:
        gone.append(_read_ids_file(args.ids_file))
    ids = np.concatenate(gone)
    index = _open_mutable(args.index)
    try:
        index.remove(ids)
    except ValueError as e:
        raise DataError(f"{args.index}: {e}; nothing was removed") from None
    index.save(args.index)
    print(f"removed {len(ids)} rows from {args.index}: {_layout(index)}")


@COMMANDS.register("compact")
def _compact(args: argparse.Namespace) -> None:
    index = _open_mutable(args.index)
    before = _layout(index)
    start = time.perf_counter()
    index.compact()
    seconds = time.perf_counter() - start
    index.save(args.index)
    print(f"compacted {args.index} in {seconds:.2f} s: {_layout(index)}, was {before}")


@COMMANDS.register("info")
def _info(args: argparse.Namespace) -> None:
    index = _open_mutable(args.index)
    stats = index.stats
    ids = index.ids
    rows = {
        "rows": stats["rows"],
        "dims": stats["dim"],
        "base rows": stats["base_rows"],
        "delta rows": stats["delta_rows"],
        "tombstones": stats["tombstones"],
        "non-zeros": stats["nnz"],
        "bytes": stats["bytes"],
        "bytes per non-zero": f"{stats['bytes'] / max(stats['nnz'], 1):.2f}",
        "value type": stats["value_type"] + (" + float32 rows" if stats["keep_float"] else ""),
        "ids": f"{ids[0]}..{ids[-1]}" if len(ids) else "none",
    }
    width = max(len(key) for key in rows)
    print(f"mutable index {args.index}")
    for key, value in rows.items():
        print(f"  {key:<{width}}  {value}")


def _add_commands(commands: argparse._SubParsersAction) -> None:
    """Declares every registered command's arguments."""
    convert = commands.add_parser(
        "hdf5-to-bin", help="convert an embedding HDF5 file to the .bin format of search/search")
    convert.add_argument("hdf5", help="HDF5 file with datasets 'embedding' [N, D] and 'label' [N]")
    convert.add_argument("output", help=".bin file to write")
    convert.add_argument("--zero_threshold", type=float, default=DEFAULT_ZERO_THRESHOLD,
                         help="keep entries with |x| above it (default: %(default)s)")
    deprecated_alias(convert, "--threshold", "--zero_threshold")

    shard = commands.add_parser("shard", help="split an embedding HDF5 file into index shards by row range")
    shard.add_argument("--embeddings", required=True, help="HDF5 file with dataset 'embedding' [N, D]")
    shard.add_argument("--shards", type=int, required=True, help="number of shards (equal row ranges)")
    shard.add_argument("--output", required=True, help="directory for shard-00000.idx, ...")
    shard.add_argument("--zero_threshold", type=float, default=DEFAULT_ZERO_THRESHOLD,
                       help="keep entries with |x| above it (default: %(default)s)")
    _value_arguments(shard)

    query = commands.add_parser("query", help="exact top-k of HDF5 queries over index shards, a mutable "
                                              "index or a Milvus collection")
    query.add_argument("--index", default=None, help="index files, comma-separated, in row order, or one "
                                                     "mutable index directory")
    query.add_argument("--uri", default=None, help="instead of --index: a Milvus server or Milvus Lite file")
    query.add_argument("--collection", default=None, help="the collection to search with --uri")
    query.add_argument("--queries", required=True, help="HDF5 file with dataset 'embedding' [Q, D]")
    query.add_argument("--k", type=int, default=10, help="results per query (default: %(default)s)")
    query.add_argument("--score_threshold", type=float, default=None,
                       help="only rows scoring strictly above it qualify (default: every row)")
    deprecated_alias(query, "--threshold", "--score_threshold")
    query.add_argument("--num_threads", type=int, default=DEFAULT_NUM_THREADS,
                       help="worker threads in all, 0: every core (default: %(default)s)")
    query.add_argument("--mode", choices=SEARCH_MODES, default=DEFAULT_SEARCH_MODE,
                       help="every mode but approx is exact; approx scores --max_blocks blocks per "
                            "shard (default: %(default)s)")
    query.add_argument("--max_blocks", type=int, default=None,
                       help="blocks scored per query and shard with --mode=approx")
    query.add_argument("--rescore_k", default=None,
                       help="int8 index with float rows: re-score the top R rows by quantized score in "
                            "float32, or 'exact' for the float32 index's results")
    query.add_argument("--min_row_confidence", type=float, default=None,
                       help="leave out rows whose confidence is below it, before the top-k (an index "
                            "built with a confidence; not with --rescore_k) (default: every row)")
    query.add_argument("--output", default=None, help="write ids and scores (with confidence: "
                                                      "row_confidence, query_confidence) to a .npz or "
                                                      ".json file")

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

    create = commands.add_parser("mutable-create", help="create a mutable index directory from an HDF5 file")
    _rows_arguments(create, "the rows of the new index")
    create.add_argument("--block_rows", type=int, default=DEFAULT_BLOCK_ROWS,
                        help="rows per pruning block, a power of two in [8, 65536] (default: %(default)s)")
    create.add_argument("--overwrite", action="store_true", help="replace a mutable index already there")
    _value_arguments(create)

    add = commands.add_parser("add", help="add the rows of an HDF5 file to a mutable index")
    _rows_arguments(add, "the rows to add")

    remove = commands.add_parser("remove", help="remove rows from a mutable index by id")
    remove.add_argument("--index", required=True, help="the mutable index directory")
    remove.add_argument("--ids", default=None, help="ids to remove, comma-separated")
    remove.add_argument("--ids_file", default=None,
                        help="file of ids to remove, separated by commas or white space")
    deprecated_alias(remove, "--ids-file", "--ids_file")

    for name, text in (("compact", "merge a mutable index's delta and tombstones into one base segment"),
                       ("info", "print a mutable index's segments and sizes")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--index", required=True, help="the mutable index directory")


def _value_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--value_type", choices=VALUE_TYPES, default=DEFAULT_VALUE_TYPE,
                        help="posting values: float32, or int8 with a scale per dimension "
                             "(default: %(default)s)")
    parser.add_argument("--keep_float", action="store_true",
                        help="with --value_type=int8, keep the float32 rows too (for query --rescore_k)")


def _rows_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """The arguments of the commands that put the rows of an HDF5 file into a mutable index."""
    parser.add_argument("--index", required=True, help="the mutable index directory")
    parser.add_argument("--embeddings", required=True,
                        help=f"HDF5 file whose 'embedding' [N, D] holds {what}")
    ids = parser.add_mutually_exclusive_group()
    ids.add_argument("--ids_from", choices=ID_SOURCES.names(), default="next",
                     help="next: the ids after every id the index has held (0 .. N-1 in a new index); "
                          "label: each row's 'label' (default: %(default)s)")
    ids.add_argument("--ids_file", default=None,
                     help="file of one id per row, separated by commas or white space")
    deprecated_alias(parser, "--ids-from", "--ids_from")
    deprecated_alias(parser, "--ids-file", "--ids_file")
    parser.add_argument("--zero_threshold", type=float, default=DEFAULT_ZERO_THRESHOLD,
                        help="keep entries with |x| above it (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sparse_embed.search`: one sub-command per tool."""
    parser = make_parser(__doc__, program("sparse_embed.search"))
    commands = parser.add_subparsers(dest="command", required=True, title="sub-commands")
    _add_commands(commands)
    return parser


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """Command-line tools around the search index.

    Args:
        argv: Arguments after the program name; None reads sys.argv.
    """
    args = build_parser().parse_args(argv)
    COMMANDS.get(args.command)(args)


def run() -> None:
    """Console-script entry point."""
    main()


if __name__ == "__main__":
    run()
