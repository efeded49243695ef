"""Identification with distractors (MegaFace challenge 1): CMC and Recall@K, sparse, dense, re-ranked.

    python -m sparse_embed.evaluate identification --probes=facescrub_RUN.hdf5 \\
        --distractors=megaface_RUN.hdf5 --dense_probes=facescrub_DENSE.hdf5 \\
        --dense_distractors=megaface_DENSE.hdf5 --score_threshold=0.25 --rerank_topk=1000
    # the original's file convention: DIR/{facescrub,megaface}_<suffix>
    python -m sparse_embed.evaluate identification --embeddings_dir=DIR \\
        --sparse_suffix=sparse_RUN.hdf5 --dense_suffix=dense_RUN.hdf5

Trials are those of the `facescrub` protocol of `sparse_embed.metrics.megaface.query_database_split`:
every probe image of an identity with two or more images is a query in turn, each other image
of its identity is the genuine match, alone among the distractors, so an identity of n images
gives n (n - 1) trials (identities with one image are skipped and counted). The rank of a trial
is 1 + the number of distractors that outscore the genuine strictly; the identification rate at
rank r (the CMC) and Recall@r are the share of trials of rank r or better. Each distractor
count N below the full set is a seeded random subset, every smaller subset inside the larger.

Methods, each one row per distractor count:

    sparse          the C++ `SparseIndex` over the distractors: each query is searched once for
                    its top max(ranks) rows scoring strictly above `threshold` (None: every row),
                    and the genuine's score is compared with theirs. A genuine at or below the
                    threshold is not retrieved: a miss at every rank.
    dense           exact inner products of the dense embeddings (NumPy, in chunks); no threshold.
    sparse+rerank   the original's re-ranking: the candidates are the genuine (when it scores
                    above the threshold) and the distractors above it, the best `rerank_topk` of
                    them by sparse score are kept (the genuine wins ties), re-scored by the inner
                    product of the dense embeddings of the same images, and the genuine is ranked
                    among them. A genuine that is not a candidate is a miss at every rank. This is
                    `SparseIndex.search(..., rerank=(dense_db, dense_q), rerank_k=rerank_topk)`
                    with the genuine inserted into the index ahead of the distractors.

`dense` and `sparse+rerank` need the dense embeddings of the same images (same rows, same
order); without them, embeddings with no entry at or below `zero_threshold` are scored as
`dense` alone. Rows carry the sparse search's measured `ms_per_query` (one thread),
`postings_per_query` (the paper's FLOPs) and `candidates_per_query` (distractors above the
threshold); `sparse+rerank` times the index's own search with re-ranking. `dense` has NaN there.

The genuine's scores are float64 inner products rounded to float32 (as
`sparse_embed.search.brute_force_search` computes them), the dense scan's float32 NumPy
products, the distractors' sparse and re-ranked scores the index's float32 accumulation: these
can differ in the last bit, so a tie goes to the genuine reliably only where scores are exact.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sparse_embed.cli import deprecated_alias, examples, format_results, make_parser, user_errors_exit
from sparse_embed.data.embeddings import Embeddings, read_hdf5
from sparse_embed.data.megaface import SIZES
from sparse_embed.errors import ConfigError, DataError
from sparse_embed.fileio import atomic_path
from sparse_embed.metrics.megaface import query_database_split
from sparse_embed.search import DEFAULT_ZERO_THRESHOLD, SparseIndex

DEFAULT_RANKS = (1, 10, 50, 100)
DEFAULT_THRESHOLD = 0.25
DEFAULT_RERANK_TOPK = 1000
SPARSE, DENSE, RERANK = "sparse", "dense", "sparse+rerank"
# File names of the original's directory convention: <set>_<suffix>.
PROBE_SET, DISTRACTOR_SET = "facescrub", "megaface"
# Rank of a trial whose genuine is not retrieved (or beyond the ranks searched).
MISS = np.iinfo(np.int64).max
# Bound on the elements of one temporary (gathered rows, comparisons): 128 MiB of float64.
_CHUNK_ELEMENTS = 1 << 24
# Distractor rows scored against every query at once by the dense scan.
_DENSE_CHUNK_ROWS = 8192

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Trials:
    """The (query, genuine) pairs of the probes, and the probe images searched.

    Attributes:
        queries: int64 [Q] probe rows that are queries (identities with two or more images).
        query: int64 [T] each trial's query, as a position in `queries`.
        genuine: int64 [T] each trial's genuine match, as a probe row.
        identities: Probe identities with two or more images.
        skipped: Probe identities with a single image, left out.
    """

    queries: np.ndarray
    query: np.ndarray
    genuine: np.ndarray
    identities: int
    skipped: int


def probe_trials(labels: np.ndarray, num_distractors: int, name: str = "probes") -> Trials:
    """The facescrub protocol's trials over probe labels (see the module docstring).

    Args:
        labels: int [P] identity of each probe image.
        num_distractors: Distractor rows (>= 1); they do not change the trials.
        name: What the probes are called in error messages (their file).

    Raises:
        DataError: If no identity has two or more images.
    """
    labels = np.asarray(labels, np.int64)
    sizes = _identity_sizes(labels, name)
    skipped = sum(1 for n in sizes.values() if n < 2)
    sets = np.concatenate([np.full(len(labels), PROBE_SET), np.full(num_distractors, DISTRACTOR_SET)])
    split = query_database_split(np.concatenate([labels, np.full(num_distractors, -1)]), sets, PROBE_SET)
    query = np.repeat(np.arange(len(split.queries), dtype=np.int64), [len(g) for g in split.gallery])
    genuine = np.concatenate(split.gallery).astype(np.int64)
    return Trials(split.queries, query, genuine, len(sizes) - skipped, skipped)


def _identity_sizes(labels: np.ndarray, name: str) -> Counter[int]:
    """Images per probe identity; DataError if none has two."""
    sizes = Counter(np.asarray(labels).tolist())
    if all(n < 2 for n in sizes.values()):
        raise DataError(f"{name}: none of its {len(sizes)} identities has two or more images, so no "
                        f"probe has a genuine match; give some identities several probe images")
    return sizes


def check_inputs(probes: Embeddings, distractors: Embeddings, dense_probes: Embeddings | None = None,
                 dense_distractors: Embeddings | None = None,
                 names: Mapping[str, str] | None = None) -> None:
    """Checks that the embeddings can be evaluated together.

    Args:
        probes: Probe embeddings with identity labels.
        distractors: Distractor embeddings.
        dense_probes: Dense embeddings of the probe images, or None.
        dense_distractors: Dense embeddings of the distractor images, or None.
        names: Role (`probes`, `distractors`, `dense_probes`, `dense_distractors`) -> what to call
            it in messages (its file); the role itself where absent.

    Raises:
        ConfigError: If only one of the dense sets is given.
        DataError: On an empty set, unlabelled probes, non-finite values, different dimensions
            within a pair of sets, probes without an identity of two images, or dense and sparse
            sets that do not hold the same images.
    """
    names = dict(names or {})
    sets = {"probes": probes, "distractors": distractors, "dense_probes": dense_probes,
            "dense_distractors": dense_distractors}
    label = {role: names.get(role, role) for role in sets}
    if (dense_probes is None) != (dense_distractors is None):
        raise ConfigError("dense re-ranking needs both --dense_probes and --dense_distractors (or "
                          "--dense_suffix), got one")
    for role, e in sets.items():
        if e is None:
            continue
        if not len(e.embedding):
            what = "distractor set" if "distractors" in role else "probe set"
            raise DataError(f"{label[role]} holds no embeddings: the {what} is empty; embed its images "
                            f"with python -m sparse_embed.embed")
        if not _all_rows(e.embedding, np.isfinite):
            raise DataError(f"{label[role]} holds non-finite embeddings; re-embed it")
    if (probes.label < 0).any():
        raise DataError(f"{label['probes']}: {int((probes.label < 0).sum())} probe images have no identity "
                        f"label (-1); embed the probes from a folder per identity or a manifest")
    for a, b in (("probes", "distractors"), ("dense_probes", "dense_distractors")):
        if sets[a] is not None and sets[a].embedding.shape[1] != sets[b].embedding.shape[1]:
            raise DataError(f"{label[a]} holds {sets[a].embedding.shape[1]}-d embeddings but {label[b]} "
                            f"{sets[b].embedding.shape[1]}-d; embed both with the same run")
    _identity_sizes(probes.label, label["probes"])
    for sparse, dense in (("probes", "dense_probes"), ("distractors", "dense_distractors")):
        if sets[dense] is not None:
            _check_same_images(sets[sparse], sets[dense], label[sparse], label[dense])


def _all_rows(x: np.ndarray, predicate: Callable[[np.ndarray], np.ndarray]) -> bool:
    """Whether `predicate` holds for every entry of x, checked a block of rows at a time."""
    # A million distractors would otherwise need temporaries of their full size.
    step = max(1, _CHUNK_ELEMENTS // max(x.shape[1], 1))
    return all(bool(predicate(x[start:start + step]).all()) for start in range(0, len(x), step))


def _check_same_images(a: Embeddings, b: Embeddings, name_a: str, name_b: str) -> None:
    """DataError unless `a` and `b` hold the same images (file names, labels) in the same order."""
    fix = "embed both from the same image folder or manifest"
    if len(a.embedding) != len(b.embedding):
        raise DataError(f"{name_a} has {len(a.embedding)} rows but {name_b} {len(b.embedding)}: they must "
                        f"hold the same images in the same order; {fix}")
    if a.filename and b.filename and a.filename != b.filename:
        row = next(i for i, (x, y) in enumerate(zip(a.filename, b.filename, strict=True)) if x != y)
        raise DataError(f"{name_a} and {name_b} do not hold the same images in the same order (row {row}: "
                        f"{a.filename[row]!r} against {b.filename[row]!r}); {fix}")
    if bool(a.filename) != bool(b.filename) or not np.array_equal(a.label, b.label):
        raise DataError(f"{name_a} and {name_b} disagree on {'labels' if a.filename else 'file names'}, "
                        f"so their rows cannot be matched image by image; {fix}")


def default_distractor_counts(total: int) -> list[int]:
    """The devkit's counts (10, 100, 1k, ...) below `total`, then `total` itself.

    Args:
        total: Distractors available.
    """
    return [c for c in SIZES if c < total] + [total]


def distractor_subsets(total: int, counts: Sequence[int], seed: int = 0) -> dict[int, np.ndarray]:
    """The distractor rows of each count: sorted, seeded, every smaller subset inside the larger.

    Args:
        total: Distractors available.
        counts: Subset sizes, each in [1, total].
        seed: Seed of the draw.

    Returns:
        Count -> int64 sorted distractor rows (all rows for `total`).
    """
    order = np.random.default_rng(seed).permutation(total)
    return {c: np.arange(total) if c == total else np.sort(order[:c]) for c in counts}


def _check_options(ranks: Sequence[int], counts: Sequence[int], total: int, threshold: float | None,
                   rerank_topk: int, zero_threshold: float, num_threads: int) -> None:
    def is_int(x: Any) -> bool:
        return isinstance(x, int | np.integer) and not isinstance(x, bool)

    if not ranks or not all(is_int(r) and r >= 1 for r in ranks):
        raise ConfigError(f"--ranks must be integers >= 1, got {list(ranks)}")
    if not counts or not all(is_int(c) and 1 <= c <= total for c in counts):
        raise ConfigError(f"--distractor_counts must be integers in [1, {total}] (the distractors "
                          f"available), got {list(counts)}")
    if threshold is not None and not math.isfinite(threshold):
        raise ConfigError(f"--threshold must be a finite number or none, got {threshold}")
    if not is_int(rerank_topk) or rerank_topk < 1:
        raise ConfigError(f"--rerank_topk must be an integer >= 1, got {rerank_topk}")
    if not zero_threshold >= 0:
        raise ConfigError(f"--zero_threshold must be >= 0, got {zero_threshold}")
    if not is_int(num_threads) or num_threads < 0:
        raise ConfigError(f"--num_threads must be >= 0 (0: every core), got {num_threads}")


def _rowwise_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 [n] inner products of the rows of a and b [n, d], computed in float64."""
    return np.einsum("ij,ij->i", a.astype(np.float64), b.astype(np.float64)).astype(np.float32)


