"""tf.data input pipelines: TFRecords for training and evaluation, image files for pairs/folders.

Every pipeline yields float32 images in [-1, 1] at a fixed square size:
training yields `(image [B, S, S, 3], label int32 [B])`, evaluation yields
`(image, label, filename)` and keeps every example in file order.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparse_embed.config import DataConfig
from sparse_embed.data.augment import AUGMENTATIONS, Augmentation
from sparse_embed.data.checks import count_records, scan_records
from sparse_embed.data.tfrecord import parse_example
from sparse_embed.errors import ConfigError, DataError
from sparse_embed.fileio import atomic_path
from sparse_embed.keras import tf
from sparse_embed.registry import Registry

AUTOTUNE = tf.data.AUTOTUNE
# TFRecord files read concurrently by the training stream.
CYCLE_LENGTH = 16
# Read-ahead of each open TFRecord file, in bytes (TensorFlow's default).
READ_BUFFER = 256 * 1024


ImageSize = int | tuple[int, int]

# Every function tf.data traces here is TensorFlow ops, with Python control flow
# on Python values only: AutoGraph's source transformation of each (its first
# use in a process costs seconds of CPU, in every job that builds a pipeline)
# would change nothing, so they are traced as written.
_as_written = tf.autograph.experimental.do_not_convert


def image_hw(image_size: ImageSize) -> tuple[int, int]:
    """(height, width) of an image size given as S (square) or (H, W).

    Args:
        image_size: Side of a square, or (height, width).
    """
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = image_size
    return int(height), int(width)


def decode_image(encoded: tf.Tensor, image_size: ImageSize) -> tf.Tensor:
    """Decodes an encoded image (JPEG, PNG, BMP, GIF) to the model's input.

    Args:
        encoded: Scalar string tensor with the file contents.
        image_size: Output side S, or (height, width).

    Returns:
        float32 [H, W, 3] in [-1, 1].
    """
    height, width = image_hw(image_size)
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    # A resize to the same size is the identity, bit for bit, but costs more than
    # the decode; aligned faces are stored at the training size.
    same = tf.reduce_all(tf.shape(image)[:2] == [height, width])
    image = tf.cond(
        same, lambda: tf.cast(image, tf.float32),
        lambda: tf.image.resize(image, [height, width], method="bilinear", antialias=True))
    image = tf.ensure_shape(image, [height, width, 3])
    return tf.clip_by_value(image / 127.5 - 1.0, -1.0, 1.0)


def list_files(file_pattern: str) -> list[str]:
    """Returns the files matching a glob, sorted.

    Args:
        file_pattern: Glob of TFRecord shards, e.g. `data/tfrecords/train-*`.

    Raises:
        DataError: If nothing matches.
    """
    files = sorted(tf.io.gfile.glob(file_pattern))
    if not files:
        raise DataError(
            f"no TFRecord files match {file_pattern!r}; build them with "
            f"sparse-embed-build-tfrecords --input=<image folder> --output=<dir>"
        )
    return files


def _check_worker(num_workers: int, worker_index: int) -> None:
    if num_workers < 1 or not 0 <= worker_index < num_workers:
        raise ValueError(f"need 0 <= worker_index < num_workers, got {worker_index}, {num_workers}")


def _worker_seed(seed: int, worker_index: int) -> int:
    # Workers read different examples; distinct augmentation streams keep them independent too.
    return int(np.random.SeedSequence([seed, worker_index]).generate_state(1, np.uint64)[0] >> 1)


def _round_robin(counts: np.ndarray) -> np.ndarray:
    """The file of each record when files are read one record each in turn until all end.

    Args:
        counts: Records per file.

    Returns:
        int64 [sum(counts)]: the index of the file each successive record comes from.
    """
    rounds = np.arange(int(counts.max(initial=0)))
    return np.nonzero(rounds[:, None] < counts[None, :])[1].astype(np.int64)


@dataclass(frozen=True)
class _EpochPlan:
    """How one worker's records are ordered in every epoch, before the window shuffle.

    Epoch e permutes the worker's files (seeded by the worker seed and e), then
    reads them in groups of `cycle` files, one record of each open file in turn.
    Because the order depends only on the files' record counts, any position can
    be reached without reading what comes before it: whole files are not
    opened, and a partly read file skips its records by their headers.

    Attributes:
        files: The worker's TFRecord files.
        counts: Records per file.
        cycle: Files read concurrently.
        seed: The worker's seed.
    """

    files: tuple[str, ...]
    counts: tuple[int, ...]
    cycle: int
    seed: int

    def groups(self, epoch: int, start: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yields (files [cycle], records to skip per file [cycle], file of each record) per group.

        Args:
            epoch: The epoch.
            start: Position in the epoch to begin at; earlier groups are not yielded.
        """
        counts = np.asarray(self.counts, np.int64)
        order = np.random.default_rng([self.seed, int(epoch)]).permutation(len(self.files))
        position = 0
        for first in range(0, len(order), self.cycle):
            members = order[first:first + self.cycle]
            chosen = _round_robin(counts[members])
            if position + len(chosen) <= start:
                position += len(chosen)
                continue
            done = max(0, int(start) - position)
            skips = np.bincount(chosen[:done], minlength=self.cycle)
            # Short last groups repeat a member in the unused slots, which are never chosen.
            names = [self.files[i] for i in members] + [self.files[members[0]]] * (self.cycle - len(members))
            yield np.array(names, dtype=object), skips.astype(np.int64), chosen[done:]
            position += len(chosen)


