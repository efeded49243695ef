"""Training input pipeline against a raw JPEG decode of the same records; one table.

    python benchmarks/pipeline_bench.py [--num_images=5120] [--batch_size=128] [--stages] [--json]
    python benchmarks/pipeline_bench.py --stages --output=results/pipeline.json

Generates synthetic 112x112 faces (the training size) as TFRecord shards, then
measures images/s over the same records of

- the training pipeline, `train_dataset(..., augment=True)`: read, parse,
  decode, augment, shuffle, batch; with `augmentation=full` (flip, scale/crop,
  colour jitter, float32 batches) and `augmentation=flip` (mirror only, the
  insightface recipe; uint8 batches, scaled to [-1, 1] by the train step on
  the device);
- `tf.io.decode_jpeg` in a tf.data map: read, parse, decode, batch, with the
  pipeline's parallelism (AUTOTUNE) and nothing else;
- `cv2.imdecode` in a plain Python loop (1 process), and in a
  multiprocessing pool with one process per core (each process holds a copy of
  the encoded images and decodes its share: the decode capacity of all cores,
  without the cost of shipping pixels back).

The last columns are each pipeline's rate per core divided by the row's: the
target is the pipeline at >= 70% of the raw decode rate. With `--stages` (on by default when a
ratio falls short) the tf.data map is rebuilt stage by stage, as the pipeline
does it, to show what each stage costs.

`--output` also writes the table as a result file (`sparse_embed.results`:
the command, commit and machine with the rows), which the documentation
renders. None of the figures is asserted. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparse_embed.cli import deprecated_alias, make_parser  # noqa: E402
from sparse_embed.results import Column, write_result  # noqa: E402

IMAGE_SIZE = 112
TARGET = 0.70
# Timed rounds per setup; the fastest counts.
ROUNDS = 5
# Decoded images per cv2 pool task: large enough that task overhead is small.
_CHUNK = 128


@dataclass(frozen=True)
class Row:
    """One measured setup.

    Attributes:
        setup: What was measured.
        cores: Cores it can use: all for tf.data (one process, a thread pool), 1 for
            a Python loop, one per process (at most all) for a pool.
        images_per_s: Images per second.
    """

    setup: str
    cores: int
    images_per_s: float

    @property
    def per_core(self) -> float:
        return self.images_per_s / self.cores


def make_data(root: Path, identities: int, images: int, shards: int, workers: int) -> str:
    """Synthetic 112x112 identities as TFRecord shards; returns the shard glob."""
    from sparse_embed.data.synthetic import generate
    from sparse_embed.data.tfrecord import build_tfrecords

    generate(root, identities, images, 2, seed=0, image_size=IMAGE_SIZE, workers=workers,
             pairs_folds=1, pairs_per_fold=2)
    build_tfrecords(root / "train", root / "tfrecords", name="train", num_shards=shards,
                    num_workers=workers, seed=0)
    return str(root / "tfrecords" / "train-*")


def _best_of_rounds(run: Callable[[int], int], count: int) -> float:
    """Images/s of the fastest of `ROUNDS` rounds, each `run(count / ROUNDS)` images.

    On a shared machine the fastest round is the one least disturbed by other
    work, as timeit reports the fastest repeat.
    """
    best = 0.0
    for _ in range(ROUNDS):
        start = time.perf_counter()
        done = run(max(1, count // ROUNDS))
        best = max(best, done / (time.perf_counter() - start))
    return best


def _rate(batches: Iterator, batch: int, count: int) -> float:
    """Images/s of `count` images from an iterator of batches, after a warm-up.

    The warm-up (at least 3 batches and 1 s) lets tf.data's AUTOTUNE settle its
    parallelism before the clock starts.
    """
    start = time.perf_counter()
    for warm in range(1000):
        next(batches)
        if warm >= 2 and time.perf_counter() - start > 1.0:
            break

    def run(images: int) -> int:
        steps = max(1, images // batch)
        for _ in range(steps):
            next(batches)
        return steps * batch

    return _best_of_rounds(run, count)


def pipeline_rate(pattern: str, batch: int, count: int, augmentation: str) -> float:
    """Images/s of the training pipeline with the augmentation policy `augmentation`."""
    from sparse_embed.data.pipeline import train_dataset

    return _rate(iter(train_dataset(pattern, batch, IMAGE_SIZE, augment=True,
                                    augmentation=augmentation)), batch, count)


def _stage_maps() -> dict[str, Callable]:
    """Per-example map functions, each one stage more of the pipeline's map than the last.

    They rebuild `pipeline.decode_image` and `augment.augment` from the same ops,
    so the difference between consecutive rows is the cost of one stage.
    """
    from sparse_embed.data import augment
    from sparse_embed.data.tfrecord import parse_example
    from sparse_embed.keras import tf

    def jpeg(serialized: tf.Tensor) -> tf.Tensor:
        return tf.io.decode_jpeg(parse_example(serialized)["image/encoded"], channels=3)

    def any_format(serialized: tf.Tensor) -> tf.Tensor:
        encoded = parse_example(serialized)["image/encoded"]
        return tf.io.decode_image(encoded, channels=3, expand_animations=False)

    def scaled(serialized: tf.Tensor) -> tf.Tensor:
        # decode_image on records already at the training size: no resize.
        image = tf.ensure_shape(tf.cast(any_format(serialized), tf.float32),
                                [IMAGE_SIZE, IMAGE_SIZE, 3])
        return tf.clip_by_value(image / 127.5 - 1.0, -1.0, 1.0)

    def resized(serialized: tf.Tensor) -> tf.Tensor:
        image = tf.image.resize(any_format(serialized), [IMAGE_SIZE, IMAGE_SIZE],
                                method="bilinear", antialias=True)
        return tf.clip_by_value(image / 127.5 - 1.0, -1.0, 1.0)

    seed = tf.constant([0, 1], tf.int64)

    def flip(serialized: tf.Tensor) -> tf.Tensor:
        return augment.random_flip(scaled(serialized), seed)

    def scale_crop(serialized: tf.Tensor) -> tf.Tensor:
        return augment.random_scale_crop(flip(serialized), seed)

    def jitter(serialized: tf.Tensor) -> tf.Tensor:
        return augment.color_jitter(scale_crop(serialized), seed)

    return {
        "decode_jpeg": jpeg,
        "+ decode_image (any format)": any_format,
        "+ float, scale to [-1, 1] (= decode_image)": scaled,
        "+ random flip, per image on floats": flip,
        "+ random scale/crop": scale_crop,
        "+ colour jitter (= augmentation=full)": jitter,
        "  what decode_image skips: resize 112->112": resized,
    }


def map_rate(pattern: str, batch: int, count: int, load: Callable) -> float:
    """Images/s of read + `load` (AUTOTUNE parallel map) + batch over the shards, endlessly.

    Args:
        pattern: Shard glob.
        batch: Batch size.
        count: Images to time.
        load: Per-record map.
    """
    from sparse_embed.data.pipeline import list_files
    from sparse_embed.keras import tf

    dataset = (tf.data.TFRecordDataset(list_files(pattern)).repeat()
               .map(load, num_parallel_calls=tf.data.AUTOTUNE)
               .batch(batch, drop_remainder=True))
    return _rate(iter(dataset.prefetch(tf.data.AUTOTUNE)), batch, count)


def read_encoded(pattern: str) -> list[bytes]:
    """The JPEG bytes of every record, in file order."""
    from sparse_embed.data.pipeline import list_files
    from sparse_embed.data.tfrecord import parse_example
    from sparse_embed.keras import tf

    records = tf.data.TFRecordDataset(list_files(pattern)).map(
        lambda s: parse_example(s)["image/encoded"])
    return [bytes(b) for b in records.as_numpy_iterator()]


def _decode_cv2(encoded: list[bytes], count: int) -> int:
    import cv2
    import numpy as np

    for i in range(count):
        image = cv2.imdecode(np.frombuffer(encoded[i % len(encoded)], np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise RuntimeError("cv2 could not decode a record")
    return count


_WORKER_IMAGES: list[bytes] = []


def _pool_init(encoded: list[bytes]) -> None:
    import cv2

    # One decode per process: OpenCV's own threads would compete for the same cores.
    cv2.setNumThreads(1)
    _WORKER_IMAGES[:] = encoded


def _pool_task(start: int) -> int:
    _decode_cv2(_WORKER_IMAGES[start:] + _WORKER_IMAGES[:start], _CHUNK)
    return _CHUNK


def cv2_rate(encoded: list[bytes], count: int) -> float:
    """Images/s of cv2.imdecode in this process."""
    import cv2

    cv2.setNumThreads(1)
    _decode_cv2(encoded, min(count, 64))
    return _best_of_rounds(lambda images: _decode_cv2(encoded, images), count)


def cv2_pool_rate(encoded: list[bytes], count: int, processes: int) -> float:
    """Images/s of cv2.imdecode in a pool of `processes`, each decoding chunks of its copy."""
    starts = [(i * _CHUNK) % len(encoded) for i in range(max(1, count // _CHUNK))]
    # spawn: this process runs TensorFlow's threads, which a fork would copy mid-flight;
    # this module imports no TensorFlow at the top, so spawned workers start quickly.
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes, initializer=_pool_init, initargs=(encoded,)) as pool:
        pool.map(_pool_task, starts[:processes], chunksize=1)

        def run(images: int) -> int:
            tasks = starts[:max(processes, images // _CHUNK)]
            return sum(pool.map(_pool_task, tasks, chunksize=1))

        return _best_of_rounds(run, count)


def format_table(rows: list[Row], pipelines: list[Row], title: str) -> str:
    """The table: images/s, per core, core-microseconds per image, and each pipeline's ratio.

    Args:
        rows: Every measured setup, the pipelines first.
        pipelines: The training pipelines whose rate is divided by each row's.
        title: First line.
    """
    header = f"{'setup':<48} {'cores':>5} {'images/s':>9} {'img/s/core':>10} {'core-us/img':>11}"
    header += "".join(f" {_short(p.setup) + '/this':>11}" for p in pipelines)
    lines = [title, header, "-" * len(header)]
    for row in rows:
        line = (f"{row.setup:<48} {row.cores:>5} {row.images_per_s:>9.0f} "
                f"{row.per_core:>10.0f} {1e6 / row.per_core:>11.0f}")
        line += "".join(f" {p.per_core / row.per_core:>11.0%}" for p in pipelines)
        lines.append(line)
    return "\n".join(lines)


def _short(setup: str) -> str:
    return setup.rsplit("=", 1)[-1].rstrip(")")


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python benchmarks/pipeline_bench.py`."""
    parser = make_parser(__doc__, "python benchmarks/pipeline_bench.py")
    parser.add_argument("--num_images", dest="images", type=int, default=5120,
                        help="Images timed per setup (after one warm-up batch).")
    parser.add_argument("--batch_size", dest="batch", type=int, default=128,
                        help="Batch size of the tf.data setups.")
    parser.add_argument("--identities", type=int, default=96, help="Synthetic training identities.")
    parser.add_argument("--images_per_identity", dest="per_identity", type=int, default=16,
                        help="Images per identity.")
    parser.add_argument("--shards", type=int, default=4, help="TFRecord shards.")
    parser.add_argument("--workers", dest="processes", type=int, default=os.cpu_count() or 1,
                        help="cv2 pool processes (default: one per core).")
    parser.add_argument("--stages", action=argparse.BooleanOptionalAction, default=None,
                        help="Time the pipeline's map stage by stage (default: when below target).")
    parser.add_argument("--json", action="store_true", help="Also print one JSON line per row.")
    parser.add_argument("--output", help="Also write the table as a result file (JSON, e.g. "
                                         "results/pipeline.json).")
    deprecated_alias(parser, "--images", "--num_images")
    deprecated_alias(parser, "--batch", "--batch_size")
    deprecated_alias(parser, "--per_identity", "--images_per_identity")
    deprecated_alias(parser, "--processes", "--workers")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the benchmark and prints its table.

    Args:
        argv: Arguments after the script name; None reads sys.argv.
    """
    args = build_parser().parse_args(argv)

    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="pipeline_bench_"))
    try:
        print("generating synthetic faces ...", file=sys.stderr, flush=True)
        pattern = make_data(work / "data", args.identities, args.per_identity, args.shards,
                            min(cores, 4))
        encoded = read_encoded(pattern)
        print(f"{len(encoded)} records; timing ...", file=sys.stderr, flush=True)
        pipelines = [Row(f"train_dataset (augmentation={name})", cores,
                         pipeline_rate(pattern, args.batch, args.images, name))
                     for name in ("full", "flip")]
        stage_maps = _stage_maps()
        raw = [
            Row("tf.data decode_jpeg map (AUTOTUNE)", cores,
                map_rate(pattern, args.batch, args.images, stage_maps["decode_jpeg"])),
            Row("cv2.imdecode loop", 1, cv2_rate(encoded, args.images)),
            Row(f"cv2.imdecode pool x{args.processes}", min(args.processes, cores),
                cv2_pool_rate(encoded, args.images, args.processes)),
        ]
        rows = [*pipelines, *raw]
        short = any(p.per_core < TARGET * r.per_core for p in pipelines for r in raw)
        if args.stages or (args.stages is None and short):
            for name, load in list(stage_maps.items())[1:]:
                print(f"stage: {name} ...", file=sys.stderr, flush=True)
                rows.append(Row(f"stage: {name}", cores,
                                map_rate(pattern, args.batch, args.images, load)))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    title = (f"input pipeline vs raw JPEG decode, {len(encoded)} records of {IMAGE_SIZE}x{IMAGE_SIZE}, "
             f"{args.images} images per setup, batch {args.batch}, {cores} cores "
             f"(target: pipeline >= {TARGET:.0%} of raw)")
    print(format_table(rows, pipelines, title))
    records = []
    for row in rows:
        record = {"setup": row.setup, "cores": row.cores, "images_per_s": row.images_per_s,
                  "images_per_s_per_core": row.per_core}
        record |= {f"{_short(p.setup)}_ratio_per_core": p.per_core / row.per_core for p in pipelines}
        records.append({**record, "core_us_per_image": 1e6 / row.per_core})
        if args.json:
            print(json.dumps(record))
    if args.output:
        columns = [Column("setup", "setup"), Column("cores", "cores"),
                   Column("images_per_s", "images/s", ".0f"),
                   Column("images_per_s_per_core", "img/s/core", ".0f"),
                   Column("core_us_per_image", "core-us/img", ".0f")]
        columns += [Column(f"{_short(p.setup)}_ratio_per_core", f"{_short(p.setup)}/this", ".0%")
                    for p in pipelines]
        write_result(args.output, "Training input pipeline against a raw JPEG decode of the same records",
                     {"pipeline": (columns, records)},
                     notes=f"{len(encoded)} synthetic {IMAGE_SIZE}x{IMAGE_SIZE} records, "
                           f"{args.images} images per setup (the fastest of {ROUNDS} rounds), "
                           f"batch {args.batch}. X/this: pipeline X's images/s per core divided "
                           f"by the row's.")
        print(f"wrote {args.output}", file=sys.stderr)

if __name__ == "__main__":
    main()
