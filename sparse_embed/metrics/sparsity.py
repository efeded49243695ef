"""Sparsity statistics of embeddings in NumPy, and `python -m sparse_embed.evaluate sparsity`.

Paria et al., "Minimizing FLOPs to Learn Efficient Sparse Representations"
(ICLR 2020). With p_j the fraction of embeddings whose dimension j is non-zero
(|e_ij| above a zero threshold):

- `nnz`: mean non-zeros per embedding, sum_j p_j;
- `flops`: expected multiply-adds of one (query, database) inner product in an
  inverted index, sum_j p_j^2 (an N-row gallery costs N times that per query);
- `r_sub`: d * sum_j p_j^2 / (sum_j p_j)^2 >= 1, how far the non-zeros are from
  evenly spread over the d dimensions (1: even; defined as 0 when every entry
  is zero);
- `zero_embeddings`: fraction of embeddings with no non-zero at all (they
  match nothing in an inverted index).

    python -m sparse_embed.evaluate sparsity --embeddings=dense.hdf5,sparse.hdf5 \\
        --output=sparsity.json --plot=sparsity.png

The statistics have one definition (`stats_from_fractions`), shared with the
TensorFlow version that training logs (`sparse_embed.sparsity.sparsity_stats`).
This module imports NumPy (and h5py, matplotlib for the command) only.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sparse_embed.cli import examples, format_results, make_parser, user_errors_exit
from sparse_embed.config import SparsityConfig
from sparse_embed.errors import ConfigError, DataError

# Lower bound of nnz^2 in the R_sub denominator: it only matters when every
# entry is zero (then FLOPs is 0 too and R_sub is defined as 0); any non-zero
# batch of fewer than 1e19 vectors has nnz^2 >= 1 / B^2 far above it.
_TINY = float(np.finfo(np.float32).tiny)

# The threshold training summaries use, so a file's figures match its run's logs.
DEFAULT_ZERO_THRESHOLD = SparsityConfig.zero_threshold


def stats_from_fractions(p: Any, d: Any, reduce_sum: Callable[[Any], Any],
                         maximum: Callable[[Any, Any], Any]) -> dict[str, Any]:
    """nnz, FLOPs and R_sub from the per-dimension non-zero fractions p [d].

    Written once for both backends: `reduce_sum` and `maximum` are NumPy's or
    TensorFlow's.

    Args:
        p: Fraction of embeddings whose dimension j is non-zero, [d].
        d: The dimension d, as a scalar of the backend.
        reduce_sum: Sums all entries of an array.
        maximum: Element-wise maximum of two arrays.

    Returns:
        Scalars keyed `nnz`, `flops`, `r_sub`.
    """
    nnz = reduce_sum(p)
    flops = reduce_sum(p * p)
    r_sub = d * flops / maximum(nnz * nnz, _TINY)
    return {"nnz": nnz, "flops": flops, "r_sub": r_sub}


class SparsityAccumulator:
    """Sparsity statistics of many embeddings, accumulated chunk by chunk in NumPy.

    Keeps one non-zero count per dimension, so an embedding file far larger
    than memory is measured exactly by streaming it through `update`.

    Args:
        zero_threshold: Entries with |e_ij| at or below it count as zero.
    """

    def __init__(self, zero_threshold: float) -> None:
        self.zero_threshold = zero_threshold
        self.count = 0
        self._nonzero: np.ndarray | None = None

    def update(self, chunk: np.ndarray) -> None:
        """Adds a chunk of embeddings.

        Args:
            chunk: [n, d] array (any real dtype); d must match earlier chunks.

        Raises:
            ValueError: If the chunk is not 2-D or its d differs from earlier chunks'.
        """
        chunk = np.asarray(chunk)
        if chunk.ndim != 2:
            raise ValueError(f"embeddings must be a 2-D [n, d] array, got shape {chunk.shape}")
        if self._nonzero is None:
            self._nonzero = np.zeros(chunk.shape[1], dtype=np.int64)
        elif chunk.shape[1] != self._nonzero.shape[0]:
            raise ValueError(
                f"embedding chunk has d={chunk.shape[1]}, earlier chunks d={self._nonzero.shape[0]}"
            )
        self._nonzero += np.count_nonzero(np.abs(chunk) > self.zero_threshold, axis=0)
        self.count += chunk.shape[0]

    def result(self) -> dict[str, float]:
        """Returns `nnz`, `flops` and `r_sub` of everything added (see the module docstring).

        Raises:
            ValueError: If no embedding was added.
        """
        if self._nonzero is None or self.count == 0:
            raise ValueError("no embeddings were added to the SparsityAccumulator")
        p = self._nonzero / self.count
        stats = stats_from_fractions(p, p.size, np.sum, np.maximum)
        return {name: float(value) for name, value in stats.items()}


def sparsity_stats_np(embeddings: np.ndarray, zero_threshold: float) -> dict[str, float]:
    """`nnz`, `flops` and `r_sub` of an in-memory array (see the module docstring).

    Args:
        embeddings: [n, d] array, n >= 1.
        zero_threshold: Entries with |e_ij| at or below it count as zero.

    Returns:
        Floats keyed `nnz`, `flops`, `r_sub`.
    """
    accumulator = SparsityAccumulator(zero_threshold)
    accumulator.update(embeddings)
    return accumulator.result()


@dataclass(frozen=True)
class SparsityProfile:
    """Where the non-zeros of a set of embeddings are: per embedding and per dimension.

    Attributes:
        nnz_per_embedding: int64 [N], non-zeros of each embedding.
        nonzero_fraction: float64 [d], p_j: fraction of embeddings non-zero in dimension j.
    """

    nnz_per_embedding: np.ndarray
    nonzero_fraction: np.ndarray

    def stats(self) -> dict[str, float]:
        """`nnz`, `flops`, `r_sub`, `zero_embeddings` (module docstring), `dim` and `embeddings`."""
        p = self.nonzero_fraction
        stats = {name: float(v) for name, v in stats_from_fractions(p, p.size, np.sum, np.maximum).items()}
        stats["zero_embeddings"] = float(np.mean(self.nnz_per_embedding == 0))
        stats["dim"] = float(p.size)
        stats["embeddings"] = float(len(self.nnz_per_embedding))
        return stats


def sparsity_profile(embeddings: np.ndarray, zero_threshold: float = DEFAULT_ZERO_THRESHOLD
                     ) -> SparsityProfile:
    """Counts the non-zeros of every embedding and every dimension.

    Args:
        embeddings: Real [N, d], N >= 1.
        zero_threshold: Entries with |e_ij| at or below it count as zero; >= 0.

    Raises:
        DataError: If `embeddings` is not a non-empty real [N, d] array.
        ConfigError: If the threshold is negative or not finite.
    """
    if not (np.isfinite(zero_threshold) and zero_threshold >= 0):
        raise ConfigError(f"--zero_threshold must be a finite number >= 0, got {zero_threshold}")
    e = np.asarray(embeddings)
    if e.dtype.kind not in "fiub" or e.ndim != 2 or e.shape[0] == 0 or e.shape[1] == 0:
        raise DataError(f"embeddings must be a non-empty real [N, d] array, got {e.dtype} {list(e.shape)}")
    nonzero = np.abs(e) > zero_threshold
    return SparsityProfile(nnz_per_embedding=nonzero.sum(axis=1, dtype=np.int64),
                           nonzero_fraction=nonzero.mean(axis=0, dtype=np.float64))


def run_names(paths: Sequence[str]) -> list[str]:
    """Short names of embedding files for tables and legends: the file stem, or the path if stems repeat.

    Args:
        paths: The files, in the order given.
    """
    stems = [Path(p).stem for p in paths]
    return stems if len(set(stems)) == len(stems) else [str(p) for p in paths]


def split_paths(value: str) -> list[str]:
    """The files of a comma-separated `--embeddings` value.

    Args:
        value: `a.hdf5[,b.hdf5...]`.

    Raises:
        ConfigError: If it names no file.
    """
    paths = [p.strip() for p in value.split(",") if p.strip()]
    if not paths:
        raise ConfigError("--embeddings needs at least one HDF5 file (a comma-separated list compares runs)")
    return paths


DESCRIPTION = ("Sparsity of embedding files: mean nnz, FLOPs per pair, R_sub, all-zero "
               "embeddings; histogram of nnz per embedding and p_j per dimension.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declares the options of `evaluate sparsity` on `parser`.

    Args:
        parser: The sub-command's parser.
    """
    parser.add_argument("--embeddings", required=True,
                        help="HDF5 file(s) written by sparse_embed.embed, comma-separated to compare runs.")
    parser.add_argument("--zero_threshold", type=float, default=DEFAULT_ZERO_THRESHOLD,
                        help="|e| at or below it counts as zero (default: %(default)s, as in training).")
    parser.add_argument("--output", help="JSON file of the statistics, one entry per file.")
    parser.add_argument("--plot", help="PNG of the two panels; default: beside --output (.sparsity.png).")


