"""Galleries in Milvus: sparse embeddings in a distributed vector database, searched like `SparseIndex`.

A gallery larger than one machine goes to Milvus, which stores
SPARSE_FLOAT_VECTOR fields under an inner-product inverted index and shards
them over a cluster; Milvus Lite is its embedded single-file edition (a local
path as the URI, e.g. `./milvus.db`) with the same client API. This is the one
module that imports `pymilvus` (the `milvus` extra: `pip install -e ".[milvus]"`).

    to_milvus("gallery.hdf5", "./milvus.db", "gallery", dense_path="gallery_dense.hdf5")
    index = MilvusIndex("./milvus.db", "gallery")
    ids, scores = index.search(probes, k=10)                           # as SparseIndex.search
    ids, scores = index.search(probes, k=10, rerank=probes_dense)      # dense re-rank of the top rerank_k

A collection holds one entity per row of the HDF5 file: `id` (the row
position, the primary key, so ids are those of `SparseIndex` over the same
file), `sparse` (the entries with |x| above the zero threshold), `label`,
`filename` and, when given, `dense` (FLOAT_VECTOR, for re-ranking). A
collection property records the dimensions, so a collection of another schema or
dimension is refused with one line.

`MilvusIndex.search` returns what `SparseIndex.search` returns on the same
rows, exactly:
- Milvus sparse vectors hold non-negative weights only (ReLU embeddings), so
  every score is >= 0, and Milvus returns only rows that share a dimension
  with the query. The rows it leaves out score 0; where no threshold is given
  they qualify, and they fill the remaining places in id order, as in the index.
- Milvus orders equal scores as it likes and may cut a run of ties at the
  limit. Results are re-sorted with ties to the lower id, and when the k-th
  score equals the last one Milvus returned, the query is asked again with a
  doubled limit (up to Milvus's top-k limit of 16,384), so no tied lower id is
  missed.
- Milvus Lite adds a score's terms in float64 and rounds the sum to float32;
  the C++ index adds in float32. Wherever the float32 sums are exact (values
  on a coarse grid, as in the tests) the scores are identical; otherwise they
  can differ in the last float32 bit and rows that tie to that precision can
  swap places. Dense re-rank scores are likewise float64 sums rounded to float32.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException
from tqdm import tqdm

from sparse_embed.errors import DataError
from sparse_embed.search.index import DEFAULT_RERANK_K, DEFAULT_ZERO_THRESHOLD, SparseIndex

__all__ = ["DEFAULT_BATCH_ROWS", "MILVUS_MAX_LIMIT", "MilvusIndex", "benchmark", "to_milvus"]

# pymilvus and Milvus Lite log every failed call with its traceback before
# raising it; the errors reach the caller as one line instead.
for _logger in ("pymilvus", "milvus_lite"):
    logging.getLogger(_logger).setLevel(logging.CRITICAL)

# Rows inserted per request (and read from the HDF5 file at once).
DEFAULT_BATCH_ROWS = 1024
# Milvus refuses a search limit above this (its `topk` bound).
MILVUS_MAX_LIMIT = 16384
# Queries per search request.
_QUERY_BATCH = 256
# Seconds to wait for a server before reporting it unreachable.
_CONNECT_TIMEOUT_S = 10.0
# The collection property that marks a collection written by `to_milvus` and
# records its dimensions (a sparse vector field has none of its own).
_PROPERTY = "sparse_embed.meta"
_FORMAT = "sparse_embed"
_FORMAT_VERSION = 1
_FILENAME_MAX = 4096


def _connect(uri: str) -> MilvusClient:
    """A client for `uri`; DataError naming it when it cannot be reached."""
    try:
        return MilvusClient(uri=str(uri), timeout=_CONNECT_TIMEOUT_S)
    except MilvusException as e:
        raise DataError(f"cannot reach Milvus at {uri} ({e.message}); give a server address "
                        "(http://host:19530) or a local file path for Milvus Lite (./milvus.db)") from None


def _meta(dim: int, dense_dim: int) -> str:
    return json.dumps({"format": _FORMAT, "version": _FORMAT_VERSION, "dim": dim, "dense_dim": dense_dim})


def _read_meta(client: MilvusClient, uri: str, collection: str) -> dict[str, Any]:
    """The dimensions of a collection written by `to_milvus`; DataError for any other schema."""
    info = client.describe_collection(collection)
    try:
        meta = json.loads(info.get("properties", {}).get(_PROPERTY, ""))
    except json.JSONDecodeError:
        meta = None
    fields = {f["name"]: f["type"] for f in info.get("fields", [])}
    expected = {"id": DataType.INT64, "sparse": DataType.SPARSE_FLOAT_VECTOR}
    if (not isinstance(meta, dict) or meta.get("format") != _FORMAT
            or any(fields.get(name) != kind for name, kind in expected.items())):
        raise DataError(f"collection {collection!r} in {uri} has another schema (fields "
                        f"{sorted(fields)}); write it with python -m sparse_embed.search to-milvus")
    if meta.get("version") != _FORMAT_VERSION:
        raise DataError(f"collection {collection!r} in {uri} has format version {meta.get('version')}, "
                        f"this code reads {_FORMAT_VERSION}; write it again with to-milvus")
    return meta


def _schema(dense_dim: int) -> Any:
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
    schema.add_field("label", DataType.INT64)
    schema.add_field("filename", DataType.VARCHAR, max_length=_FILENAME_MAX)
    if dense_dim:
        schema.add_field("dense", DataType.FLOAT_VECTOR, dim=dense_dim)
    return schema


def _sparse_rows(block: np.ndarray, zero_threshold: float, first_row: int, source: str
                 ) -> list[dict[int, float]]:
    """Milvus sparse vectors of the entries with |x| above the threshold; DataError on negative ones.

    Milvus refuses an empty sparse vector, so a row with no entry left holds
    only dimension D (one past the embedding's), which no query has: it shares
    no dimension with any query and scores 0, as in the index.
    """
    if not np.isfinite(block).all():
        raise DataError(f"{source}: rows {first_row}..{first_row + len(block) - 1} hold non-finite values")
    keep = np.abs(block) > zero_threshold
    if (block[keep] < 0).any():
        row = first_row + int(np.nonzero((block < 0) & keep)[0][0])
        raise DataError(f"{source}: row {row} has negative entries; Milvus sparse vectors hold "
                        "non-negative weights (use ReLU embeddings)")
    rows, cols = np.nonzero(keep)
    values = block[rows, cols]
    bounds = np.searchsorted(rows, np.arange(len(block) + 1))
    empty = {block.shape[1]: 1.0}
    return [dict(zip(cols[a:b].tolist(), values[a:b].tolist(), strict=True)) if b > a else empty
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class _Embeddings:
    """An HDF5 embedding file read a block of rows at a time (never whole).

    Args:
        path: File with `embedding` [N, D] and optionally `label` [N], `filename` [N].
    """

    def __init__(self, path: str | os.PathLike) -> None:
        import h5py

        if not Path(path).is_file():
            raise DataError(f"embedding file {path} not found; write it with python -m sparse_embed.embed")
        try:
            self._file = h5py.File(path, "r")
        except OSError as e:
            raise DataError(f"{path} is not a readable HDF5 file ({' '.join(str(e).split())})") from None
        if "embedding" not in self._file or self._file["embedding"].ndim != 2:
            self._file.close()
            raise DataError(f"{path} has no 'embedding' dataset [N, D]; write it with python -m "
                            "sparse_embed.embed")
        self.path = str(path)
        self.embedding = self._file["embedding"]
        self.rows, self.dim = (int(s) for s in self.embedding.shape)
        for name in ("label", "filename"):
            if name in self._file and self._file[name].shape != (self.rows,):
                self._file.close()
                raise DataError(f"{path}: {name!r} must have shape [{self.rows}], got "
                                f"{list(self._file[name].shape)}")

    def blocks(self, batch_rows: int) -> Iterator[tuple[int, np.ndarray, np.ndarray, list[str]]]:
        """(first row, embedding float32 [B, D], label int64 [B], file names) per block."""
        for start in range(0, self.rows, batch_rows):
            stop = min(start + batch_rows, self.rows)
            block = np.asarray(self.embedding[start:stop], np.float32)
            labels = (np.asarray(self._file["label"][start:stop], np.int64) if "label" in self._file
                      else np.full(stop - start, -1, np.int64))
            names = ([n.decode() if isinstance(n, bytes) else str(n)
                      for n in self._file["filename"][start:stop]]
                     if "filename" in self._file else [""] * (stop - start))
            yield start, block, labels, names

    def close(self) -> None:
        self._file.close()


def to_milvus(
    embeddings_path: str | os.PathLike,
    uri: str,
    collection: str,
    dense_path: str | os.PathLike | None = None,
    zero_threshold: float = DEFAULT_ZERO_THRESHOLD,
    overwrite: bool = False,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    progress: bool = True,
) -> dict[str, Any]:
    """Writes an embedding HDF5 file into a Milvus collection, in batches.

    Args:
        embeddings_path: HDF5 file (`embedding` [N, D] non-negative, `label`, `filename`).
        uri: Milvus server address, or a local file path for Milvus Lite.
        collection: Collection to create.
        dense_path: Optional HDF5 file whose `embedding` [N, Dd] is stored for re-ranking.
        zero_threshold: Entries with |x| at or below it are left out; >= 0.
        overwrite: Replace an existing collection of that name instead of refusing.
        batch_rows: Rows per insert request, >= 1.
        progress: Show a progress bar on stderr.

    Returns:
        A summary: `rows`, `dim`, `dense_dim`, `nnz`, `seconds`.

    Raises:
        DataError: If a file is missing or malformed, the embeddings are negative
            or non-finite, the server cannot be reached, or the collection exists
            and `overwrite` is False.
        ValueError: On a negative zero_threshold or batch_rows < 1.
    """
    if not zero_threshold >= 0:
        raise ValueError(f"zero_threshold must be >= 0, got {zero_threshold}")
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    start_time = time.perf_counter()
    sparse = _Embeddings(embeddings_path)
    dense = _Embeddings(dense_path) if dense_path is not None else None
    try:
        if dense is not None and dense.rows != sparse.rows:
            raise DataError(f"{dense.path} has {dense.rows} rows, {sparse.path} has {sparse.rows}; "
                            "the dense file must hold the same rows in the same order")
        dense_dim = dense.dim if dense is not None else 0
        client = _connect(uri)
        if client.has_collection(collection):
            if not overwrite:
                raise DataError(f"collection {collection!r} already exists in {uri}; pass --overwrite "
                                "to replace it or choose another --collection")
            client.drop_collection(collection)
        index_params = client.prepare_index_params()
        index_params.add_index(field_name="sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
        if dense_dim:
            # Milvus loads a collection only when each vector field has an index.
            index_params.add_index(field_name="dense", index_type="FLAT", metric_type="IP")
        client.create_collection(collection, schema=_schema(dense_dim), index_params=index_params)
        client.alter_collection_properties(collection, {_PROPERTY: _meta(sparse.dim, dense_dim)})
        nnz = 0
        dense_blocks = dense.blocks(batch_rows) if dense is not None else None
        with tqdm(total=sparse.rows, desc=f"to Milvus {collection}", unit="row", disable=not progress,
                  leave=False) as bar:
            for first, block, labels, names in sparse.blocks(batch_rows):
                vectors = _sparse_rows(block, zero_threshold, first, sparse.path)
                entities = [{"id": first + i, "sparse": v, "label": int(label), "filename": name}
                            for i, (v, label, name) in enumerate(zip(vectors, labels, names, strict=True))]
                if dense_blocks is not None:
                    dense_block = next(dense_blocks)[1]
                    if not np.isfinite(dense_block).all():
                        raise DataError(f"{dense.path}: rows {first}..{first + len(block) - 1} hold "
                                        "non-finite values")
                    for entity, row in zip(entities, dense_block.tolist(), strict=True):
                        entity["dense"] = row
                client.insert(collection, entities)
                nnz += int(np.count_nonzero(np.abs(block) > zero_threshold))
                bar.update(len(block))
        client.flush(collection)
    finally:
        sparse.close()
        if dense is not None:
            dense.close()
    return {"rows": sparse.rows, "dim": sparse.dim, "dense_dim": dense_dim, "nnz": nnz,
            "seconds": time.perf_counter() - start_time}


def _query_csr(queries: Any, dim: int) -> Any:
    """scipy CSR float32 [Q, dim] of dense / scipy.sparse / CSR-tuple queries; ValueError when unfit."""
    import scipy.sparse

    if hasattr(queries, "tocsr"):
        m = queries.tocsr().astype(np.float32)
    elif isinstance(queries, tuple):
        if len(queries) != 3:
            raise ValueError("queries as CSR must be a tuple (indptr, indices, values)")
        indptr = np.asarray(queries[0])
        m = scipy.sparse.csr_matrix((np.asarray(queries[2], np.float32), np.asarray(queries[1]), indptr),
                                    shape=(len(indptr) - 1, dim))
    else:
        a = np.asarray(queries)
        if a.dtype.kind not in "fiub" or a.ndim != 2:
            raise ValueError(f"queries must be a real-valued array of shape [Q, {dim}], got "
                             f"{a.dtype} {list(a.shape)}")
        m = scipy.sparse.csr_matrix(a.astype(np.float32))
    if m.shape[1] != dim:
        raise ValueError(f"queries must have shape [Q, {dim}], got {list(m.shape)}")
    m.eliminate_zeros()
    if not np.isfinite(m.data).all():
        raise ValueError("queries must be finite")
    if (m.data < 0).any():
        raise ValueError("queries must be non-negative: Milvus sparse vectors hold non-negative weights "
                         "(use ReLU embeddings)")
    m.sum_duplicates()
    return m


class MilvusIndex:
    """A collection written by `to_milvus`, searched with the semantics of `SparseIndex.search`.

    Args:
        uri: Milvus server address, or the local file of a Milvus Lite database.
        collection: The collection's name.

    Raises:
        DataError: If the server cannot be reached, the collection does not
            exist, or it has another schema.
    """

    def __init__(self, uri: str, collection: str) -> None:
        self._uri, self._collection = str(uri), collection
        if "://" not in self._uri and not Path(self._uri).exists():
            # Milvus Lite would create an empty database there.
            raise DataError(f"Milvus Lite database {uri} not found; write it with python -m "
                            "sparse_embed.search to-milvus --uri=...")
        self._client = _connect(self._uri)
        if not self._client.has_collection(collection):
            raise DataError(f"collection {collection!r} not found in {uri} (it has "
                            f"{sorted(self._client.list_collections())}); write it with to-milvus")
        meta = _read_meta(self._client, self._uri, collection)
        self._dim, self._dense_dim = int(meta["dim"]), int(meta["dense_dim"])
        self._client.load_collection(collection)
        self._rows = int(self._client.get_collection_stats(collection)["row_count"])
        self._last: dict[str, Any] = {"queries": 0, "requests": 0, "wall_seconds": 0.0}

    def close(self) -> None:
        """Closes the connection (a Milvus Lite database is open to one process at a time)."""
        self._client.close()

    def __enter__(self) -> MilvusIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self._rows

    @property
    def dim(self) -> int:
        """The sparse embedding dimension D."""
        return self._dim

    @property
    def dense_dim(self) -> int:
        """The dimension of the stored dense vectors; 0 when there are none."""
        return self._dense_dim

    @property
    def stats(self) -> dict[str, Any]:
        """`rows`, `dim`, `dense_dim`, and for the last search `queries`, `requests`
        (search calls, more than one per batch when ties made a limit grow),
        `wall_seconds` and `ms_per_query` (wall time: Milvus reports no per-query cost)."""
        n = self._last["queries"]
        return {"rows": self._rows, "dim": self._dim, "dense_dim": self._dense_dim, **self._last,
                "ms_per_query": 1e3 * self._last["wall_seconds"] / n if n else math.nan}

    def _sparse_top(self, m: Any, capacity: int, cut: np.float32 | None
                    ) -> tuple[list[np.ndarray], list[np.ndarray], int]:
        """Per query, its exact top `capacity` (ids, scores) by (score desc, id asc); requests made."""
        num_queries = m.shape[0]
        found_ids: list[np.ndarray] = [np.zeros(0, np.int64)] * num_queries
        found_scores: list[np.ndarray] = [np.zeros(0, np.float32)] * num_queries
        vectors = [dict(zip(m.indices[m.indptr[q]:m.indptr[q + 1]].tolist(),
                            m.data[m.indptr[q]:m.indptr[q + 1]].tolist(), strict=True))
                   for q in range(num_queries)]
        # An empty query shares no dimension with any row: Milvus has nothing to return.
        pending = [q for q in range(num_queries) if vectors[q]]
        limit = min(MILVUS_MAX_LIMIT, self._rows, capacity)
        requests = 0
        while pending and limit > 0:
            retry = []
            for start in range(0, len(pending), _QUERY_BATCH):
                batch = pending[start:start + _QUERY_BATCH]
                hits = self._client.search(self._collection, data=[vectors[q] for q in batch],
                                           anns_field="sparse", limit=limit, output_fields=["id"],
                                           search_params={"metric_type": "IP"})
                requests += 1
                for q, row in zip(batch, hits, strict=True):
                    ids = np.array([h["id"] for h in row], np.int64)
                    scores = np.array([h["distance"] for h in row], np.float32)
                    order = np.lexsort((ids, -scores.astype(np.float64)))
                    ids, scores = ids[order], scores[order]
                    # A full answer whose capacity-th score equals its last may
                    # have left out tied rows with lower ids.
                    if (len(ids) == limit < min(self._rows, MILVUS_MAX_LIMIT)
                            and len(ids) >= capacity and scores[capacity - 1] == scores[-1]):
                        retry.append(q)
                    found_ids[q], found_scores[q] = ids[:capacity], scores[:capacity]
            pending = retry
            limit = min(2 * limit, self._rows, MILVUS_MAX_LIMIT)
        for q in range(num_queries):
            ids, scores = found_ids[q], found_scores[q]
            if cut is not None:
                keep = scores > cut
                ids, scores = ids[keep], scores[keep]
            if len(ids) < capacity and (cut is None or cut < 0):
                # The rows Milvus left out share no dimension with the query: they score 0.
                zeros = np.setdiff1d(np.arange(min(self._rows, capacity + len(ids)), dtype=np.int64), ids)
                ids = np.concatenate([ids, zeros])
                scores = np.concatenate([scores, np.zeros(len(zeros), np.float32)])
                order = np.lexsort((ids, -scores.astype(np.float64)))[:capacity]
                ids, scores = ids[order], scores[order]
            found_ids[q], found_scores[q] = ids, scores
        return found_ids, found_scores, requests

    def _dense_vectors(self, ids: np.ndarray) -> np.ndarray:
        """float64 [len(ids), Dd] stored dense vectors of the given row ids."""
        unique = np.unique(ids)
        vectors = np.zeros((len(unique), self._dense_dim), np.float64)
        for start in range(0, len(unique), _QUERY_BATCH * 4):
            part = unique[start:start + _QUERY_BATCH * 4]
            for entity in self._client.get(self._collection, ids=part.tolist(), output_fields=["dense"]):
                vectors[np.searchsorted(unique, entity["id"])] = entity["dense"]
        return vectors[np.searchsorted(unique, ids)]

    def search(
        self,
        queries: Any,
        k: int,
        threshold: float | None = None,
        rerank: Any | None = None,
        rerank_k: int = DEFAULT_RERANK_K,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k rows of every query by inner product, as `SparseIndex.search`.

        Args:
            queries: Non-negative dense float32 [Q, D], a scipy.sparse matrix
                [Q, D], or a CSR tuple (indptr [Q + 1], indices [nnz], values [nnz]).
            k: Results per query, >= 1 (may exceed the number of rows).
            threshold: Only rows scoring strictly above it qualify; None: every row.
            rerank: Optional query dense vectors float32 [Q, Dd]: the top
                `rerank_k` rows by sparse score are re-scored by their inner
                product with the collection's `dense` vectors, and the top k by
                dense score (ties: lower row id) are returned with those scores.
            rerank_k: Candidates re-ranked per query; >= k.

        Returns:
            ids int64 [Q, k] (row positions in the HDF5 file) and scores
            float32 [Q, k], best first; -1 and -inf where fewer than k rows qualify.

        Raises:
            ValueError: On bad shapes or dtypes, negative or non-finite values,
                k < 1, rerank_k < k, or a re-rank the collection has no dense vectors for.
            DataError: If Milvus fails the request.
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        m = _query_csr(queries, self._dim)
        num_queries = m.shape[0]
        capacity = int(k)
        query_dense = None
        if rerank is not None:
            if not self._dense_dim:
                raise ValueError(f"collection {self._collection!r} holds no dense vectors to re-rank "
                                 "with; write it with to-milvus --dense")
            if rerank_k < k:
                raise ValueError(f"rerank_k ({rerank_k}) must be >= k ({k})")
            query_dense = np.asarray(rerank)
            if query_dense.dtype.kind not in "fiub" or query_dense.shape != (num_queries, self._dense_dim):
                raise ValueError(f"rerank query vectors must have shape [{num_queries}, {self._dense_dim}], "
                                 f"got {query_dense.dtype} {list(query_dense.shape)}")
            query_dense = query_dense.astype(np.float32).astype(np.float64)
            capacity = int(rerank_k)
        if min(capacity, self._rows) > MILVUS_MAX_LIMIT:
            raise ValueError(f"Milvus returns at most {MILVUS_MAX_LIMIT} rows per query; got "
                             f"{'rerank_k' if rerank is not None else 'k'} = {capacity}")
        cut = None if threshold is None else np.float32(threshold)
        start = time.perf_counter()
        try:
            found_ids, found_scores, requests = self._sparse_top(m, capacity, cut)
            if query_dense is not None:
                for q in range(num_queries):
                    if len(found_ids[q]):
                        dense = (self._dense_vectors(found_ids[q]) @ query_dense[q]).astype(np.float32)
                        order = np.lexsort((found_ids[q], -dense.astype(np.float64)))[:k]
                        found_ids[q], found_scores[q] = found_ids[q][order], dense[order]
        except MilvusException as e:
            raise DataError(f"Milvus search of {self._collection!r} in {self._uri} failed: "
                            f"{e.message}") from None
        ids = np.full((num_queries, k), -1, np.int64)
        scores = np.full((num_queries, k), -np.inf, np.float32)
        for q in range(num_queries):
            n = min(k, len(found_ids[q]))
            ids[q, :n], scores[q, :n] = found_ids[q][:n], found_scores[q][:n]
        self._last = {"queries": num_queries, "requests": requests,
                      "wall_seconds": time.perf_counter() - start}
        return ids, scores

    def __repr__(self) -> str:
        return (f"MilvusIndex(uri={self._uri!r}, collection={self._collection!r}, rows={self._rows}, "
                f"dim={self._dim}, dense_dim={self._dense_dim})")


def benchmark(database: Any, queries: Any, k: int, uri: str, collection: str = "search_bench",
              batch_rows: int = DEFAULT_BATCH_ROWS) -> dict[str, Any]:
    """One benchmark row: Milvus Lite (or a server) against `SparseIndex` on the same data.

    Writes `database` to `collection` at `uri` (replacing it), searches
    `queries` in both engines, checks that the top-k scores agree, and reports
    wall-clock ms/query of each (the index on one thread).

    Args:
        database: Non-negative scipy.sparse matrix [N, D].
        queries: Non-negative scipy.sparse matrix [Q, D].
        k: Results per query.
        uri: Milvus address or Milvus Lite file.
        collection: Collection to (re)create.
        batch_rows: Rows per insert request.

    Returns:
        `method`, `rows`, `queries`, `k`, `insert_seconds`, `ms_per_query`,
        `index_ms_per_query`, `max_score_difference`.
    """
    import h5py

    from sparse_embed.fileio import atomic_path

    database = database.tocsr().astype(np.float32)
    queries = queries.tocsr().astype(np.float32)
    path = Path(uri).with_suffix(".bench.hdf5") if "://" not in uri else Path(f"{collection}.bench.hdf5")
    # to_milvus reads HDF5 files; the rows are written a block at a time so a
    # large benchmark database never exists densely in memory.
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        emb = f.create_dataset("embedding", shape=database.shape, dtype=np.float32)
        for a in range(0, database.shape[0], 65536):
            emb[a:a + 65536] = database[a:a + 65536].toarray()
    try:
        summary = to_milvus(path, uri, collection, overwrite=True, batch_rows=batch_rows, progress=True)
    finally:
        path.unlink()
    milvus = MilvusIndex(uri, collection)
    ids, scores = milvus.search(queries, k)
    ms = milvus.stats["ms_per_query"]
    index = SparseIndex.from_csr(database.indptr, database.indices, database.data, database.shape[1])
    begin = time.perf_counter()
    _, index_scores = index.search(queries, k, num_threads=1)
    index_ms = 1e3 * (time.perf_counter() - begin) / queries.shape[0]
    return {"method": "Milvus Lite" if "://" not in uri else "Milvus", "rows": database.shape[0],
            "queries": queries.shape[0], "k": k, "insert_seconds": summary["seconds"], "ms_per_query": ms,
            "index_ms_per_query": index_ms,
            "max_score_difference": float(np.abs(scores - index_scores).max())}
