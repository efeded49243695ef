"""TFRecord conversion: schema round trip, skipped files, determinism across workers, the CLI."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, assert_main_user_error
from PIL import Image

from sparse_embed.data.tfrecord import (
    LABEL_MAP,
    build_tfrecords,
    image_folder,
    parse_example,
    read_label_map,
)
from sparse_embed.errors import DataError
from sparse_embed.keras import tf

pytestmark = pytest.mark.unit


def _image(seed: int, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """A smooth colour ramp (JPEG re-encoding keeps it close) unique to the seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]] / max(size)
    a, b, c = rng.uniform(0, 255, (3, 3))
    pixels = np.clip(a + b * xx[..., None] + c * yy[..., None] / 2, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """3 classes: 8 RGB JPEGs, 1 PNG, 1 grey JPEG, 1 truncated JPEG, 1 text file, 1 hidden file."""
    root = tmp_path / "images"
    for c, name in enumerate(("alice", "bob", "carol")):
        (root / name).mkdir(parents=True)
        for k in range(3 if name != "carol" else 2):
            _image(10 * c + k, (40 + k, 30 + c)).save(root / name / f"{k}.jpg", quality=90)
    _image(99, (21, 17)).save(root / "bob" / "scan.png")
    _image(98, (24, 24), "L").save(root / "carol" / "grey.jpg")
    buffer = io.BytesIO()
    _image(97, (50, 50)).save(buffer, format="JPEG")
    (root / "carol" / "broken.jpg").write_bytes(buffer.getvalue()[:300])
    (root / "alice" / "notes.txt").write_text("not an image")
    (root / "alice" / ".DS_Store").write_bytes(b"\0\0")
    (root / "empty_class").mkdir()
    return root


def _read(pattern: str) -> list[dict[str, object]]:
    files = sorted(tf.io.gfile.glob(pattern))
    examples = []
    for serialized in tf.data.TFRecordDataset(files):
        features = parse_example(serialized)
        examples.append({k: v.numpy() for k, v in features.items()})
    return examples


def test_image_folder_lists_classes_and_files(folder: Path) -> None:
    paths, labels, names = image_folder(folder)
    assert names == ["alice", "bob", "carol"], "sorted; the empty folder is no class"
    assert len(paths) == len(labels) == 12
    assert all(not Path(p).name.startswith(".") for p in paths)
    assert [names[label] for label in labels] == [Path(p).parent.name for p in paths]


def test_round_trip_every_field(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "records"
    summary = build_tfrecords(folder, out, name="train", num_shards=3, num_workers=1, seed=0)
    assert sorted(p.name for p in out.iterdir()) == [
        LABEL_MAP,
        "train-00000-of-00003",
        "train-00001-of-00003",
        "train-00002-of-00003",
    ]
    assert summary["images"] == 10 and summary["skipped"] == 2 and summary["reencoded"] == 2
    assert summary["classes"] == 3 and summary["shards"] == 3
    assert {path for path, _ in summary["skipped_examples"]} == {
        "alice/notes.txt",
        "carol/broken.jpg",
    }

    names = read_label_map(out / LABEL_MAP)
    assert names == ["alice", "bob", "carol"]
    examples = _read(str(out / "train-*"))
    assert len(examples) == 10
    assert len({e["image/filename"] for e in examples}) == 10
    for e in examples:
        relative = e["image/filename"].decode()
        source = folder / relative
        assert e["image/class/text"].decode() == Path(relative).parent.name
        assert names[e["image/class/label"]] == Path(relative).parent.name
        assert e["image/format"] == b"JPEG" and e["image/colorspace"] == b"RGB"
        assert e["image/channels"] == 3
        with Image.open(source) as original:
            assert (e["image/width"], e["image/height"]) == original.size
            reference = np.asarray(original.convert("RGB"), dtype=np.float32)
        decoded = tf.io.decode_jpeg(e["image/encoded"], channels=3).numpy()
        assert decoded.shape == (e["image/height"], e["image/width"], 3)
        if source.suffix == ".jpg" and relative != "carol/grey.jpg":
            assert e["image/encoded"] == source.read_bytes(), "RGB JPEGs are stored as they are"
        else:
            assert np.abs(decoded - reference).mean() < 12, "re-encoded close to the original"


def test_output_is_independent_of_workers_and_follows_the_seed(
    folder: Path, tmp_path: Path
) -> None:
    build_tfrecords(folder, tmp_path / "one", num_shards=2, num_workers=1, seed=7)
    build_tfrecords(folder, tmp_path / "two", num_shards=2, num_workers=2, seed=7)
    build_tfrecords(folder, tmp_path / "other", num_shards=2, num_workers=1, seed=8)
    for name in ("train-00000-of-00002", "train-00001-of-00002", LABEL_MAP):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    order = [e["image/filename"] for e in _read(str(tmp_path / "one" / "train-*"))]
    other = [e["image/filename"] for e in _read(str(tmp_path / "other" / "train-*"))]
    assert sorted(order) == sorted(other) and order != other


def test_rebuild_with_fewer_shards_removes_stale_ones(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "records"
    build_tfrecords(folder, out, num_shards=4)
    (out / "val-00000-of-00001").write_bytes(b"")
    summary = build_tfrecords(folder, out, num_shards=2)
    assert summary["stale_shards_removed"] == 4
    assert sorted(p.name for p in out.iterdir()) == [
        LABEL_MAP,
        "train-00000-of-00002",
        "train-00001-of-00002",
        "val-00000-of-00001",
    ]


def test_missing_or_empty_inputs_raise(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        build_tfrecords(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no class sub-folders"):
        build_tfrecords(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="not found"):
        read_label_map(tmp_path / "labels.txt")


def test_parse_example_batch(folder: Path, tmp_path: Path) -> None:
    build_tfrecords(folder, tmp_path / "r", num_shards=1)
    batch = next(
        iter(tf.data.TFRecordDataset(str(tmp_path / "r" / "train-00000-of-00001")).batch(4))
    )
    features = parse_example(batch)
    assert (
        features["image/class/label"].shape == (4,) and features["image/encoded"].dtype == tf.string
    )


def _build_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, str(ROOT / "preprocessing" / "build_tfrecords.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.integration
def test_cli_end_to_end(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "records"
    proc = _build_cli(
        f"--input={folder}", f"--output={out}", "--name=val", "--shards=2", "--workers=2"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped" in proc.stdout and "alice/notes.txt" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        LABEL_MAP,
        "val-00000-of-00002",
        "val-00001-of-00002",
    ]
    assert len(_read(str(out / "val-*"))) == 10


def test_cli_missing_input_exits_2_and_writes_nothing(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """In this process (main(argv)); the script runs as a process in the test above."""
    from sparse_embed.preprocessing.build_tfrecords import main

    out = tmp_path / "records"
    assert_main_user_error(capsys, main, [f"--input={tmp_path / 'nope'}", f"--output={out}"],
                           "does not exist")
    assert not out.exists()
