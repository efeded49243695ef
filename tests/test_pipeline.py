"""Input pipelines and augmentations: shapes, ranges, determinism, resume, worker sharding."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sparse_embed.data import augment as aug
from sparse_embed.data import pipeline
from sparse_embed.data.pipeline import decode_image, eval_dataset, files_dataset, pk_dataset, train_dataset
from sparse_embed.data.tfrecord import build_tfrecords, image_folder, make_example, read_label_map
from sparse_embed.errors import DataError
from sparse_embed.keras import tf

pytestmark = pytest.mark.unit

NUM_EXAMPLES = 24


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 classes of one image each (so a label names its example), as 4 shards and as 1 shard."""
    root = tmp_path_factory.mktemp("pipeline")
    rng = np.random.default_rng(0)
    for i in range(NUM_EXAMPLES):
        (root / "images" / f"c{i:02d}").mkdir(parents=True)
        size = (40 + i, 36 + (i % 5))
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"c{i:02d}" / "0.jpg")
    build_tfrecords(root / "images", root / "four", num_shards=4, seed=0)
    build_tfrecords(root / "images", root / "one", num_shards=1, seed=0)
    return root


def _take(dataset: tf.data.Dataset, n: int) -> list[tuple[np.ndarray, ...]]:
    return [tuple(t.numpy() for t in batch) for batch in dataset.take(n)]


def test_train_batches_shapes_dtypes_range(data: Path) -> None:
    dataset = train_dataset(str(data / "four" / "train-*"), 5, 32, seed=0)
    image_spec, label_spec = dataset.element_spec
    assert image_spec.shape == (5, 32, 32, 3) and image_spec.dtype == tf.float32
    assert label_spec.shape == (5,) and label_spec.dtype == tf.int32, "drop_remainder: static batch"
    for images, labels in _take(dataset, 6):
        assert images.shape == (5, 32, 32, 3) and labels.shape == (5,)
        assert images.min() >= -1.0 and images.max() <= 1.0
        assert images.min() < -0.5 and images.max() > 0.5, "the full range is used"
        assert ((labels >= 0) & (labels < NUM_EXAMPLES)).all()


def test_train_stream_is_deterministic_and_resumable(data: Path) -> None:
    pattern = str(data / "four" / "train-*")
    first = _take(train_dataset(pattern, 4, 24, seed=3), 5)
    again = _take(train_dataset(pattern, 4, 24, seed=3), 5)
    other = _take(train_dataset(pattern, 4, 24, seed=4), 5)
    for (xa, ya), (xb, yb) in zip(first, again, strict=True):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa, xb)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(first, other, strict=True))

    resumed = _take(train_dataset(pattern, 4, 24, seed=3, start_example=8), 3)
    for (xa, ya), (xb, yb) in zip(first[2:], resumed, strict=True):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa, xb)


@pytest.mark.parametrize(
    "records, num_workers", [("four", 2), ("four", 3), ("one", 2), ("four", 1)]
)
def test_worker_shards_are_disjoint_and_complete(
    data: Path, records: str, num_workers: int
) -> None:
    seen = []
    for worker in range(num_workers):
        dataset = train_dataset(
            str(data / records / "train-*"),
            1,
            16,
            augment=False,
            shuffle_buffer=1,
            seed=0,
            num_workers=num_workers,
            worker_index=worker,
        )
        seen.append({int(y[0]) for _, y in _take(dataset, 2 * NUM_EXAMPLES)})
    assert set().union(*seen) == set(range(NUM_EXAMPLES))
    assert sum(len(s) for s in seen) == NUM_EXAMPLES, "no example is read by two workers"


def test_bad_worker_index_raises(data: Path) -> None:
    with pytest.raises(ValueError, match="worker_index"):
        train_dataset(str(data / "four" / "train-*"), 2, 16, num_workers=2, worker_index=2)


def test_empty_glob_raises_data_error(tmp_path: Path) -> None:
    pattern = str(tmp_path / "missing-*")
    with pytest.raises(DataError, match="sparse-embed-build-tfrecords") as info:
        train_dataset(pattern, 8, 32)
    assert pattern in str(info.value)
    with pytest.raises(DataError, match="no TFRecord files match"):
        eval_dataset(pattern, 8, 32)


