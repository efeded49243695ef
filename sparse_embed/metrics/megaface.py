"""MegaFace challenge 1 protocols: queries and database, rank-1, the search binary's `.bin` files.

    python -m sparse_embed.metrics.megaface split-bins --protocol=facescrub \\
        --megaface=megaface_RUN.hdf5 --facescrub=facescrub_RUN.hdf5 --output=data/megaface

The HDF5 files are the embedded manifests of `sparse_embed.data.megaface` (written by
`python -m sparse_embed.embed --manifest=<set>.tsv`).

Protocols (`query_database_split`), over the rows of the two HDF5 files taken together:

    facescrub   MegaFace challenge 1 (`runfacescrub`). The database is every MegaFace row.
                The queries are the FaceScrub rows whose identity has at least two rows; each
                query's gallery is the other rows of its identity. A trial is a (query, gallery
                row) pair: the gallery row is added to the database alone and ranked among the
                distractors. An identity of n rows gives n (n - 1) trials.
    megaface    The original sparse-embed `runmegaface`: queries drawn from the MegaFace
                identities themselves. Of the identities with at least two MegaFace rows,
                `num_queries` are drawn (seeded), one row of each becomes a query; the database
                is every other MegaFace row, so each query's identity stays in it. One trial
                per query: its best-scoring identity row in the database. FaceScrub rows are
                not used.

Rank of a trial: 1 + the number of database rows of other identities scoring strictly higher
(inner product) than its match. `split_bins` writes a split as the `.bin` pair the search
binary reads (queries, database; see search/Makefile): FaceScrub distractor rows carry label -1
there, as no FaceScrub query can match them.
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparse_embed.cli import add_command, deprecated_alias, examples, make_parser, program, user_errors_exit
from sparse_embed.data import format_summary
from sparse_embed.errors import ConfigError, DataError
from sparse_embed.fileio import atomic_path
from sparse_embed.registry import Registry

# Queries the search binary takes from one file by default (search/cli.cpp), and so `megaface`'s.
DEFAULT_NUM_QUERIES = 10000
# Database rows scored against all queries at once by `rank1`.
_SCORE_CHUNK_ROWS = 4096


@dataclass(frozen=True, eq=False)
class Split:
    """Queries and database of a protocol, as row indices (see the module docstring).

    Attributes:
        protocol: The protocol's name.
        queries: int64 [Q] query rows, ascending.
        database: int64 [M] rows every query is searched against, ascending.
        gallery: Per query, int64 rows added to its database one at a time (`facescrub`);
            empty arrays where the database already holds the query's identity (`megaface`).
    """

    protocol: str
    queries: np.ndarray
    database: np.ndarray
    gallery: tuple[np.ndarray, ...]

    @property
    def num_trials(self) -> int:
        """Trials `rank1` counts: gallery rows, or one per query where there are none."""
        return sum(max(len(g), 1) for g in self.gallery)


PROTOCOLS: Registry[Callable[[np.ndarray, np.ndarray, int, int], Split]] = Registry("MegaFace protocol")


def _rows_by_label(rows: np.ndarray, labels: np.ndarray) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for row in rows:
        groups[int(labels[row])].append(int(row))
    return groups


@PROTOCOLS.register("facescrub")
def _facescrub(labels: np.ndarray, sets: np.ndarray, num_queries: int, seed: int) -> Split:
    del num_queries, seed  # every probe takes part
    groups = _rows_by_label(np.flatnonzero(sets == "facescrub"), labels)
    queries, gallery = [], []
    for rows in groups.values():
        if len(rows) < 2:
            continue
        for row in rows:
            queries.append(row)
            gallery.append(np.array([r for r in rows if r != row], np.int64))
    order = np.argsort(queries, kind="stable")
    return Split("facescrub", np.asarray(queries, np.int64)[order],
                 np.flatnonzero(sets == "megaface").astype(np.int64), tuple(gallery[i] for i in order))


@PROTOCOLS.register("megaface")
def _megaface(labels: np.ndarray, sets: np.ndarray, num_queries: int, seed: int) -> Split:
    rows = np.flatnonzero(sets == "megaface")
    groups = _rows_by_label(rows, labels)
    eligible = sorted(label for label, members in groups.items() if len(members) >= 2)
    if not eligible:
        raise DataError("the megaface protocol needs an identity with at least two MegaFace images; "
                        "none has")
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(eligible)[:num_queries]
    queries = np.sort([groups[int(label)][rng.integers(len(groups[int(label)]))] for label in chosen])
    database = np.setdiff1d(rows, queries).astype(np.int64)
    return Split("megaface", queries.astype(np.int64), database,
                 tuple(np.empty(0, np.int64) for _ in queries))


def query_database_split(labels: Sequence[int], sets: Sequence[str], protocol: str,
                         num_queries: int = DEFAULT_NUM_QUERIES, seed: int = 0) -> Split:
    """Splits embedded MegaFace and FaceScrub rows into queries and database under a protocol.

    Args:
        labels: Identity label of each row (labels are compared within a set only).
        sets: `megaface` or `facescrub`, per row.
        protocol: A name in PROTOCOLS (`facescrub`, `megaface`).
        num_queries: Queries drawn by `megaface` (fewer when fewer identities qualify).
        seed: Seed of `megaface`'s draw.

    Returns:
        The split, as indices into the rows.

    Raises:
        ConfigError: If the protocol is unknown or `num_queries` is below 1.
        DataError: If the rows leave the protocol without queries or database.
        ValueError: If `labels` and `sets` differ in length.
    """
    make = PROTOCOLS.get(protocol)
    if num_queries < 1:
        raise ConfigError(f"num_queries must be >= 1, got {num_queries}")
    labels_array, sets_array = np.asarray(labels, np.int64), np.asarray(sets, dtype=str)
    if labels_array.shape != sets_array.shape or labels_array.ndim != 1:
        raise ValueError(f"need one set per label, got {labels_array.shape} and {sets_array.shape}")
    split = make(labels_array, sets_array, num_queries, seed)
    if not len(split.queries) or not len(split.database):
        raise DataError(f"the {protocol} protocol finds {len(split.queries)} queries and "
                        f"{len(split.database)} database rows in these embeddings; it needs both "
                        f"(facescrub: FaceScrub identities with two or more images and MegaFace rows)")
    return split


def rank1(split: Split, embedding: np.ndarray, labels: Sequence[int]) -> float:
    """Rank-1 identification rate of a split: the share of trials no other identity outscores.

    Args:
        split: The protocol's split.
        embedding: float [N, D], one row per row the split indexes.
        labels: Identity label of each row.
    """
    emb = np.asarray(embedding, np.float32)
    labels = np.asarray(labels, np.int64)
    queries = emb[split.queries]
    # megaface: the database holds the query's identity, whose rows are matches, not competitors.
    same = labels[split.queries] if split.protocol == "megaface" else None
    best_other = np.full(len(queries), -np.inf, np.float32)
    for start in range(0, len(split.database), _SCORE_CHUNK_ROWS):
        rows = split.database[start:start + _SCORE_CHUNK_ROWS]
        scores = queries @ emb[rows].T
        if same is not None:
            scores[same[:, None] == labels[rows][None, :]] = -np.inf
        best_other = np.maximum(best_other, scores.max(axis=1))
    if same is None:
        # Each gallery row joins the distractors alone: a hit when none of them outscores it.
        hits = sum(int((emb[g] @ q >= b).sum())
                   for g, q, b in zip(split.gallery, queries, best_other, strict=True))
    else:
        hits = 0
        for label in np.unique(same):
            at = np.flatnonzero(same == label)
            members = split.database[labels[split.database] == label]
            best_match = (queries[at] @ emb[members].T).max(axis=1)
            hits += int((best_match >= best_other[at]).sum())
    return hits / split.num_trials


def split_bins(split: Split, embedding: np.ndarray, labels: Sequence[int], output: str | os.PathLike,
               zero_threshold: float | None = None, dense: bool = False) -> dict[str, object]:
    """Writes a split as `<output>/<protocol>_queries.bin` and `<protocol>_database.bin`.

    Args:
        split: The protocol's split.
        embedding: float [N, D], one row per row the split indexes.
        labels: Identity label of each row.
        output: Output folder.
        zero_threshold: Entries with |x| at or below it are left out; None: the search default.
        dense: Also write the rows as float32 `.npy` (for the search binary's dense re-ranking).

    Returns:
        Summary: the files written, queries, database rows, trials.
    """
    from sparse_embed.search import DEFAULT_ZERO_THRESHOLD, write_bin

    threshold = DEFAULT_ZERO_THRESHOLD if zero_threshold is None else zero_threshold
    labels = np.asarray(labels, np.int64)
    database_labels = labels[split.database]
    if split.protocol == "facescrub":
        database_labels = np.full(len(split.database), -1, np.int64)
    files = {}
    for part, rows, part_labels in (("queries", split.queries, labels[split.queries]),
                                    ("database", split.database, database_labels)):
        path = Path(output) / f"{split.protocol}_{part}.bin"
        write_bin(path, np.asarray(embedding[rows], np.float32), part_labels, threshold)
        files[part] = str(path)
        if dense:
            npy = path.with_suffix(".npy")
            with atomic_path(npy) as tmp, open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(embedding[rows], np.float32))
            files[f"{part} dense"] = str(npy)
    return {**files, "num_queries": len(split.queries), "database_rows": len(split.database),
            "trials": split.num_trials}


def _read_embeddings(paths: dict[str, str | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenates the HDF5 files of the sets given: (embedding, labels, sets)."""
    import h5py

    embeddings, labels, sets = [], [], []
    for image_set, path in paths.items():
        if not path:
            continue
        if not Path(path).is_file():
            raise DataError(f"embedding file {path} not found; write it with "
                            f"python -m sparse_embed.embed --manifest")
        try:
            with h5py.File(path, "r") as f:
                embeddings.append(np.asarray(f["embedding"][:], np.float32))
                labels.append(np.asarray(f["label"][:], np.int64))
        except (OSError, KeyError) as e:
            raise DataError(f"{path} is not an embedding HDF5 file with 'embedding' and 'label' "
                            f"({' '.join(str(e).split())}); write it with sparse_embed.embed") from None
        sets.append(np.full(len(labels[-1]), image_set))
    dims = {e.shape[1] for e in embeddings if e.ndim == 2}
    shapes_ok = all(e.ndim == 2 and len(e) == len(y) for e, y in zip(embeddings, labels, strict=True))
    if len(dims) != 1 or not shapes_ok:
        raise DataError(f"the embedding files must hold [N, D] embeddings with one label per row "
                        f"and one D (got dims {sorted(dims)}); embed both sets with the same model")
    return np.concatenate(embeddings), np.concatenate(labels), np.concatenate(sets)


def build_parser() -> argparse.ArgumentParser:
    """The parser of `python -m sparse_embed.metrics.megaface`."""
    parser = make_parser(f"MegaFace / FaceScrub protocol tools.\n\n{examples(__doc__)}", program(__name__))
    commands = parser.add_subparsers(dest="command", required=True, title="sub-commands")
    bins = add_command(commands, "split-bins", "Embeddings -> a protocol's query and database .bin.",
                       prog=f"{parser.prog} split-bins")
    bins.add_argument("--protocol", required=True, choices=PROTOCOLS.names())
    bins.add_argument("--megaface", required=True, help="HDF5 embeddings of the MegaFace manifest.")
    bins.add_argument("--facescrub", help="HDF5 embeddings of the FaceScrub manifest (facescrub).")
    bins.add_argument("--output", required=True, help="Folder for <protocol>_{queries,database}.bin.")
    bins.add_argument("--num_queries", type=int, default=DEFAULT_NUM_QUERIES,
                      help="Queries drawn by the megaface protocol.")
    bins.add_argument("--seed", type=int, default=0, help="Seed of the megaface protocol's draw.")
    bins.add_argument("--zero_threshold", type=float, default=None,
                      help="Leave out entries with |x| at or below it (default: the search default).")
    deprecated_alias(bins, "--threshold", "--zero_threshold")
    bins.add_argument("--write_dense", action="store_true",
                      help="Also write float32 .npy for re-ranking.")
    deprecated_alias(bins, "--dense", "--write_dense")
    return parser


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """`python -m sparse_embed.metrics.megaface split-bins ...`.

    Args:
        argv: Arguments without the program name; None reads sys.argv.
    """
    args = build_parser().parse_args(argv)
    if args.protocol == "facescrub" and not args.facescrub:
        raise ConfigError("--protocol=facescrub needs --facescrub (the probes' HDF5 file)")
    embedding, labels, sets = _read_embeddings(
        {"megaface": args.megaface, "facescrub": args.facescrub})
    split = query_database_split(labels, sets, args.protocol, args.num_queries, args.seed)
    summary = split_bins(split, embedding, labels, args.output, args.zero_threshold, args.write_dense)
    summary["rank-1"] = f"{rank1(split, embedding, labels):.4f}"
    print(format_summary(f"{args.protocol} protocol", list(summary.items())))


def run() -> None:
    """Console-script entry point."""
    main()


if __name__ == "__main__":
    run()