def run_command(args: argparse.Namespace) -> None:
    """Runs `evaluate sparsity`: prints the table, writes JSON and the plot.

    Args:
        args: The options `add_arguments` declares, parsed.
    """
    from sparse_embed.data.embeddings import read_hdf5
    from sparse_embed.fileio import atomic_path

    paths = split_paths(args.embeddings)
    profiles = {}
    for name, path in zip(run_names(paths), paths, strict=True):
        embedding = read_hdf5(path).embedding
        try:
            profiles[name] = sparsity_profile(embedding, args.zero_threshold)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None
    stats = {name: profile.stats() for name, profile in profiles.items()}
    print(format_results(stats), end="")
    print(f"zero_threshold: {args.zero_threshold:g}")
    if args.output:
        records = {name: {"file": path, "zero_threshold": args.zero_threshold, **s}
                   for (name, s), path in zip(stats.items(), paths, strict=True)}
        with atomic_path(args.output) as tmp:
            tmp.write_text(json.dumps(records, indent=2) + "\n")
    plot = args.plot or (Path(args.output).with_suffix(".sparsity.png") if args.output else None)
    if plot:
        from sparse_embed.plots import plot_sparsity

        plot_sparsity({name: (p.nnz_per_embedding, p.nonzero_fraction) for name, p in profiles.items()},
                      plot)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sparse_embed.evaluate sparsity`."""
    parser = make_parser(f"{DESCRIPTION}\n\n{examples(__doc__)}",
                         "python -m sparse_embed.evaluate sparsity")
    add_arguments(parser)
    return parser


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """`python -m sparse_embed.evaluate sparsity ...`.

    Args:
        argv: Arguments after the sub-command; None reads sys.argv.
    """
    run_command(build_parser().parse_args(argv))