def test_eval_dataset_reads_every_example_once(data: Path) -> None:
    names = read_label_map(data / "four" / "labels.txt")
    dataset = eval_dataset(str(data / "four" / "train-*"), 5, 20)
    image_spec, label_spec, name_spec = dataset.element_spec
    assert image_spec.shape.as_list() == [None, 20, 20, 3] and name_spec.dtype == tf.string
    batches = _take(dataset, 100)
    assert [len(b[1]) for b in batches] == [5, 5, 5, 5, 4], "no drop, no repeat"
    filenames = [f.decode() for b in batches for f in b[2]]
    labels = [int(y) for b in batches for y in b[1]]
    assert len(set(filenames)) == NUM_EXAMPLES
    assert all(names[y] == f.split("/")[0] for y, f in zip(labels, filenames, strict=True))
    images = np.concatenate([b[0] for b in batches])
    assert images.dtype == np.float32 and images.min() >= -1 and images.max() <= 1

    shares = [
        {
            f
            for b in _take(
                eval_dataset(str(data / "four" / "train-*"), 4, 20, num_workers=2, worker_index=w),
                100,
            )
            for f in b[2]
        }
        for w in range(2)
    ]
    assert not shares[0] & shares[1] and len(shares[0] | shares[1]) == NUM_EXAMPLES


def test_files_dataset_keeps_order_and_labels(data: Path, tmp_path: Path) -> None:
    paths, labels, _ = image_folder(data / "images")
    png = tmp_path / "extra.png"
    Image.fromarray(np.full((10, 14, 3), 255, np.uint8)).save(png)
    paths = paths[:5] + [str(png)]
    batches = _take(files_dataset(paths, None, 4, 16), 10)
    assert [len(b[1]) for b in batches] == [4, 2]
    assert [f.decode() for b in batches for f in b[2]] == paths
    assert all((b[1] == -1).all() for b in batches)
    np.testing.assert_allclose(batches[1][0][1], 1.0, atol=1e-5)  # the white PNG

    labelled = _take(files_dataset(paths[:5], labels[:5], 8, 16), 1)[0]
    np.testing.assert_array_equal(labelled[1], labels[:5])
    assert labelled[1].dtype == np.int32 and labelled[0].shape == (5, 16, 16, 3)

    with pytest.raises(DataError, match=r"2 of 3 image files do not exist, first: .*nope1"):
        files_dataset([paths[0], str(tmp_path / "nope1"), str(tmp_path / "nope2")], None, 2, 16)
    with pytest.raises(DataError, match="no image files"):
        files_dataset([], None, 2, 16)


def test_decode_image_range_and_size() -> None:
    black = io.BytesIO()
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(black, format="JPEG")
    white = io.BytesIO()
    Image.fromarray(np.full((9, 9), 255, np.uint8)).save(white, format="PNG")
    x = decode_image(tf.constant(black.getvalue()), 24).numpy()
    assert x.shape == (24, 24, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x, -1.0, atol=0.02)
    np.testing.assert_allclose(
        decode_image(tf.constant(white.getvalue()), 12).numpy(), 1.0, atol=1e-5
    )


def _ramp(size: int = 32) -> tf.Tensor:
    x = np.linspace(-1, 1, size, dtype=np.float32)
    image = np.stack(
        [x[None, :].repeat(size, 0), x[:, None].repeat(size, 1), -x[None, :].repeat(size, 0)], -1
    )
    return tf.constant(image * 0.9)


def test_augment_same_result_eagerly_and_in_dataset_map() -> None:
    image = _ramp()
    seeds = tf.constant([[0, i] for i in range(8)], tf.int64)
    eager = np.stack([aug.augment(image, s).numpy() for s in seeds])
    mapped = np.stack(
        [
            x.numpy()
            for x in tf.data.Dataset.from_tensor_slices(seeds).map(lambda s: aug.augment(image, s))
        ]
    )
    np.testing.assert_allclose(eager, mapped, atol=1e-5)
    assert eager.shape == (8, 32, 32, 3) and eager.min() >= -1 and eager.max() <= 1
    assert len({e.tobytes() for e in eager}) == 8, "different seeds, different augmentations"
    np.testing.assert_array_equal(eager[3], aug.augment(image, seeds[3]).numpy())


