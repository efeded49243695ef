"""`DenseIndex`: exact inner-product search over dense rows, with `MutableIndex`'s interface.

A gallery of a dense model (`model.final_activation: none`) keeps its
embeddings here; a sparse model's go to `sparse_embed.search.MutableIndex`.
Both take `add(rows, ids=None)`, `remove(ids)`, `search(queries, k,
threshold=None)`, `save(directory)`, `load(directory)`, `ids`, `dim` and
`len()`, so the gallery holds either. The search is NumPy brute force (one
matrix product), exact; the rows persist as `.npy` files (never pickle)
written to temporary names and renamed, with a small JSON header.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from sparse_embed.errors import DataError
from sparse_embed.fileio import atomic_path

HEADER_NAME = "dense.json"
ROWS_NAME = "rows.npy"
IDS_NAME = "ids.npy"
FORMAT = "sparse-embed-dense-index"
VERSION = 1


class DenseIndex:
    """Dense float32 rows with int64 caller ids, searched exactly by inner product.

    Args:
        dim: The row dimension D.

    Raises:
        ValueError: If dim < 1.
    """

    def __init__(self, dim: int) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
        self._dim = int(dim)
        self._rows = np.zeros((0, self._dim), np.float32)
        self._ids = np.zeros(0, np.int64)
        # The id `add` gives next: after every id the index has held, as MutableIndex does.
        self._next_id = 0

    def add(self, rows: Any, ids: Any | None = None) -> np.ndarray:
        """Appends rows.

        Args:
            rows: float [n, D].
            ids: int64 [n] new caller ids (>= 0, not held now); None: the next free ids.

        Returns:
            The ids of the new rows.

        Raises:
            ValueError: On a wrong shape, non-finite values, or ids that are negative or held.
        """
        rows = np.asarray(rows, np.float32)
        if rows.ndim != 2 or rows.shape[1] != self._dim:
            raise ValueError(f"rows must have shape [n, {self._dim}], got {list(rows.shape)}")
        if not np.isfinite(rows).all():
            raise ValueError("rows must be finite")
        if ids is None:
            new = np.arange(self._next_id, self._next_id + len(rows), dtype=np.int64)
        else:
            new = np.asarray(ids, np.int64).reshape(-1)
            if len(new) != len(rows):
                raise ValueError(f"ids must have shape [{len(rows)}], got [{len(new)}]")
            if len(new) and new.min() < 0:
                raise ValueError(f"ids must be >= 0, got {new.min()}")
            if len(np.unique(new)) != len(new) or np.isin(new, self._ids).any():
                raise ValueError("ids must be new and distinct")
        self._rows = np.concatenate([self._rows, rows])
        self._ids = np.concatenate([self._ids, new])
        if len(new):
            self._next_id = max(self._next_id, int(new.max()) + 1)
        return new

    def remove(self, ids: Any) -> None:
        """Removes the rows of `ids`.

        Raises:
            ValueError: If an id is not held (then nothing is removed).
        """
        ids = np.asarray(ids, np.int64).reshape(-1)
        unknown = ids[~np.isin(ids, self._ids)]
        if len(unknown):
            raise ValueError(f"ids not in the index: {', '.join(map(str, unknown[:10]))}")
        keep = ~np.isin(self._ids, ids)
        self._rows, self._ids = self._rows[keep], self._ids[keep]

    def search(self, queries: Any, k: int, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The top-k rows of every query by inner product, exactly.

        Args:
            queries: float [Q, D].
            k: Results per query, >= 1.
            threshold: Only rows scoring strictly above it qualify; None: every row.

        Returns:
            ids int64 [Q, k] and scores float32 [Q, k], best first (ties: the lower
            id); -1 and -inf where fewer than k rows qualify.
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        queries = np.asarray(queries, np.float32)
        if queries.ndim != 2 or queries.shape[1] != self._dim:
            raise ValueError(f"queries must have shape [Q, {self._dim}], got {list(queries.shape)}")
        scores = queries @ self._rows.T
        if threshold is not None:
            scores = np.where(scores > threshold, scores, np.float32(-np.inf))
        width = min(int(k), len(self._ids))
        ids = np.full((len(queries), k), -1, np.int64)
        out = np.full((len(queries), k), -np.inf, np.float32)
        if not width:
            return ids, out
        # The width-th best score of each query, then every row at least as good (ties at the
        # boundary included) sorted by score and id: the top k without sorting every row.
        kth = -np.partition(-scores, width - 1, axis=1)[:, width - 1]
        for q in range(len(queries)):
            candidates = np.flatnonzero(scores[q] >= kth[q])
            order = np.lexsort((self._ids[candidates], -scores[q, candidates]))[:width]
            top = candidates[order]
            top_scores = scores[q, top]
            ids[q, :width] = np.where(np.isfinite(top_scores), self._ids[top], -1)
            out[q, :width] = top_scores
        return ids, out

    def save(self, directory: str | os.PathLike) -> None:
        """Writes the rows, ids and header into `directory` (created if missing), each file atomically."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for name, array in ((ROWS_NAME, self._rows), (IDS_NAME, self._ids)):
            with atomic_path(out / name) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, array, allow_pickle=False)
        header = {"format": FORMAT, "version": VERSION, "dim": self._dim, "rows": len(self._ids),
                  "next_id": self._next_id}
        with atomic_path(out / HEADER_NAME) as tmp:
            tmp.write_text(json.dumps(header))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> DenseIndex:
        """Reads an index `save` wrote.

        Raises:
            DataError: If the directory holds no dense index, or its files disagree.
        """
        folder = Path(directory)
        try:
            header = json.loads((folder / HEADER_NAME).read_text())
            rows = np.load(folder / ROWS_NAME, allow_pickle=False)
            ids = np.load(folder / IDS_NAME, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{folder} holds no readable dense index ({e})") from None
        if header.get("format") != FORMAT or rows.shape != (header["rows"], header["dim"]) \
                or ids.shape != (header["rows"],):
            raise DataError(f"{folder}: the dense index's files disagree with its {HEADER_NAME}")
        self = cls(int(header["dim"]))
        self._rows, self._ids = rows.astype(np.float32), ids.astype(np.int64)
        self._next_id = int(header["next_id"])
        return self

    @property
    def ids(self) -> np.ndarray:
        """The caller ids of the rows, increasing."""
        return np.sort(self._ids)

    @property
    def dim(self) -> int:
        """The row dimension D."""
        return self._dim

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"DenseIndex(rows={len(self)}, dim={self._dim})"
