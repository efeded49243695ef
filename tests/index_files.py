"""Index files written byte by byte in Python, for the tests of older and foreign formats.

`xxh64` is XXH64 after its specification
(https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md), written
from the spec rather than from the C++ code, so agreeing with the checksums
the C++ writer stores is evidence for both. `write_v1` writes a version 1
index file (the layout of search/format.cpp's top comment): a 64-byte
header with its XXH64 at byte 56, then the segment bounds, positions, values
and optional labels, each section zero-padded to a multiple of 64 bytes; rows
are stored in caller order (version 1 has no row order and no block metadata).

    from index_files import xxh64, write_v1
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import scipy.sparse

__all__ = ["HEADER_SIZE_V1", "MAGIC", "SEGMENT_ROWS", "align", "header_hash", "write_v1", "xxh64"]

MAGIC = b"SPEMBIDX"
HEADER_SIZE_V1 = 64
# Sections start at multiples of this many bytes.
ALIGN = 64
# Rows per segment block: a posting stores its row as a uint16 offset in its block.
SEGMENT_BITS = 16
SEGMENT_ROWS = 1 << SEGMENT_BITS
FLAG_LABELS = 1

_MASK = (1 << 64) - 1
_P1 = 0x9E3779B185EBCA87
_P2 = 0xC2B2AE3D27D4EB4F
_P3 = 0x165667B19E3779F9
_P4 = 0x85EBCA77C2B2AE63
_P5 = 0x27D4EB2F165667C5


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _MASK


def _round(acc: int, lane: int) -> int:
    return (_rotl((acc + lane * _P2) & _MASK, 31) * _P1) & _MASK


def _merge(acc: int, lane: int) -> int:
    return ((acc ^ _round(0, lane)) * _P1 + _P4) & _MASK


def xxh64(data: bytes, seed: int = 0) -> int:
    """XXH64 of `data` (spec steps 1-6: stripes of 32 bytes, merge, tail, avalanche).

    Args:
        data: The input bytes.
        seed: The 64-bit seed.

    Returns:
        The hash as an unsigned 64-bit integer.
    """
    data = bytes(data)
    n = len(data)
    seed &= _MASK
    p = 0
    if n >= 32:
        acc = [(seed + _P1 + _P2) & _MASK, (seed + _P2) & _MASK, seed, (seed - _P1) & _MASK]
        # Whole stripes as little-endian uint64 lanes, four per stripe.
        stripes = n // 32
        lanes = struct.unpack_from(f"<{4 * stripes}Q", data)
        for s in range(stripes):
            for i in range(4):
                acc[i] = _round(acc[i], lanes[4 * s + i])
        p = 32 * stripes
        h = (_rotl(acc[0], 1) + _rotl(acc[1], 7) + _rotl(acc[2], 12) + _rotl(acc[3], 18)) & _MASK
        for lane in acc:
            h = _merge(h, lane)
    else:
        h = (seed + _P5) & _MASK
    h = (h + n) & _MASK
    while p + 8 <= n:
        (lane,) = struct.unpack_from("<Q", data, p)
        h = (_rotl(h ^ _round(0, lane), 27) * _P1 + _P4) & _MASK
        p += 8
    if p + 4 <= n:
        (word,) = struct.unpack_from("<I", data, p)
        h = (_rotl(h ^ ((word * _P1) & _MASK), 23) * _P2 + _P3) & _MASK
        p += 4
    while p < n:
        h = (_rotl(h ^ ((data[p] * _P5) & _MASK), 11) * _P1) & _MASK
        p += 1
    h ^= h >> 33
    h = (h * _P2) & _MASK
    h ^= h >> 29
    h = (h * _P3) & _MASK
    h ^= h >> 32
    return h


def align(n: int) -> int:
    """`n` rounded up to the next multiple of the section alignment."""
    return -(-n // ALIGN) * ALIGN


def header_hash(header: bytes) -> int:
    """The checksum a header stores in its last 8 bytes: XXH64 of the bytes before them."""
    return xxh64(header[:-8])


def _section(array: np.ndarray) -> bytes:
    raw = array.tobytes()
    return raw + bytes(align(len(raw)) - len(raw))


def write_v1(path: str | os.PathLike, rows: scipy.sparse.spmatrix | np.ndarray,
             labels: np.ndarray | None = None, version: int = 1) -> bytes:
    """Writes `rows` as a version 1 index file (no row order, no block metadata).

    Args:
        path: The file to write.
        rows: float32 [N, D], dense or scipy.sparse; zeros are not stored.
        labels: Optional int32 [N] labels (header flag bit 0).
        version: The version number written into the header (1; another
            number makes a file of a version the reader does not know, with
            valid checksums).

    Returns:
        The bytes written.
    """
    m = scipy.sparse.csr_matrix(rows, dtype=np.float32)
    m.eliminate_zeros()
    n, dim = m.shape
    blocks = max(1, -(-n // SEGMENT_ROWS))
    # Postings grouped by dimension, then segment block, then position.
    csc = m.tocsc()
    csc.sort_indices()
    positions = csc.indices.astype(np.int64)
    dims = np.repeat(np.arange(dim, dtype=np.int64), np.diff(csc.indptr))
    keys = dims * blocks + positions // SEGMENT_ROWS
    segments = np.zeros(dim * blocks + 1, "<u8")
    segments[1:] = np.cumsum(np.bincount(keys, minlength=dim * blocks))
    payload = (_section(segments)
               + _section((positions % SEGMENT_ROWS).astype("<u2"))
               + _section(csc.data.astype("<f4")))
    if labels is not None:
        payload += _section(np.asarray(labels, "<i4"))
    flags = FLAG_LABELS if labels is not None else 0
    header = struct.pack("<8sIIQQQIIQ", MAGIC, version, HEADER_SIZE_V1, n, dim, m.nnz, flags,
                         SEGMENT_BITS, xxh64(payload))
    header += struct.pack("<Q", xxh64(header))
    assert len(header) == HEADER_SIZE_V1
    data = header + payload
    Path(path).write_bytes(data)
    return data
