"""Identification against large galleries: the matching step of `identify`, sparse against dense.

    python benchmarks/app_identify.py [--people=1000,100000,1000000] [--num_images=100] [--faces=1]
        [--output=results/app_identify.json]

For each gallery size N, builds in memory three galleries of N synthetic people
with one embedding each, and times identifying --num_images images of --faces faces
each, one image at a time, as `identify` and the service do after detection and
the model:

- `dense`: a dense model's gallery (`DenseIndex`, 512-d): NumPy brute force over
  every row, then the per-person scores and the one-to-one assignment
  (`sparse_embed.app.identify.match_faces`);
- `sparse`: a sparse model's gallery (`MutableIndex`, 1024-d, about 32 non-zeros
  per row): the inverted index's exact search, then the same matching;
- `sparse + re-rank`: the inverted index's top `--rerank_k` rows re-scored with
  the dense vectors, top 1 kept (`MutableIndex.search(rerank=...)`; the index
  step alone: a gallery keeps no dense vectors yet).

The embeddings imitate trained ones: a person is 32 dimensions of the sparse
space (non-negative values) and a direction of the dense one; each image keeps
about 75% of its person's dimensions, adds 8 of its own and noise (sparse), or
adds Gaussian noise (dense). The queries are new images of enrolled people, so
`top-1` (the share of faces given their own person, threshold off) checks that
the three answer alike. Detection and the model are not timed: they cost the
same whatever the gallery (`benchmarks/tflite_latency.py` times the models).
Prints one table: build seconds, latency per image (p50, p99 ms), faces per
second, top-1, and each setup's speed relative to `dense` at the same N.
--output writes it as a result file (`sparse_embed.results`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparse_embed.cli import make_parser  # noqa: E402
from sparse_embed.results import Column, write_result  # noqa: E402

SPARSE_DIM, DENSE_DIM = 1024, 512
PERSON_DIMS, OWN_DIMS, KEPT = 32, 8, 0.75
DENSE_NOISE = 0.6
COLUMNS = (Column("people", "people"), Column("setup", "setup"), Column("build_s", "build s", ".2f"),
           Column("p50_ms", "p50 ms/image", ".2f"), Column("p99_ms", "p99 ms/image", ".2f"),
           Column("faces_per_s", "faces/s", ".1f"), Column("top1", "top-1", ".3f"),
           Column("vs_dense", "vs dense", ".2f"))


def sparse_images(people: np.ndarray, rng: np.random.Generator):
    """One L2-normalised sparse image embedding per row of `people` (their dimensions, int [n, 32]),
    as a scipy.sparse CSR matrix [n, 1024] (a dense array of a million rows would take 4 GB)."""
    from scipy import sparse

    n = len(people)
    keep = rng.random((n, PERSON_DIMS)) < KEPT
    values = np.where(keep, rng.uniform(0.5, 1.5, (n, PERSON_DIMS)), 0.0)
    own = rng.integers(0, SPARSE_DIM, (n, OWN_DIMS))
    columns = np.concatenate([people, own], axis=1)
    values = np.concatenate([values, rng.uniform(0.0, 0.5, (n, OWN_DIMS))], axis=1)
    rows = np.repeat(np.arange(n), PERSON_DIMS + OWN_DIMS)
    # A dimension drawn twice in a row adds up; the kept ones are non-zero.
    matrix = sparse.csr_matrix((values.ravel(), (rows, columns.ravel())), shape=(n, SPARSE_DIM),
                               dtype=np.float64)
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1))).ravel()
    return sparse.csr_matrix(sparse.diags(1.0 / np.maximum(norms, 1e-12)) @ matrix, dtype=np.float32)


def dense_images(directions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One L2-normalised dense image embedding per person direction (float32 [n, 512])."""
    out = directions + rng.normal(0, DENSE_NOISE / np.sqrt(DENSE_DIM), directions.shape).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def gallery(index_type: str, rows, folder: Path):
    """An in-memory gallery of one embedding per person (rows: dense or scipy.sparse), person i
    named `p<i>`."""
    from sparse_embed.app.gallery import Gallery, ModelRecord

    model = ModelRecord(fingerprint="0" * 64, model="synthetic", mtcnn=None, width=112, height=112,
                        embedding_size=rows.shape[1], flip="none", index_type=index_type)
    built = Gallery.create(folder, model)
    ids = built.index.add(rows)
    if index_type == "sparse":
        built.index.compact()  # what a save does to a large delta: the rows in one base segment
    built.rows = np.stack([ids, np.arange(len(ids))], axis=1)
    built.people = {f"p{i}": {"id": i, "images": []} for i in range(len(ids))}
    built.next_person = len(ids)
    return built


def time_images(identify, images: int) -> tuple[list[float], list[int]]:
    """Seconds per image and the person index given to each face, for images 0 .. images - 1."""
    seconds, given = [], []
    identify(0)  # the first call pays for lazily built state
    for image in range(images):
        start = time.perf_counter()
        people = identify(image)
        seconds.append(time.perf_counter() - start)
        given += people
    return seconds, given