def _pair_scores(queries: np.ndarray, gallery: np.ndarray, qi: np.ndarray, gi: np.ndarray) -> np.ndarray:
    """float32 [T] scores of queries[qi[t]] against gallery[gi[t]], in chunks."""
    out = np.empty(len(qi), np.float32)
    step = max(1, _CHUNK_ELEMENTS // max(queries.shape[1], 1))
    for start in range(0, len(qi), step):
        part = slice(start, start + step)
        out[part] = _rowwise_dot(queries[qi[part]], gallery[gi[part]])
    return out


def _count_above(top: np.ndarray, query: np.ndarray, genuine: np.ndarray) -> np.ndarray:
    """int64 [T]: how many of the scores top[query[t]] exceed genuine[t] strictly."""
    out = np.empty(len(query), np.int64)
    step = max(1, _CHUNK_ELEMENTS // max(top.shape[1], 1))
    for start in range(0, len(query), step):
        part = slice(start, start + step)
        out[part] = (top[query[part]] > genuine[part, None]).sum(axis=1)
    return out


def _keep_top(scores: np.ndarray, k: int) -> np.ndarray:
    """The k largest scores of each row (unordered), padded with -inf to k columns."""
    if scores.shape[1] > k:
        return np.partition(scores, scores.shape[1] - k, axis=1)[:, -k:]
    pad = np.full((len(scores), k - scores.shape[1]), -np.inf, np.float32)
    return np.concatenate([scores, pad], axis=1)


def _dense_top_scores(queries: np.ndarray, database: np.ndarray, subsets: Mapping[int, np.ndarray],
                      k: int) -> dict[int, np.ndarray]:
    """For each count, the top-k dense scores [Q, k] of every query among its subset's rows.

    One pass over the distractors: each subset adds its rows that the smaller one lacks.
    """
    top = np.full((len(queries), k), -np.inf, np.float32)
    out: dict[int, np.ndarray] = {}
    seen = np.zeros(len(database), bool)
    for count in sorted(subsets):
        new = subsets[count][~seen[subsets[count]]]
        seen[new] = True
        for start in range(0, len(new), _DENSE_CHUNK_ROWS):
            block = queries @ database[new[start:start + _DENSE_CHUNK_ROWS]].T
            top = _keep_top(np.concatenate([top, block.astype(np.float32)], axis=1), k)
        out[count] = top.copy()
    return out


def _ranks_sparse(top_scores: np.ndarray, trials: Trials, genuine: np.ndarray,
                  threshold: np.float32 | None) -> np.ndarray:
    """Trial ranks from each query's top-k sparse distractor scores (above the threshold)."""
    higher = _count_above(top_scores, trials.query, genuine)
    retrieved = higher < top_scores.shape[1]
    if threshold is not None:
        retrieved &= genuine > threshold
    return np.where(retrieved, higher + 1, MISS)


def _ranks_rerank(sparse_ids: np.ndarray, sparse_scores: np.ndarray, dense_ids: np.ndarray,
                  dense_scores: np.ndarray, trials: Trials, genuine_sparse: np.ndarray,
                  genuine_dense: np.ndarray, threshold: np.float32 | None) -> np.ndarray:
    """Trial ranks after dense re-scoring of each query's best R candidates.

    Args:
        sparse_ids: int64 [Q, R] index rows of each query's top R distractors by sparse score.
        sparse_scores: float32 [Q, R] their sparse scores (-inf past the last).
        dense_ids: int64 [Q, R] the same rows, re-ranked by dense score (the index's re-ranking).
        dense_scores: float32 [Q, R] their dense scores.
        trials: The trials.
        genuine_sparse: float32 [T] sparse score of each trial's genuine.
        genuine_dense: float32 [T] dense score of each trial's genuine.
        threshold: The sparse threshold (float32) or None.
    """
    topk = sparse_ids.shape[1]
    # The genuine takes one of the R places: it is kept when fewer than R distractors outscore it,
    # and then competes with the best R - 1 of them, which leaves out the R-th by sparse score.
    candidate = _count_above(sparse_scores, trials.query, genuine_sparse) < topk
    if threshold is not None:
        candidate &= genuine_sparse > threshold
    last = sparse_ids[:, -1:]
    competing = np.where((dense_ids == last) & (last >= 0), -np.inf, dense_scores).astype(np.float32)
    return np.where(candidate, _count_above(competing, trials.query, genuine_dense) + 1, MISS)


def _rates(ranks: np.ndarray, upto: int) -> list[float]:
    """Identification rate at ranks 1..upto: the share of trials at that rank or better."""
    counts = np.bincount(np.minimum(ranks, upto + 1), minlength=upto + 2)[1:upto + 1]
    return (np.cumsum(counts) / max(len(ranks), 1)).tolist()


def _is_dense(*embeddings: Embeddings, zero_threshold: float) -> bool:
    return all(_all_rows(e.embedding, lambda x: np.abs(x) > zero_threshold) for e in embeddings)


def evaluate_identification(
    probes: Embeddings,
    distractors: Embeddings,
    *,
    dense_probes: Embeddings | None = None,
    dense_distractors: Embeddings | None = None,
    threshold: float | None = DEFAULT_THRESHOLD,
    rerank_topk: int = DEFAULT_RERANK_TOPK,
    ranks: Sequence[int] = DEFAULT_RANKS,
    distractor_counts: Sequence[int] | None = None,
    zero_threshold: float = DEFAULT_ZERO_THRESHOLD,
    num_threads: int = 0,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Identification rates of the probes among distractors (the protocol of the module docstring).

    Args:
        probes: Sparse (or dense) probe embeddings; labels are identities.
        distractors: Distractor embeddings of the same dimension.
        dense_probes: Dense embeddings of the probe images (same rows) for `dense` and
            `sparse+rerank`, or None.
        dense_distractors: Dense embeddings of the distractor images (same rows), or None.
        threshold: Sparse scores must exceed it to be retrieved; None retrieves every row.
        rerank_topk: Candidates re-scored with the dense embeddings per query.
        ranks: The K of the Recall@K columns.
        distractor_counts: Distractor set sizes to evaluate; None: `default_distractor_counts`.
        zero_threshold: Sparse entries with |x| at or below it are dropped by the index.
        num_threads: Search threads; 0 uses every core.
        seed: Seed of the distractor subsets.
        progress: Called with one line per distractor count; None prints nothing.

    Returns:
        A JSON-able dict: `rows` (one per method and count: `method`, `distractors`,
        `recall@<k>`, `ms_per_query`, `postings_per_query`, `candidates_per_query`, and `note`
        where the threshold retrieves no genuine), `cmc` (method -> rates at ranks 1..max(ranks)
        among the most distractors evaluated, `cmc_distractors`), `trials`, `probe_images`,
        `probe_identities`, `skipped_identities`, `threshold`, `rerank_topk`, `ranks`,
        `distractor_counts`, `methods`, `notes`.

    Raises:
        ConfigError: On invalid options.
        DataError: On inputs `check_inputs` rejects, or probes without an identity of two images.
    """
    check_inputs(probes, distractors, dense_probes, dense_distractors)
    total = len(distractors.embedding)
    counts = sorted(set(default_distractor_counts(total) if distractor_counts is None
                        else distractor_counts))
    ranks = sorted(set(ranks))
    _check_options(ranks, counts, total, threshold, rerank_topk, zero_threshold, num_threads)
    trials = probe_trials(probes.label, total)
    max_rank = ranks[-1]
    cut = None if threshold is None else np.float32(threshold)
    say = progress or (lambda line: None)

    if dense_probes is None and _is_dense(probes, distractors, zero_threshold=zero_threshold):
        methods = [DENSE]
        dense_probes, dense_distractors = probes, distractors
    else:
        methods = [SPARSE] + ([DENSE, RERANK] if dense_probes is not None else [])
    queries = np.ascontiguousarray(probes.embedding[trials.queries])
    # The genuine as the index would hold it: entries at or below zero_threshold dropped.
    gallery = np.where(np.abs(probes.embedding) > zero_threshold, probes.embedding, 0).astype(np.float32)
    genuine_sparse = _pair_scores(queries, gallery, trials.query, trials.genuine)
    subsets = distractor_subsets(total, counts, seed)
    dense_top: dict[int, np.ndarray] = {}
    if dense_probes is not None:
        query_dense = np.ascontiguousarray(dense_probes.embedding[trials.queries])
        genuine_dense = _pair_scores(query_dense, dense_probes.embedding, trials.query, trials.genuine)
        if DENSE in methods:
            dense_top = _dense_top_scores(query_dense, dense_distractors.embedding, subsets, max_rank)

    nan = math.nan
    rows_out: list[dict[str, Any]] = []
    cmc: dict[str, list[float]] = {}
    for count in counts:
        rows = subsets[count]
        results: dict[str, tuple[np.ndarray, dict[str, float]]] = {}
        started = time.perf_counter()
        if DENSE in methods:
            results[DENSE] = (_ranks_sparse(dense_top[count], trials, genuine_dense, None),
                              {"ms_per_query": nan, "postings_per_query": nan, "candidates_per_query": nan})
        if SPARSE in methods:
            database = distractors.embedding if count == total else distractors.embedding[rows]
            index = SparseIndex.from_dense(database, zero_threshold)
            _, top = index.search(queries, k=max_rank, threshold=threshold, num_threads=num_threads)
            results[SPARSE] = (_ranks_sparse(top, trials, genuine_sparse, cut), _search_stats(index))
        if RERANK in methods:
            sparse_ids, sparse_top = index.search(queries, k=rerank_topk, threshold=threshold,
                                                  num_threads=num_threads)
            # The index's own search with dense re-ranking, as a deployment runs it: it scores
            # the same R candidates, and its statistics are the row's.
            dense_db = dense_distractors.embedding if count == total else dense_distractors.embedding[rows]
            dense_ids, dense_scores = index.search(queries, k=rerank_topk, threshold=threshold,
                                                   rerank=(dense_db, query_dense), rerank_k=rerank_topk,
                                                   num_threads=num_threads)
            ranked = _ranks_rerank(sparse_ids, sparse_top, dense_ids, dense_scores, trials, genuine_sparse,
                                   genuine_dense, cut)
            results[RERANK] = (ranked, _search_stats(index))
        for method in methods:
            ranked, stats = results[method]
            rates = _rates(ranked, max_rank)
            row: dict[str, Any] = {"method": method, "distractors": count,
                                   **{f"recall@{k}": rates[k - 1] for k in ranks}, **stats}
            if method != DENSE and cut is not None and not (genuine_sparse > cut).any():
                best = float(genuine_sparse.max())
                row["note"] = (f"threshold {threshold:g} retrieves no genuine match (the best genuine "
                               f"score is {best:.4g}): every trial is a miss; lower --threshold")
            rows_out.append(row)
            if count == counts[-1]:
                cmc[method] = rates
        summary = ", ".join(f"{m} R@{ranks[0]} {_rates(results[m][0], ranks[0])[-1]:.4f}" for m in methods)
        say(f"{count} distractors: {summary} ({time.perf_counter() - started:.1f} s)")
    notes = list(dict.fromkeys(r["note"] for r in rows_out if "note" in r))
    return {
        "protocol": PROBE_SET,
        "methods": methods,
        "trials": len(trials.query),
        "probe_images": len(trials.queries),
        "probe_identities": trials.identities,
        "skipped_identities": trials.skipped,
        "distractors": total,
        "distractor_counts": counts,
        "ranks": ranks,
        "threshold": threshold,
        "rerank_topk": rerank_topk,
        "zero_threshold": zero_threshold,
        "seed": seed,
        "rows": rows_out,
        "cmc": cmc,
        "cmc_distractors": counts[-1],
        "notes": notes,
    }


def _search_stats(index: SparseIndex) -> dict[str, float]:
    stats = index.stats
    return {key: stats[key] for key in ("ms_per_query", "postings_per_query", "candidates_per_query")}


def format_table(result: Mapping[str, Any]) -> str:
    """One table: a line per method and distractor count, Recall@K, ms/query, postings/query.

    Args:
        result: What `evaluate_identification` returned.

    Returns:
        The table (`cli.format_results`), with the trial counts and any notes under it.
    """
    table: dict[str, dict[str, float | str]] = {}
    for row in result["rows"]:
        cells: dict[str, float | str] = {f"recall@{k}": row[f"recall@{k}"] for k in result["ranks"]}
        if row["method"] != DENSE:  # the dense scan is not an index search: nothing to show
            cells.update({"ms/query": row["ms_per_query"], "postings/query": row["postings_per_query"]})
        if "note" in row:
            cells["note"] = row["note"]
        table[f"{row['method']} {row['distractors']}"] = cells
    threshold = "none" if result["threshold"] is None else f"{result['threshold']:g}"
    return format_results(table) + (
        f"{result['trials']} trials: {result['probe_images']} probe images of {result['probe_identities']} "
        f"identities ({result['skipped_identities']} single-image identities skipped); threshold "
        f"{threshold}, rerank_topk {result['rerank_topk']}\n")


# -- Command line -------------------------------------------------------------------------------


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{flag} must be a comma-separated list of integers, got {text!r}") from None
    if not values:
        raise ConfigError(f"{flag} must name at least one integer, got {text!r}")
    return values


def _threshold(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--score_threshold must be a number or none, got {text!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"--score_threshold must be a finite number or none, got {text!r}")
    return value


def resolve_files(args: argparse.Namespace) -> dict[str, str]:
    """Role -> HDF5 file from the explicit flags or the `--embeddings_dir` convention.

    Args:
        args: Parsed flags of `main`.

    Raises:
        ConfigError: If the flags mix both ways, or leave the probes or distractors unnamed.
    """
    explicit = {"probes": args.probes, "distractors": args.distractors,
                "dense_probes": args.dense_probes, "dense_distractors": args.dense_distractors}
    if args.embeddings_dir is None:
        if args.sparse_suffix or args.dense_suffix:
            raise ConfigError("--sparse_suffix and --dense_suffix name files in --embeddings_dir; pass it")
        if not args.probes or not args.distractors:
            raise ConfigError("pass --probes and --distractors (or --embeddings_dir with --sparse_suffix)")
        return {role: path for role, path in explicit.items() if path}
    if any(explicit.values()):
        raise ConfigError("pass either --embeddings_dir with suffixes or --probes/--distractors files, "
                          "not both")
    if not args.sparse_suffix:
        raise ConfigError("--embeddings_dir needs --sparse_suffix (it finds facescrub_<suffix> and "
                          "megaface_<suffix> there)")
    root = Path(args.embeddings_dir)
    files = {"probes": root / f"{PROBE_SET}_{args.sparse_suffix}",
             "distractors": root / f"{DISTRACTOR_SET}_{args.sparse_suffix}"}
    if args.dense_suffix:
        files["dense_probes"] = root / f"{PROBE_SET}_{args.dense_suffix}"
        files["dense_distractors"] = root / f"{DISTRACTOR_SET}_{args.dense_suffix}"
    return {role: str(path) for role, path in files.items()}


DESCRIPTION = ("MegaFace-style identification with distractors: Recall@K and CMC of sparse search, dense "
               "search and sparse search re-ranked with dense embeddings.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declares the options of `evaluate identification` on `parser`.

    Args:
        parser: The sub-command's parser.
    """
    parser.add_argument("--probes", help="HDF5 embeddings of the probes (FaceScrub); labels are identities.")
    parser.add_argument("--distractors", help="HDF5 embeddings of the distractors (MegaFace).")
    parser.add_argument("--dense_probes", help="Dense HDF5 embeddings of the same probe images.")
    parser.add_argument("--dense_distractors", help="Dense HDF5 embeddings of the same distractor images.")
    parser.add_argument("--embeddings_dir", help="Folder of facescrub_<suffix> and megaface_<suffix> files.")
    parser.add_argument("--sparse_suffix", help="Suffix of the sparse files, e.g. sparse_RUN.hdf5.")
    parser.add_argument("--dense_suffix", help="Suffix of the dense files, e.g. dense_RUN.hdf5.")
    parser.add_argument("--score_threshold", default=str(DEFAULT_THRESHOLD),
                        help="Sparse scores must exceed it to be candidates; none: every row "
                             "(default: %(default)s).")
    deprecated_alias(parser, "--threshold", "--score_threshold")
    parser.add_argument("--rerank_topk", type=int, default=DEFAULT_RERANK_TOPK,
                        help="Candidates re-scored with the dense embeddings (default: %(default)s).")
    parser.add_argument("--ranks", default=",".join(map(str, DEFAULT_RANKS)),
                        help="Comma-separated K of Recall@K (default: %(default)s).")
    parser.add_argument("--distractor_counts",
                        help="Comma-separated distractor set sizes (default: 10, 100, 1000, ... below the "
                             "number of distractors, and all of them).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the distractor subsets.")
    parser.add_argument("--zero_threshold", type=float, default=DEFAULT_ZERO_THRESHOLD,
                        help="Sparse entries with |x| at or below it are dropped (default: %(default)s).")
    parser.add_argument("--num_threads", type=int, default=0, help="Search threads; 0: every core.")
    parser.add_argument("--output", help="JSON results; default: <probes>.identification.json beside it.")
    parser.add_argument("--plot", help="CMC curve PNG; default: the JSON's name with .cmc.png.")


def run_command(args: argparse.Namespace) -> None:
    """Runs `evaluate identification`: prints the table, writes JSON and the CMC plot.

    Args:
        args: The options `add_arguments` declares, parsed.
    """
    threshold = _threshold(args.score_threshold)
    ranks = _int_list(args.ranks, "--ranks")
    counts = None if args.distractor_counts is None else _int_list(args.distractor_counts,
                                                                   "--distractor_counts")
    files = resolve_files(args)
    embeddings = {role: read_hdf5(path) for role, path in files.items()}
    check_inputs(**embeddings, names=files)
    result = evaluate_identification(
        embeddings["probes"], embeddings["distractors"], dense_probes=embeddings.get("dense_probes"),
        dense_distractors=embeddings.get("dense_distractors"), threshold=threshold,
        rerank_topk=args.rerank_topk, ranks=ranks, distractor_counts=counts,
        zero_threshold=args.zero_threshold, num_threads=args.num_threads, seed=args.seed,
        progress=lambda line: print(line, flush=True))
    result["files"] = files
    print(format_table(result), end="")
    output = Path(args.output or Path(files["probes"]).with_suffix(".identification.json"))
    with atomic_path(output) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    from sparse_embed.plots import plot_cmc

    plot = Path(args.plot or output.with_suffix(".cmc.png"))
    plot_cmc(result["cmc"], plot, title=f"CMC, {result['cmc_distractors']} distractors")
    print(f"wrote {output} and {plot}")


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sparse_embed.evaluate identification`."""
    parser = make_parser(f"{DESCRIPTION}\n\n{examples(__doc__)}",
                         "python -m sparse_embed.evaluate identification")
    add_arguments(parser)
    return parser


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """`python -m sparse_embed.evaluate identification ...`.

    Args:
        argv: Arguments after the sub-command; None reads sys.argv.
    """
    run_command(build_parser().parse_args(argv))