def _read_group(files: tf.Tensor, skips: tf.Tensor, chosen: tf.Tensor, cycle: int) -> tf.data.Dataset:
    """The records of one group of files, in the order `chosen` names their files."""
    readers = []
    for j in range(cycle):
        # Unbuffered, the skip reads only record headers; a buffered reader would
        # read the payloads it skips. Files read from their start keep the buffer.
        buffer = tf.where(skips[j] > 0, tf.constant(0, tf.int64), tf.constant(READ_BUFFER, tf.int64))
        readers.append(tf.data.TFRecordDataset(files[j], buffer_size=buffer).skip(skips[j]))
    return tf.data.Dataset.choose_from_datasets(readers, tf.data.Dataset.from_tensor_slices(chosen))


def _window_seed(seed: int, epoch: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
    base = tf.constant([seed >> 32, seed & 0xFFFFFFFF], tf.int64)
    return tf.random.experimental.stateless_fold_in(
        tf.random.experimental.stateless_fold_in(base, epoch), window)


def _epoch_stream(plan: _EpochPlan, window: int, first_epoch: int, first_start: int
                  ) -> tf.data.Dataset:
    """The worker's endless (record, stream position) pairs from `first_start` of `first_epoch`.

    Each epoch's records are cut into consecutive windows of `window` records and
    every window is shuffled with a seed of (worker, epoch, window): a position
    of the stream is a pure function of the arguments and can be started at
    after reading only the window that contains it. The positions come with the
    windows rather than from a per-record counter, which would cost more than
    the record reading.
    """
    signature = (tf.TensorSpec([plan.cycle], tf.string), tf.TensorSpec([plan.cycle], tf.int64),
                 tf.TensorSpec([None], tf.int64))
    epoch_size = sum(plan.counts)

    @_as_written
    def epoch_records(epoch: tf.Tensor) -> tf.data.Dataset:
        start = tf.where(epoch == first_epoch, tf.constant(first_start, tf.int64),
                         tf.constant(0, tf.int64))
        groups = tf.data.Dataset.from_generator(plan.groups, args=(epoch, start),
                                                output_signature=signature)
        records = groups.flat_map(_as_written(lambda f, s, c: _read_group(f, s, c, plan.cycle)))
        windows = tf.data.Dataset.zip(records.batch(window),
                                      tf.data.Dataset.counter(start // window))

        @_as_written
        def shuffle(batch: tf.Tensor, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            first = epoch * epoch_size + index * window
            positions = first + tf.range(tf.size(batch, out_type=tf.int64))
            return tf.random.experimental.stateless_shuffle(
                batch, _window_seed(plan.seed, epoch, index)), positions

        return windows.map(shuffle).unbatch()

    return tf.data.Dataset.counter(first_epoch).flat_map(epoch_records)


def train_dataset(
    file_pattern: str,
    batch_size: int,
    image_size: ImageSize,
    *,
    augment: bool = True,
    shuffle_buffer: int = 2048,
    seed: int = 0,
    num_workers: int = 1,
    worker_index: int = 0,
    start_example: int = 0,
    augmentation: str = "full",
) -> tf.data.Dataset:
    """The endless, shuffled, augmented training stream of one worker.

    Each worker reads its own share of the shards (every `num_workers`-th file).
    Every epoch it permutes its files, reads them `CYCLE_LENGTH` at a time one
    record each in turn, and shuffles consecutive windows of `shuffle_buffer`
    records. The stream is a pure function of the files and the arguments, so
    `start_example=k * batch_size` continues exactly where a run stopped after
    k batches, and it gets there without reading the records it skips: only the
    record headers are read (to count the records of each shard) and the
    window the position falls in. A run resumed with a different number of
    workers passes each worker its share of the examples already consumed.

    With fewer files than workers, each worker reads every `num_workers`-th
    record of all files through a shuffle buffer instead, and a resume reads
    the records it skips (such data is small).

    Args:
        file_pattern: Glob of TFRecord shards.
        batch_size: Examples per batch (per worker).
        image_size: Side S of square images, or (height, width).
        augment: Augment the images (False: decode only).
        shuffle_buffer: Records shuffled together (the window).
        seed: Seed of the file order, the shuffle and the augmentation.
        num_workers: Number of workers reading the data.
        worker_index: This worker, in [0, num_workers).
        start_example: Examples of this worker's stream to skip, to resume a run.
        augmentation: A policy of `augment.AUGMENTATIONS` (`full` | `flip`).

    Returns:
        Dataset of (images [B, S, S, 3], int32 [B]) with static shapes: float32 in
        [-1, 1], or uint8 under the `flip` policy (`augment.to_model_input` scales
        them; the trainer does so on the device).

    Raises:
        DataError: If no file matches `file_pattern`, the worker's files hold no
            records, or a file is cut short (the message names it).
        ValueError: On a bad batch size, buffer, worker index or start batch.
    """
    if batch_size < 1 or shuffle_buffer < 1 or start_example < 0:
        raise ValueError(
            f"need batch_size >= 1, shuffle_buffer >= 1, start_example >= 0; got "
            f"{batch_size}, {shuffle_buffer}, {start_example}"
        )
    _check_worker(num_workers, worker_index)
    files = list_files(file_pattern)
    worker_seed = _worker_seed(seed, worker_index)
    if len(files) >= num_workers:
        own = files[worker_index::num_workers]
        counts = []
        for path in own:
            records, problem = count_records(path)
            if problem:
                raise DataError(f"TFRecord shard {path} is damaged after {records} intact records: "
                                f"{problem}; rebuild it with sparse-embed-build-tfrecords")
            counts.append(records)
        epoch_size = sum(counts)
        if not epoch_size:
            raise DataError(f"the TFRecord files of worker {worker_index} ({own[0]}, ...) hold no "
                            f"records; rebuild them with sparse-embed-build-tfrecords")
        plan = _EpochPlan(tuple(own), tuple(counts), min(len(own), CYCLE_LENGTH), worker_seed)
        epoch, position = divmod(start_example, epoch_size)
        window_start = position - position % shuffle_buffer
        records = _epoch_stream(plan, shuffle_buffer, epoch, window_start).skip(
            position - window_start)
    else:
        records = tf.data.TFRecordDataset(files).shard(num_workers, worker_index).repeat()
        records = records.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        records = tf.data.Dataset.zip(records, tf.data.Dataset.counter()).skip(start_example)
    return _decoded_batches(records, worker_seed, batch_size, image_size,
                            augmentation if augment else None)


def _decode_uint8(encoded: tf.Tensor, image_size: ImageSize) -> tf.Tensor:
    """Decodes to uint8 [H, W, 3]; other sizes are resized (antialiased) and rounded."""
    height, width = image_hw(image_size)
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    same = tf.reduce_all(tf.shape(image)[:2] == [height, width])
    image = tf.cond(same, lambda: image, lambda: tf.cast(tf.round(tf.clip_by_value(
        tf.image.resize(image, [height, width], method="bilinear", antialias=True),
        0.0, 255.0)), tf.uint8))
    return tf.ensure_shape(image, [height, width, 3])


def _decoded_batches(records: tf.data.Dataset, worker_seed: int, batch_size: int,
                     image_size: ImageSize,
                     augmentation: str | None) -> tf.data.Dataset:
    """Decodes, augments (with the named policy, unless None) and batches (example, position) pairs.

    The augmentation of an example is seeded by its stream position, so it is
    the same in a resumed run as in an uninterrupted one.
    """
    policy = AUGMENTATIONS.get(augmentation) if augmentation else Augmentation()
    base_seed = tf.constant(worker_seed, tf.int64)

    @_as_written
    def load(serialized: tf.Tensor, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        features = parse_example(serialized)
        image = decode_image(features["image/encoded"], image_size)
        if policy.per_example is not None:
            image = policy.per_example(image, tf.stack([base_seed, index]))
        return image, tf.cast(features["image/class/label"], tf.int32)

    @_as_written
    def load_uint8(serialized: tf.Tensor, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        features = parse_example(serialized)
        image = policy.per_uint8(_decode_uint8(features["image/encoded"], image_size), index,
                                 worker_seed)
        return image, tf.cast(features["image/class/label"], tf.int32)

    per_record = load if policy.per_uint8 is None else load_uint8
    dataset = records.map(per_record, num_parallel_calls=AUTOTUNE, deterministic=True).batch(
        batch_size, drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    return dataset.prefetch(AUTOTUNE).with_options(options)


@dataclass(frozen=True, eq=False)
class RecordIndex:
    """Where every record of some TFRecord files is, and its label.

    Attributes:
        files: The TFRecord files.
        file: int32 [N], the file of each record (an index into `files`).
        offset: int64 [N], byte offset of each record's payload.
        length: int64 [N], payload length in bytes.
        label: int64 [N], the record's class label.
    """

    files: tuple[str, ...]
    file: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    label: np.ndarray


# Record indexes live in a hidden folder beside the shards, out of reach of their globs.
INDEX_DIR = ".index"


def _labels_of(path: str) -> np.ndarray:
    @_as_written
    def label(serialized: tf.Tensor) -> tf.Tensor:
        return tf.io.parse_single_example(
            serialized, {"image/class/label": tf.io.FixedLenFeature([], tf.int64)})["image/class/label"]

    labels = tf.data.TFRecordDataset(path).map(label, num_parallel_calls=AUTOTUNE).batch(4096)
    return np.concatenate([b.numpy() for b in labels] or [np.zeros(0, np.int64)])


def _file_index(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, lengths, labels) of one file, from its saved index when that is current."""
    cache = Path(path).parent / INDEX_DIR / f"{Path(path).name}.npz"
    size = os.path.getsize(path)
    if cache.is_file():
        with np.load(cache) as saved:
            if int(saved["file_size"]) == size:
                return saved["offset"], saved["length"], saved["label"]
    offsets, lengths, problem = scan_records(path)
    if problem:
        raise DataError(f"TFRecord shard {path} is damaged after {len(offsets)} intact records: "
                        f"{problem}; rebuild it with sparse-embed-build-tfrecords")
    labels = _labels_of(path)
    try:
        with atomic_path(cache) as tmp, open(tmp, "wb") as f:
            np.savez(f, offset=offsets, length=lengths, label=labels, file_size=size)
    except OSError:
        pass  # A read-only data set is indexed again next time; nothing is lost.
    return offsets, lengths, labels


def record_index(files: Sequence[str]) -> RecordIndex:
    """Indexes TFRecord files: record positions from the headers, labels from one read.

    Reading the labels costs one pass over the data, so each file's index is
    kept as `.index/<file name>.npz` beside it (when the directory is writable)
    and reused while the file keeps its size.

    Args:
        files: TFRecord files of this schema.

    Raises:
        DataError: If a file is cut short.
    """
    parts = [_file_index(f) for f in files]
    return RecordIndex(
        files=tuple(files),
        file=np.concatenate([np.full(len(p[0]), i, np.int32) for i, p in enumerate(parts)]),
        offset=np.concatenate([p[0] for p in parts]),
        length=np.concatenate([p[1] for p in parts]),
        label=np.concatenate([p[2] for p in parts]).astype(np.int64),
    )


@dataclass(frozen=True, eq=False)
class _PKPlan:
    """Draws the records of P x K batches: batch b is a pure function of (seed, b)."""

    index: RecordIndex
    classes_per_batch: int
    samples_per_class: int
    seed: int

    def batches(self, first: int) -> Iterator[tuple[list[bytes], np.ndarray]]:
        """Yields (serialized examples, stream positions) of batches `first`, `first + 1`, ...

        The examples of a batch are listed class by class.

        Args:
            first: Index of the first batch.
        """
        index = self.index
        order = np.argsort(index.label, kind="stable")
        classes, starts, sizes = np.unique(index.label[order], return_index=True, return_counts=True)
        handles = [os.open(path, os.O_RDONLY) for path in index.files]
        try:
            for batch in itertools.count(int(first)):
                rng = np.random.default_rng([self.seed, batch])
                chosen = rng.choice(len(classes), self.classes_per_batch, replace=False)
                records = []
                for c in chosen:
                    # Classes with fewer than K images repeat some (as samplers of pair losses do).
                    picks = rng.choice(sizes[c], self.samples_per_class,
                                       replace=bool(sizes[c] < self.samples_per_class))
                    for r in order[starts[c] + picks]:
                        records.append(os.pread(handles[index.file[r]], int(index.length[r]),
                                                int(index.offset[r])))
                size = len(records)
                yield records, np.arange(batch * size, (batch + 1) * size, dtype=np.int64)
        finally:
            for handle in handles:
                os.close(handle)


def pk_dataset(
    file_pattern: str,
    classes_per_batch: int,
    samples_per_class: int,
    image_size: ImageSize,
    *,
    augment: bool = True,
    seed: int = 0,
    worker_index: int = 0,
    start_example: int = 0,
    augmentation: str = "full",
) -> tf.data.Dataset:
    """The endless class-balanced training stream of one worker: P classes x K images a batch.

    Every batch draws P distinct classes uniformly, then K images of each
    (without repetition when the class has K), and lists them class by class;
    pair and proxy losses need every class of the batch to appear K times.
    Records are read by their position (see `record_index`), so batch b is a
    pure function of (seed, worker, b) and a resume reads nothing it skips.
    Each worker draws its own batches from all files.

    Args:
        file_pattern: Glob of TFRecord shards.
        classes_per_batch: P, distinct classes per batch.
        samples_per_class: K, images per class.
        image_size: Side S of square images, or (height, width).
        augment: Augment the images (False: decode only).
        seed: Seed of the draws and the augmentation.
        worker_index: This worker; workers draw independent batches.
        start_example: Examples of this worker's stream to skip (a multiple of P x K).
        augmentation: A policy of `augment.AUGMENTATIONS` (`full` | `flip`).

    Returns:
        Dataset of (images [P*K, S, S, 3], int32 [P*K]) with static shapes, of the
        dtype `train_dataset` gives for the policy.

    Raises:
        DataError: If no file matches, a file is cut short, or the files hold
            fewer than P classes.
        ValueError: If P, K or `start_example` is out of range.
    """
    batch_size = classes_per_batch * samples_per_class
    if classes_per_batch < 1 or samples_per_class < 1 or start_example < 0 or start_example % batch_size:
        raise ValueError(f"need P >= 1, K >= 1 and start_example a multiple of P x K >= 0; got "
                         f"{classes_per_batch}, {samples_per_class}, {start_example}")
    index = record_index(list_files(file_pattern))
    num_classes = len(np.unique(index.label))
    if num_classes < classes_per_batch:
        raise DataError(f"{file_pattern} holds {num_classes} classes, fewer than "
                        f"data.classes_per_batch={classes_per_batch}; lower it")
    worker_seed = _worker_seed(seed, worker_index)
    plan = _PKPlan(index, classes_per_batch, samples_per_class, worker_seed)
    records = tf.data.Dataset.from_generator(
        plan.batches, args=(start_example // batch_size,),
        output_signature=(tf.TensorSpec([batch_size], tf.string),
                          tf.TensorSpec([batch_size], tf.int64))).unbatch()
    return _decoded_batches(records, worker_seed, batch_size, image_size,
                            augmentation if augment else None)


SAMPLERS: Registry[Callable[..., tf.data.Dataset]] = Registry("sampler")


@SAMPLERS.register("shuffle")
def _shuffle_sampler(file_pattern: str, data: DataConfig, batch_size: int, image_size: ImageSize, seed: int,
                     num_workers: int, worker_index: int, start_example: int) -> tf.data.Dataset:
    return train_dataset(file_pattern, batch_size, image_size, augment=data.augment,
                         shuffle_buffer=data.shuffle_buffer, seed=seed, num_workers=num_workers,
                         worker_index=worker_index, start_example=start_example,
                         augmentation=data.augmentation)


@SAMPLERS.register("p_k")
def _pk_sampler(file_pattern: str, data: DataConfig, batch_size: int, image_size: ImageSize, seed: int,
                num_workers: int, worker_index: int, start_example: int) -> tf.data.Dataset:
    del num_workers  # every worker draws from all files
    if data.classes_per_batch * data.samples_per_class != batch_size:
        raise ConfigError(
            f"data.sampler=p_k: data.classes_per_batch x data.samples_per_class = "
            f"{data.classes_per_batch} x {data.samples_per_class} must equal the per-worker batch "
            f"{batch_size}; change them or train.batch_size")
    # A resume after a batch-size change lands inside a batch: start at the next one.
    start = -(-start_example // batch_size) * batch_size
    return pk_dataset(file_pattern, data.classes_per_batch, data.samples_per_class, image_size,
                      augment=data.augment, seed=seed, worker_index=worker_index, start_example=start,
                      augmentation=data.augmentation)


def training_stream(file_pattern: str, data: DataConfig, batch_size: int, image_size: ImageSize, seed: int,
                    num_workers: int = 1, worker_index: int = 0, start_example: int = 0
                    ) -> tf.data.Dataset:
    """The training input the config's `data.sampler` names.

    Args:
        file_pattern: Glob of TFRecord shards.
        data: The run's `data` config (sampler, P, K, shuffle window, augmentation).
        batch_size: Examples per batch of this worker.
        image_size: Side S of square images, or (height, width).
        seed: Seed of the order and the augmentation.
        num_workers: Number of input pipelines.
        worker_index: This pipeline.
        start_example: Examples of this pipeline's stream already consumed.

    Raises:
        ConfigError: If the sampler is unknown or P x K is not the batch.
    """
    return SAMPLERS.get(data.sampler)(file_pattern, data, batch_size, image_size, seed, num_workers,
                                      worker_index, start_example)


def _eval_map(image_size: ImageSize) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor, tf.Tensor]]:
    @_as_written
    def load(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        features = parse_example(serialized)
        image = decode_image(features["image/encoded"], image_size)
        return image, tf.cast(features["image/class/label"], tf.int32), features["image/filename"]

    return load


def eval_dataset(
    file_pattern: str,
    batch_size: int,
    image_size: ImageSize,
    *,
    num_workers: int = 1,
    worker_index: int = 0,
) -> tf.data.Dataset:
    """Every example of some TFRecords once, in file order, without augmentation.

    Args:
        file_pattern: Glob of TFRecord shards (read in sorted order).
        batch_size: Examples per batch; the last batch may be smaller.
        image_size: Side S of square images, or (height, width).
        num_workers: Number of workers sharing the examples.
        worker_index: This worker; it gets every `num_workers`-th example.

    Returns:
        Dataset of (float32 [B, S, S, 3] in [-1, 1], int32 [B], string [B] filenames).

    Raises:
        DataError: If no file matches `file_pattern`.
    """
    _check_worker(num_workers, worker_index)
    records = tf.data.TFRecordDataset(list_files(file_pattern))
    if num_workers > 1:
        records = records.shard(num_workers, worker_index)
    return (
        records.map(_eval_map(image_size), num_parallel_calls=AUTOTUNE, deterministic=True)
        .batch(batch_size)
        .prefetch(AUTOTUNE)
    )


def files_dataset(
    paths: Sequence[str],
    labels: Sequence[int] | None,
    batch_size: int,
    image_size: ImageSize,
) -> tf.data.Dataset:
    """Image files on disk, in the given order, without augmentation.

    Args:
        paths: Image files (JPEG, PNG, BMP, GIF).
        labels: One label per path, or None (labels are then -1).
        batch_size: Images per batch; the last batch may be smaller.
        image_size: Side S of square images, or (height, width).

    Returns:
        Dataset of (float32 [B, S, S, 3] in [-1, 1], int32 [B], string [B] paths).
        Files that exist but do not decode (a text file named `.jpg`, a
        truncated JPEG) are left out instead of stopping the whole job: compare
        the paths that come out with `paths` (`missing_paths`) to report them.

    Raises:
        DataError: If `paths` is empty or some files do not exist (the message names
            the first and counts them).
        ValueError: If `labels` and `paths` differ in length.
    """
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise DataError("no image files given; check the image folder or pairs file")
    if labels is None:
        labels = [-1] * len(paths)
    if len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} paths")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(paths)} image files do not exist, first: {missing[0]}"
        )

    @_as_written
    def load(path: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        return decode_image(tf.io.read_file(path), image_size), label, path

    dataset = tf.data.Dataset.from_tensor_slices(
        (tf.constant(paths, tf.string), tf.constant(labels, tf.int32))
    )
    return (
        dataset.map(load, num_parallel_calls=AUTOTUNE, deterministic=True)
        .ignore_errors()
        .batch(batch_size)
        .prefetch(AUTOTUNE)
    )


def bytes_dataset(images: Sequence[bytes], names: Sequence[str], batch_size: int,
                  image_size: ImageSize) -> tf.data.Dataset:
    """Encoded images held in memory (an InsightFace `.bin` pack), in the given order.

    Args:
        images: Encoded images (JPEG, PNG, BMP, GIF).
        names: One name per image, carried through as the file name.
        batch_size: Images per batch; the last batch may be smaller.
        image_size: Side S of square images, or (height, width).

    Returns:
        Dataset of (float32 [B, S, S, 3] in [-1, 1], int32 [B] of -1, string [B] names);
        images that do not decode are left out (compare the names with `missing_paths`).
    """
    if len(images) != len(names) or not images:
        raise ValueError(f"need one name per image and at least one image, got "
                         f"{len(images)} images and {len(names)} names")

    @_as_written
    def load(data: tf.Tensor, name: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        return decode_image(data, image_size), tf.constant(-1, tf.int32), name

    dataset = tf.data.Dataset.from_tensor_slices(
        (tf.constant(list(images), tf.string), tf.constant(list(names), tf.string)))
    return (
        dataset.map(load, num_parallel_calls=AUTOTUNE, deterministic=True)
        .ignore_errors()
        .batch(batch_size)
        .prefetch(AUTOTUNE)
    )


def missing_paths(paths: Sequence[str], produced: Sequence[str]) -> list[str]:
    """The `paths` a `files_dataset` left out because they did not decode, in order.

    Args:
        paths: What was given to `files_dataset`.
        produced: The paths that came out of it.
    """
    seen = set(produced)
    return [p for p in map(os.fspath, paths) if p not in seen]