def test_flip_and_crop_do_what_they_say() -> None:
    image = _ramp()
    flips = [aug.random_flip(image, tf.constant([1, i])).numpy() for i in range(16)]
    flipped = [np.array_equal(f, image.numpy()[:, ::-1]) for f in flips]
    unchanged = [np.array_equal(f, image.numpy()) for f in flips]
    assert (
        all(a or b for a, b in zip(flipped, unchanged, strict=True))
        and any(flipped)
        and any(unchanged)
    )

    np.testing.assert_array_equal(aug.random_scale_crop(image, tf.constant([0, 1]), 1.0), image)
    zoomed = aug.random_scale_crop(image, tf.constant([0, 1]), 1.5).numpy()
    assert zoomed.shape == (32, 32, 3)
    # Zooming in shows a smaller part of the ramp: a smaller range of values.
    assert np.ptp(zoomed[..., 0]) < np.ptp(image.numpy()[..., 0])
    with pytest.raises(ValueError, match="max_scale"):
        aug.random_scale_crop(image, tf.constant([0, 1]), 0.9)


def test_color_jitter_strengths() -> None:
    image = _ramp()
    same = aug.color_jitter(image, tf.constant([0, 0]), brightness=0, contrast=0, saturation=0)
    np.testing.assert_allclose(same, image, atol=1e-6)
    jittered = aug.color_jitter(
        image, tf.constant([0, 0]), brightness=0.3, contrast=0.5, saturation=0.5
    )
    assert np.abs(jittered.numpy() - image.numpy()).mean() > 0.01
    with pytest.raises(ValueError, match="contrast"):
        aug.color_jitter(image, tf.constant([0, 0]), contrast=1.5)


def _write_shards(root: Path, counts: list[int], jpeg: bytes) -> str:
    """Shards whose records are numbered 0.. in file order by their label."""
    root.mkdir(parents=True)
    label = 0
    for index, count in enumerate(counts):
        with tf.io.TFRecordWriter(str(root / f"train-{index:05d}-of-{len(counts):05d}")) as writer:
            for _ in range(count):
                writer.write(make_example(jpeg, label, f"c{label}", f"{label}.jpg", 8, 8))
                label += 1
    return str(root / "train-*")


def _jpeg(size: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _labels(dataset: tf.data.Dataset, batches: int) -> list[int]:
    return [int(y) for _, labels in dataset.take(batches) for y in labels.numpy()]


def _oracle_epoch(counts: list[int], cycle: int, worker_seed: int, epoch: int) -> list[int]:
    """The pre-shuffle record order of one epoch, from the documented rule, in plain Python."""
    firsts = np.concatenate([[0], np.cumsum(counts)])
    order = np.random.default_rng([worker_seed, epoch]).permutation(len(counts))
    out = []
    for g in range(0, len(order), cycle):
        members = list(order[g:g + cycle])
        read = dict.fromkeys(members, 0)
        while any(read[m] < counts[m] for m in members):
            for m in members:
                if read[m] < counts[m]:
                    out.append(int(firsts[m] + read[m]))
                    read[m] += 1
    return out


COUNTS = [5, 9, 1, 7, 0, 4, 6]  # uneven, one empty shard


def test_record_order_follows_the_documented_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                  ) -> None:
    monkeypatch.setattr(pipeline, "CYCLE_LENGTH", 3)
    pattern = _write_shards(tmp_path / "shards", COUNTS, _jpeg(8))
    total = sum(COUNTS)
    # A window of one record is no shuffle: the stream is the pre-shuffle order itself.
    got = _labels(train_dataset(pattern, 4, 8, augment=False, shuffle_buffer=1, seed=5), 2 * total // 4)
    seed = pipeline._worker_seed(5, 0)
    expected = _oracle_epoch(COUNTS, 3, seed, 0) + _oracle_epoch(COUNTS, 3, seed, 1)
    assert got == expected[:len(got)]
    # Windows of 8 are permutations of those 8 records; every epoch holds each record once.
    shuffled = _labels(train_dataset(pattern, 1, 8, augment=False, shuffle_buffer=8, seed=5), 2 * total)
    for epoch in range(2):
        part, order = shuffled[epoch * total:(epoch + 1) * total], expected[epoch * total:(epoch + 1) * total]
        assert sorted(part) == list(range(total))
        for w in range(0, total, 8):
            assert sorted(part[w:w + 8]) == sorted(order[w:w + 8])
        assert part != order, "the windows are shuffled"


@pytest.mark.parametrize("start", [1, 7, 8, 13, 31, 32, 33, 95])
def test_resume_anywhere_equals_the_uninterrupted_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         start: int) -> None:
    # Positions inside a window, on window and epoch boundaries (32 records per
    # epoch), inside a group of files, and three epochs on.
    monkeypatch.setattr(pipeline, "CYCLE_LENGTH", 3)
    pattern = _write_shards(tmp_path / "shards", COUNTS, _jpeg(8))
    whole = list(train_dataset(pattern, 1, 8, shuffle_buffer=8, seed=2).take(start + 12))
    resumed = list(train_dataset(pattern, 1, 8, shuffle_buffer=8, seed=2, start_example=start).take(12))
    for (xa, ya), (xb, yb) in zip(whole[start:], resumed, strict=True):
        np.testing.assert_array_equal(ya.numpy(), yb.numpy())
        np.testing.assert_array_equal(xa.numpy(), xb.numpy(), err_msg="same augmentation")


