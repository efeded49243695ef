"""CIFAR-100 pickles (written here as the official archive lays them out) to TFRecords."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_main_user_error, run_module

from sparse_embed.data.cifar import load_pickle, read_split
from sparse_embed.data.pipeline import eval_dataset
from sparse_embed.data.tfrecord import read_label_map
from sparse_embed.errors import DataError
from sparse_embed.preprocessing.build_cifar_tfrecords import main as build_cifar_main

pytestmark = pytest.mark.unit

SCRIPT = "sparse_embed.preprocessing.build_cifar_tfrecords"

FINE = [f"fine_{i}".encode() for i in range(100)]
COARSE = [f"coarse_{i}".encode() for i in range(20)]


def _write_archive(root: Path, counts: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """The "python version" layout: Python 2 pickles of dicts with bytes keys."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    images = {}
    y, x = np.mgrid[0:32, 0:32]
    for split, n in counts.items():
        # Smooth images (JPEG keeps them close) with a different pattern per
        # channel, so a wrong plane order cannot go unnoticed.
        shift = rng.integers(0, 64, (n, 1, 1))
        hwc = np.stack([x * 6 + shift, y * 6 + shift, np.broadcast_to(shift * 3, (n, 32, 32))],
                       axis=-1).astype(np.uint8)
        images[split] = hwc
        table = {
            b"batch_label": f"{split} batch 1 of 1".encode(),
            b"filenames": [f"{split}_{i:05d}.png".encode() for i in range(n)],
            b"fine_labels": [int(x) for x in rng.integers(0, 100, n)],
            b"coarse_labels": [int(x) for x in rng.integers(0, 20, n)],
            # Rows: 1024 red, 1024 green, 1024 blue, each plane row-major.
            b"data": hwc.transpose(0, 3, 1, 2).reshape(n, 3072),
        }
        (root / split).write_bytes(pickle.dumps(table, protocol=2))
    meta = {b"fine_label_names": FINE, b"coarse_label_names": COARSE}
    (root / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return images


def test_split_reads_the_planes_in_the_published_order(tmp_path: Path) -> None:
    images = _write_archive(tmp_path / "cifar-100-python", {"train": 5, "test": 3})
    split = read_split(tmp_path / "cifar-100-python", "train")
    np.testing.assert_array_equal(split.images, images["train"])
    assert split.filenames[0] == "train_00000.png" and split.labels.max() < 100
    assert read_split(tmp_path / "cifar-100-python", "test", "coarse").labels.max() < 20


@pytest.mark.integration
def test_cli_writes_tfrecords_of_both_splits(tmp_path: Path) -> None:
    root = tmp_path / "cifar-100-python"
    images = _write_archive(root, {"train": 12, "test": 6})
    out = tmp_path / "cifar100"
    proc = run_module(SCRIPT, f"--root={root}", f"--output={out}", "--shards=2",
                             "--workers=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_label_map(out / "tfrecords" / "labels.txt") == [n.decode() for n in FINE]
    truth = read_split(root, "test")
    by_name = dict(zip(truth.filenames, range(len(truth.filenames)), strict=True))
    seen = 0
    for batch, labels, names in eval_dataset(str(out / "tfrecords" / "test-*"), 4, 32):
        for image, label, name in zip(batch.numpy(), labels.numpy(), names.numpy(), strict=True):
            i = by_name[name.decode()]
            assert label == truth.labels[i]
            # JPEG at quality 95: close to the original pixels, not equal.
            original = images["test"][i].astype(np.float32) / 127.5 - 1
            assert np.abs(image - original).mean() < 0.03
            seen += 1
    assert seen == 6


def test_pickles_that_would_run_code_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "train").write_bytes(pickle.dumps({b"data": Payload()}))
    with pytest.raises(DataError, match="only NumPy arrays and plain data"):
        load_pickle(tmp_path / "train")
    assert not marker.exists()


def test_bad_archives_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """In this process (main(argv)); the command runs as a process in the test above."""
    assert_main_user_error(capsys, build_cifar_main, [f"--root={tmp_path / 'none'}",
                                                      f"--output={tmp_path / 'o'}"], "not found")
    # CIFAR-10's batches have `labels`, not `fine_labels`.
    root = tmp_path / "cifar-10"
    root.mkdir()
    for name in ("train", "test", "meta"):
        (root / name).write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8),
                                                b"labels": [0], b"filenames": [b"a.png"],
                                                b"fine_label_names": FINE}, protocol=2))
    assert_main_user_error(capsys, build_cifar_main, [f"--root={root}", f"--output={tmp_path / 'o'}"],
                           "has no 'fine_labels' entry")
    assert not (tmp_path / "o" / "tfrecords" / "train-00000-of-00008").exists()
