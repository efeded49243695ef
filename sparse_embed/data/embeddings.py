"""HDF5 embedding files, the hand-off between `embed` and everything that evaluates or searches.

A file holds `embedding` float32 [N, D] (L2-normalised), `label` int64 [N]
(-1 where the source has no label), `filename` (N strings) and, from a model
that predicts how much to trust each embedding (a probabilistic run), its
`confidence` float32 [N] (higher = more trusted). This module
imports h5py and NumPy only, so the evaluations that work on files
(`evaluate identification | retrieval | sparsity`) start without TensorFlow.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from sparse_embed.errors import DataError
from sparse_embed.fileio import atomic_path


@dataclass(frozen=True)
class Embeddings:
    """L2-normalised embeddings with their labels and source file names.

    Attributes:
        embedding: float32 [N, D].
        label: int64 [N] (-1 where the source has no label).
        filename: N file names (empty where the file has none).
        confidence: float32 [N], higher = more trusted; None where the model
            predicts none.
    """

    embedding: np.ndarray
    label: np.ndarray
    filename: tuple[str, ...]
    confidence: np.ndarray | None = None


def write_hdf5(path: str | os.PathLike, embeddings: Embeddings) -> None:
    """Writes `embedding`, `label`, `filename` (and `confidence`) datasets to an HDF5 file, atomically.

    Args:
        path: Output file.
        embeddings: What to write.
    """
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("embedding", data=embeddings.embedding)
        f.create_dataset("label", data=embeddings.label)
        f.create_dataset("filename", data=np.array(embeddings.filename, dtype=object),
                         dtype=h5py.string_dtype())
        if embeddings.confidence is not None:
            f.create_dataset("confidence", data=np.asarray(embeddings.confidence, np.float32))


def read_hdf5(path: str | os.PathLike) -> Embeddings:
    """Reads a file written by `write_hdf5`.

    Args:
        path: An HDF5 embedding file.

    Raises:
        DataError: If the file is missing, is not HDF5, lacks the `embedding`
            dataset, its datasets disagree in shape, or a `confidence` is not
            finite.
    """
    if not Path(path).is_file():
        raise DataError(f"embedding file {path} not found; write it with python -m sparse_embed.embed")
    try:
        with h5py.File(path, "r") as f:
            if "embedding" not in f:
                raise DataError(f"{path} has no 'embedding' dataset; was it written by sparse_embed.embed?")
            emb = np.asarray(f["embedding"][:], np.float32)
            label = np.asarray(f["label"][:], np.int64) if "label" in f else np.full(len(emb), -1, np.int64)
            names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in f["filename"][:]) \
                if "filename" in f else ()
            confidence = np.asarray(f["confidence"][:], np.float32) if "confidence" in f else None
    except OSError as e:
        raise DataError(f"{path} is not a readable HDF5 file ({' '.join(str(e).split())}); "
                        f"write it with python -m sparse_embed.embed") from None
    if emb.ndim != 2 or len(label) != len(emb) or (names and len(names) != len(emb)):
        raise DataError(f"{path}: 'embedding' must be [N, D] with one label and file name per row "
                        f"(got embedding {emb.shape}, {len(label)} labels, {len(names)} file names)")
    if confidence is not None:
        if confidence.shape != (len(emb),):
            raise DataError(f"{path}: 'confidence' must hold one value per embedding ({len(emb)}), "
                            f"got shape {confidence.shape}; write the file again with "
                            f"python -m sparse_embed.embed")
        if not np.isfinite(confidence).all():
            raise DataError(f"{path}: 'confidence' has {int(np.sum(~np.isfinite(confidence)))} non-finite "
                            f"value(s); write the file again with python -m sparse_embed.embed")
    return Embeddings(emb, label, names, confidence)