def _bytes_read() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_resume_does_not_read_the_records_it_skips(tmp_path: Path) -> None:
    jpeg = _jpeg(112)
    pattern = _write_shards(tmp_path / "shards", [300] * 4, jpeg)
    total = 4 * 300 * len(jpeg)
    start = 3 * 1200 + 1000  # three epochs and most of a fourth
    first = next(iter(train_dataset(pattern, 1, 16, augment=False, shuffle_buffer=16)))  # warm up
    del first
    before = _bytes_read()
    batch = next(iter(train_dataset(pattern, 1, 16, augment=False, shuffle_buffer=16,
                                    start_example=start)))
    read = _bytes_read() - before
    assert batch[1].shape == (1,)
    # Reading through would cost 3.8 epochs of payload; what is read is the
    # record headers, one window and the read-ahead of the files being read.
    assert read < 0.1 * 3.8 * total, f"read {read} bytes to resume, the data is {total} bytes an epoch"


def test_a_cut_short_shard_is_named_before_training(tmp_path: Path) -> None:
    pattern = _write_shards(tmp_path / "shards", [4, 4], _jpeg(8))
    shard = tmp_path / "shards" / "train-00001-of-00002"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"train-00001-of-00002 is damaged after 3 intact records"):
        train_dataset(pattern, 2, 8)


def _pk_shards(root: Path, sizes: list[int]) -> str:
    """Class c has sizes[c] records; the records are spread over 3 shards."""
    labels = np.repeat(np.arange(len(sizes)), sizes)
    order = np.random.default_rng(0).permutation(len(labels))
    jpeg = _jpeg(8)
    root.mkdir(parents=True)
    for shard, part in enumerate(np.array_split(order, 3)):
        with tf.io.TFRecordWriter(str(root / f"train-{shard:05d}-of-00003")) as writer:
            for i in part:
                writer.write(make_example(jpeg, int(labels[i]), "c", f"{i}.jpg", 8, 8))
    return str(root / "train-*")


def test_pk_batches_hold_exactly_p_classes_of_k_images(tmp_path: Path) -> None:
    sizes = [6, 1, 9, 4, 2, 7, 5, 3]  # classes 1, 4, 7 have fewer than K=4 images
    pattern = _pk_shards(tmp_path / "pk", sizes)
    dataset = pk_dataset(pattern, 3, 4, 8, augment=False, seed=1)
    assert dataset.element_spec[1].shape == (12,)
    drawn = np.zeros(len(sizes))
    for _, labels in dataset.take(300):
        labels = labels.numpy()
        blocks = labels.reshape(3, 4)
        assert (blocks == blocks[:, :1]).all(), "class-major: K images of a class together"
        assert len(set(blocks[:, 0])) == 3, "P distinct classes"
        drawn[blocks[:, 0]] += 1
    # Classes are drawn uniformly: 300 x 3 / 8 = 112.5 each; 4 standard deviations of slack.
    assert np.abs(drawn - 112.5).max() < 4 * np.sqrt(300 * 3 / 8 * (1 - 3 / 8))
    # The index is kept beside the shards, out of the shard glob.
    assert len(list((tmp_path / "pk" / ".index").glob("*.npz"))) == 3
    assert len(pipeline.list_files(pattern)) == 3


def test_pk_images_within_a_class_do_not_repeat_when_the_class_has_k(tmp_path: Path) -> None:
    sizes = [4, 4, 5, 6]
    root = tmp_path / "pk"
    labels = np.repeat(np.arange(len(sizes)), sizes)
    root.mkdir()
    with tf.io.TFRecordWriter(str(root / "train-00000-of-00001")) as writer:
        for i, label in enumerate(labels):
            # Each record's image differs, so repeated records show as equal images.
            writer.write(make_example(_jpeg(8, seed=i), int(label), "c", f"{i}.jpg", 8, 8))
    dataset = pk_dataset(str(root / "train-*"), 2, 4, 8, augment=False, seed=0)
    for images, _ in dataset.take(20):
        images = images.numpy().reshape(2, 4, -1)
        for block in images:
            assert len({row.tobytes() for row in block}) == 4