def measure(n: int, args: argparse.Namespace) -> list[dict]:
    """The three setups' rows for a gallery of n people."""
    from sparse_embed.app.identify import Settings, match_faces

    # Threshold off: every face gets its best person, so top-1 compares the setups' rankings.
    settings = Settings(threshold=-2.0)
    rng = np.random.default_rng(args.seed)
    # A person's dimensions, drawn with replacement: about 32 distinct ones.
    supports = rng.integers(0, SPARSE_DIM, (n, PERSON_DIMS))
    directions = rng.normal(size=(n, DENSE_DIM)).astype(np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    # Different people in one image, as in a photograph.
    truth = np.stack([rng.choice(n, args.faces, replace=n < args.faces) for _ in range(args.num_images)])
    sparse_q = sparse_images(supports[truth.ravel()], rng).toarray().reshape(args.num_images, args.faces, -1)
    dense_q = dense_images(directions[truth.ravel()], rng).reshape(args.num_images, args.faces, -1)
    dense_rows = dense_images(directions, rng)
    rows, built = [], {}
    with tempfile.TemporaryDirectory() as work:
        for index_type, embeddings in (("dense", dense_rows), ("sparse", sparse_images(supports, rng))):
            print(f"{n} people: {index_type} gallery ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            built[index_type] = gallery(index_type, embeddings, Path(work) / index_type)
            build_s = time.perf_counter() - start

            def identify(image: int, index_type: str = index_type) -> list[int]:
                queries = dense_q if index_type == "dense" else sparse_q
                return [int(m["name"][1:]) if m["name"].startswith("p") else -1
                        for m in match_faces(queries[image], built[index_type], settings)]

            rows.append(_row(n, index_type, build_s, *time_images(identify, args.num_images), truth, args))
        index = built["sparse"].index  # caller id i is person i

        def rerank(image: int) -> list[int]:
            ids, _ = index.search(sparse_q[image], 1, rerank=(dense_rows, dense_q[image]),
                                  rerank_k=min(args.rerank_k, n))
            return ids[:, 0].tolist()

        print(f"{n} people: sparse + re-rank ...", file=sys.stderr, flush=True)
        rows.append(_row(n, "sparse + re-rank", rows[1]["build_s"], *time_images(rerank, args.num_images),
                         truth, args))
    return [{**row, "vs_dense": row["faces_per_s"] / rows[0]["faces_per_s"]} for row in rows]


def _row(n: int, setup: str, build_s: float, seconds: list[float], given: list[int], truth: np.ndarray,
         args: argparse.Namespace) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {"people": n, "setup": setup, "build_s": build_s, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
            "faces_per_s": args.num_images * args.faces / float(np.sum(seconds)),
            "top1": float(np.mean(np.asarray(given) == truth.ravel()))}


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python benchmarks/app_identify.py`."""
    parser = make_parser(__doc__, "python benchmarks/app_identify.py")
    parser.add_argument("--people", default="1000,100000,1000000",
                        help="Comma-separated gallery sizes (people, one embedding each).")
    parser.add_argument("--num_images", type=int, default=100, help="Images identified per setup.")
    parser.add_argument("--faces", type=int, default=1, help="Faces per image.")
    parser.add_argument("--rerank_k", type=int, default=100,
                        help="Rows of the inverted index re-scored with the dense vectors.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the synthetic embeddings.")
    parser.add_argument("--output", default=None,
                        help="Also write the table to this result file (sparse_embed.results).")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the benchmark and prints its table.

    Args:
        argv: Arguments after the script name; None reads sys.argv.
    """
    args = build_parser().parse_args(argv)
    sizes = [int(n) for n in args.people.split(",")]
    if min(sizes) < 1 or args.num_images < 1 or args.faces < 1 or args.rerank_k < 1:
        raise SystemExit("--people, --num_images, --faces and --rerank_k must be >= 1")
    rows = [row for n in sizes for row in measure(n, args)]

    header = (f"{'people':>9} {'setup':<17} {'build s':>8} {'p50 ms':>8} {'p99 ms':>8} {'faces/s':>9}"
              f" {'top-1':>6} {'vs dense':>9}")
    print(f"identify's matching step, {args.num_images} images x {args.faces} face(s), one image at a time")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['people']:>9} {row['setup']:<17} {row['build_s']:>8.2f} {row['p50_ms']:>8.2f} "
              f"{row['p99_ms']:>8.2f} {row['faces_per_s']:>9.1f} {row['top1']:>6.3f} "
              f"{row['vs_dense']:>8.2f}x")
    if args.output:
        write_result(args.output, "Identification against large galleries: the matching step",
                     {"identify": (COLUMNS, rows)},
                     notes=f"{args.num_images} images x {args.faces} face(s) per gallery, "
                           "one image at a time, "
                           "after detection and the model; synthetic galleries of one embedding per person "
                           f"(sparse {SPARSE_DIM}-d, ~{int(PERSON_DIMS * KEPT) + OWN_DIMS} non-zeros; dense "
                           f"{DENSE_DIM}-d); re-rank: top {args.rerank_k} rows by sparse score "
                           "re-scored densely, the index step alone")


if __name__ == "__main__":
    main()