def test_pk_stream_resumes_exactly_and_workers_differ(tmp_path: Path) -> None:
    pattern = _pk_shards(tmp_path / "pk", [5, 5, 5, 5, 5, 5])
    whole = list(pk_dataset(pattern, 2, 3, 8, seed=4).take(7))
    resumed = list(pk_dataset(pattern, 2, 3, 8, seed=4, start_example=4 * 6).take(3))
    for (xa, ya), (xb, yb) in zip(whole[4:], resumed, strict=True):
        np.testing.assert_array_equal(ya.numpy(), yb.numpy())
        np.testing.assert_array_equal(xa.numpy(), xb.numpy())
    other = list(pk_dataset(pattern, 2, 3, 8, seed=4, worker_index=1).take(7))
    assert any(not np.array_equal(a[1].numpy(), b[1].numpy()) for a, b in zip(whole, other, strict=True))


def test_pk_rejects_more_classes_than_the_data_has(tmp_path: Path) -> None:
    pattern = _pk_shards(tmp_path / "pk", [3, 3])
    with pytest.raises(DataError, match="holds 2 classes, fewer than data.classes_per_batch=3"):
        pk_dataset(pattern, 3, 2, 8)


def test_decode_skips_a_same_size_resize_bit_for_bit() -> None:
    encoded = tf.constant(_jpeg(24, seed=3))
    resized = tf.image.resize(tf.io.decode_jpeg(encoded, channels=3), [24, 24], method="bilinear",
                              antialias=True)
    expected = tf.clip_by_value(resized / 127.5 - 1.0, -1.0, 1.0)
    np.testing.assert_array_equal(decode_image(encoded, 24).numpy(), expected.numpy())
    assert decode_image(encoded, 16).shape == (16, 16, 3), "other sizes are still resized"


def test_flip_policy_only_mirrors(data: Path) -> None:
    plain = {int(y): x for x, y in zip(*_take(train_dataset(str(data / "one" / "train-*"), NUM_EXAMPLES, 24,
                                                            augment=False), 1)[0], strict=True)}
    flipped = _take(train_dataset(str(data / "one" / "train-*"), NUM_EXAMPLES, 24,
                                  augmentation="flip", seed=1), 2)
    assert flipped[0][0].dtype == np.uint8, "the train step scales them on the device"
    mirrored = 0
    for images, labels in flipped:
        for x, y in zip(aug.to_model_input(tf.constant(images)).numpy(), labels, strict=True):
            # These records are resized, which the flip policy rounds to whole grey levels.
            level = 1 / 127.5 + 1e-6
            same = np.allclose(x, plain[int(y)], atol=level)
            mirror = np.allclose(x, plain[int(y)][:, ::-1], atol=level)
            assert same or mirror
            mirrored += mirror and not same
    assert 0 < mirrored < 2 * NUM_EXAMPLES, "about half are mirrored"


def test_flip_policy_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "CYCLE_LENGTH", 3)
    pattern = _write_shards(tmp_path / "shards", COUNTS, _jpeg(8))
    whole = list(train_dataset(pattern, 1, 8, shuffle_buffer=8, seed=2, augmentation="flip").take(25))
    resumed = list(train_dataset(pattern, 1, 8, shuffle_buffer=8, seed=2, augmentation="flip",
                                 start_example=13).take(12))
    for (xa, ya), (xb, yb) in zip(whole[13:], resumed, strict=True):
        np.testing.assert_array_equal(ya.numpy(), yb.numpy())
        np.testing.assert_array_equal(xa.numpy(), xb.numpy())


def test_non_square_input_sizes(data: Path) -> None:
    # SphereFace-20 takes 112 x 96 (height x width) crops.
    pattern = str(data / "four" / "train-*")
    for augmentation in ("full", "flip"):
        images, _ = _take(train_dataset(pattern, 3, (28, 24), augmentation=augmentation), 1)[0]
        assert images.shape == (3, 28, 24, 3)
    images, _, _ = _take(eval_dataset(pattern, 3, (28, 24)), 1)[0]
    assert images.shape == (3, 28, 24, 3)
    encoded = tf.constant(_jpeg(24, seed=1))
    assert decode_image(encoded, (24, 24)).numpy().tolist() == decode_image(encoded, 24).numpy().tolist()
