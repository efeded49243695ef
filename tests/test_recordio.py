"""RecordIO packs without MXNet: framing, layouts, bad records, extraction and TFRecord conversion.

The fixture writer below follows the format description (dmlc-core RecordIO
framing, MXNet's IRHeader), not the reader under test.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_main_user_error, run_module
from PIL import Image

from sparse_embed.data.recordio import ImageRecords, open_recordio, read_index
from sparse_embed.data.tfrecord import (
    LABEL_MAP,
    parse_example,
    read_label_map,
    write_recordio_tfrecords,
)
from sparse_embed.errors import DataError
from sparse_embed.keras import tf
from sparse_embed.preprocessing.build_tfrecords import main as build_main
from sparse_embed.preprocessing.msceleb_to_jpeg import main as extract_main

pytestmark = pytest.mark.unit

MAGIC = struct.pack("<I", 0xCED7230A)
EXTRACT = "sparse_embed.preprocessing.msceleb_to_jpeg"
BUILD = "sparse_embed.preprocessing.build_tfrecords"


# --- fixture writer ---------------------------------------------------------------------------


def _frames(payload: bytes) -> list[bytes]:
    """One record as dmlc-core writes it: split at each 4-aligned magic (dropped), end padded to 4."""
    parts, start = [], 0
    for i in range(0, len(payload) // 4 * 4, 4):
        if payload[i : i + 4] == MAGIC:
            parts.append(payload[start:i])
            start = i + 4
    parts.append(payload[start:])
    flags = [0] if len(parts) == 1 else [1] + [2] * (len(parts) - 2) + [3]
    frames = [
        MAGIC + struct.pack("<I", flag << 29 | len(part)) + part
        for flag, part in zip(flags, parts, strict=True)
    ]
    frames[-1] += b"\0" * (-len(payload) % 4)
    return frames


def _payload(image: bytes, label: float | list[float], id_: int = 0) -> bytes:
    """MXNet's recordio.pack: IRHeader '<IfQQ', then a label vector when flag > 0, then the image."""
    if isinstance(label, list):
        header = struct.pack("<IfQQ", len(label), 0.0, id_, 0) + struct.pack(f"<{len(label)}f", *label)
    else:
        header = struct.pack("<IfQQ", 0, label, id_, 0)
    return header + image


def _write_pack(directory: Path, records: dict[int, bytes], prop: str | None = None) -> dict[int, int]:
    """Writes train.rec, train.idx (and property); returns the number of parts of each record."""
    directory.mkdir(parents=True, exist_ok=True)
    rec, index, parts = bytearray(), [], {}
    for key, payload in records.items():
        index.append(f"{key}\t{len(rec)}\n")
        frames = _frames(payload)
        parts[key] = len(frames)
        rec += b"".join(frames)
    (directory / "train.rec").write_bytes(bytes(rec))
    (directory / "train.idx").write_text("".join(index))
    if prop is not None:
        (directory / "property").write_text(prop + "\n")
    return parts


def _jpeg(seed: int, size: int = 32) -> bytes:
    """A JPEG of smooth seeded noise (a blurred random field), unique to the seed."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    coarse.resize((size, size), Image.BICUBIC).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _with_trailing_magics(image: bytes) -> bytes:
    """The JPEG, then (after its EOI marker) two magics at 4-aligned payload offsets: three parts."""
    pad = b"\0" * (-(24 + len(image)) % 4)
    return image + pad + MAGIC + b"tail" + MAGIC + b"end"


# Face pack: identities 0, 1, 2 own image keys 1-3, 4-5, 6-8; key 0 holds [9, 12), keys 9-11 the ranges.
FACE_LABELS = {1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 2, 7: 2, 8: 2}
# Plain pack: labels out of string order; key 2 stores [7, 0.5] as a label vector (scalar ignored).
PLAIN_LABELS = {0: 10, 1: 2, 2: 7, 3: 2, 4: 10, 5: 7}


@pytest.fixture
def face_pack(tmp_path: Path) -> tuple[Path, dict[int, bytes]]:
    """An InsightFace-layout pack with a header record, identity records, two multi-part images."""
    images = {key: _jpeg(key) for key in FACE_LABELS}
    images[3] = _with_trailing_magics(images[3])
    records = {0: _payload(b"", [9.0, 12.0])}
    for key, image in images.items():
        # id = magic puts the magic at payload byte 8: a split inside the header.
        records[key] = _payload(image, float(FACE_LABELS[key]), id_=0xCED7230A if key == 5 else key)
    for identity, (start, end) in enumerate(((1, 4), (4, 6), (6, 9))):
        records[9 + identity] = _payload(b"", [float(start), float(end)])
    parts = _write_pack(tmp_path / "ms1m", records, prop="3,32,32")
    assert parts[3] == 3 and parts[5] == 2, "the writer split the records holding the magic"
    assert sum(parts.values()) == len(parts) + 3
    return tmp_path / "ms1m", images


@pytest.fixture
def plain_pack(tmp_path: Path) -> tuple[Path, dict[int, bytes]]:
    """One record per image, no header record, no property file."""
    images = {key: _jpeg(100 + key) for key in PLAIN_LABELS}
    records = {
        key: _payload(image, [7.0, 0.5] if key == 2 else float(PLAIN_LABELS[key]))
        for key, image in images.items()
    }
    records[2] = records[2][:4] + struct.pack("<f", 99.0) + records[2][8:]
    _write_pack(tmp_path / "plain", records)
    return tmp_path / "plain", images


BAD_CASES = ("bad_magic", "corrupt_jpeg", "offset_past_end", "truncated")


@pytest.fixture
def bad_pack(tmp_path: Path) -> tuple[Path, dict[int, bytes], dict[str, int]]:
    """A plain pack of 8 images with one record broken in each of the ways in BAD_CASES."""
    broken = dict(zip(BAD_CASES, (2, 4, 5, 7), strict=True))
    images = {key: _jpeg(200 + key) for key in range(8)}
    corrupt = images[broken["corrupt_jpeg"]]
    images[broken["corrupt_jpeg"]] = corrupt[: len(corrupt) * 2 // 3]
    directory = tmp_path / "bad"
    _write_pack(directory, {key: _payload(image, float(key % 3)) for key, image in images.items()})
    offsets = read_index(directory / "train.idx")
    rec = bytearray((directory / "train.rec").read_bytes())
    at = offsets[broken["bad_magic"]]
    rec[at : at + 4] = b"JUNK"
    del rec[offsets[broken["truncated"]] + 40 :]
    (directory / "train.rec").write_bytes(bytes(rec))
    offsets[broken["offset_past_end"]] = len(rec) + 4096
    (directory / "train.idx").write_text("".join(f"{k}\t{v}\n" for k, v in offsets.items()))
    return directory, images, broken


def _read_tfrecords(pattern: str) -> list[dict[str, object]]:
    files = sorted(tf.io.gfile.glob(pattern))
    return [
        {k: v.numpy() for k, v in parse_example(serialized).items()}
        for serialized in tf.data.TFRecordDataset(files)
    ]


# --- reading ----------------------------------------------------------------------------------


def test_face_pack_layout_labels_property_and_multipart(
    face_pack: tuple[Path, dict[int, bytes]],
) -> None:
    directory, images = face_pack
    pack = open_recordio(directory / "train.rec")
    assert pack.layout == "face_pack"
    assert pack.image_keys == tuple(range(1, 9)) and pack.identity_keys == (9, 10, 11)
    assert (pack.property.num_classes, pack.property.height, pack.property.width) == (3, 32, 32)
    records = ImageRecords(pack)
    got = {r.key: (r.label, r.data, r.format) for r in records}
    assert records.skipped == []
    assert got == {key: (FACE_LABELS[key], images[key], "JPEG") for key in FACE_LABELS}
    assert got[3][1].count(MAGIC) == 2, "the magics the writer dropped are back in place"


def test_plain_layout_labels_and_label_vectors(plain_pack: tuple[Path, dict[int, bytes]]) -> None:
    directory, images = plain_pack
    pack = open_recordio(directory / "train.rec")
    assert pack.layout == "plain" and pack.property is None
    assert pack.image_keys == tuple(range(6))
    got = {r.key: (r.label, r.data) for r in ImageRecords(pack)}
    assert got == {key: (PLAIN_LABELS[key], images[key]) for key in PLAIN_LABELS}


@pytest.mark.parametrize("case", BAD_CASES)
def test_each_bad_record_is_skipped_and_reported_by_key(
    bad_pack: tuple[Path, dict[int, bytes], dict[str, int]], case: str
) -> None:
    directory, _, broken = bad_pack
    records = ImageRecords(open_recordio(directory / "train.rec"))
    keys = [r.key for r in records]
    reasons = dict(records.skipped)
    assert sorted(reasons) == sorted(broken.values())
    assert broken[case] not in keys and sorted(keys + list(reasons)) == list(range(8))
    expected = {
        "bad_magic": "bad magic",
        "corrupt_jpeg": "corrupt image",
        "offset_past_end": "past the end",
        "truncated": "truncated",
    }[case]
    assert expected in reasons[broken[case]], reasons


def test_whole_file_problems_raise(tmp_path: Path, plain_pack: tuple[Path, dict[int, bytes]]) -> None:
    directory, _ = plain_pack
    with pytest.raises(DataError, match="not found"):
        open_recordio(tmp_path / "nowhere" / "train.rec")
    (directory / "train.idx").rename(directory / "other.idx")
    with pytest.raises(DataError, match=r"train\.idx not found"):
        open_recordio(directory / "train.rec")
    fake = tmp_path / "fake"
    fake.mkdir()
    Image.new("RGB", (8, 8)).save(fake / "train.rec", format="PNG")
    (fake / "train.idx").write_text("0\t0\n")
    with pytest.raises(DataError, match="not a RecordIO file"):
        open_recordio(fake / "train.rec")
    (fake / "train.idx").write_text("zero\tnothing\n")
    with pytest.raises(DataError, match="line 1"):
        open_recordio(fake / "train.rec")


# --- TFRecords --------------------------------------------------------------------------------


def test_recordio_to_tfrecords_keeps_jpeg_bytes(
    face_pack: tuple[Path, dict[int, bytes]], tmp_path: Path
) -> None:
    directory, images = face_pack
    out = tmp_path / "records"
    summary = write_recordio_tfrecords(open_recordio(directory / "train.rec"), out, num_shards=2)
    assert summary["images"] == 8 and summary["skipped"] == 0 and summary["reencoded"] == 0
    assert summary["classes"] == 3
    names = read_label_map(out / LABEL_MAP)
    assert names == ["0", "1", "2"]
    examples = _read_tfrecords(str(out / "train-*"))
    assert len(examples) == 8
    for e in examples:
        label, key = e["image/filename"].decode().removesuffix(".jpg").split("/")
        assert int(label) == FACE_LABELS[int(key)]
        assert names[e["image/class/label"]] == e["image/class/text"].decode() == label
        assert e["image/encoded"] == images[int(key)], "the JPEG is copied byte for byte"
        assert (e["image/height"], e["image/width"]) == (32, 32)
        assert tf.io.decode_jpeg(e["image/encoded"]).shape == (32, 32, 3)


def test_plain_pack_labels_are_sorted_numerically(
    plain_pack: tuple[Path, dict[int, bytes]], tmp_path: Path
) -> None:
    directory, _ = plain_pack
    write_recordio_tfrecords(open_recordio(directory / "train.rec"), tmp_path / "r", num_shards=1)
    names = read_label_map(tmp_path / "r" / LABEL_MAP)
    assert names == ["2", "7", "10"]
    for e in _read_tfrecords(str(tmp_path / "r" / "train-*")):
        key = int(e["image/filename"].decode().split("/")[1].removesuffix(".jpg"))
        assert names[e["image/class/label"]] == str(PLAIN_LABELS[key])


@pytest.mark.integration
def test_build_tfrecords_cli_skips_bad_records(
    bad_pack: tuple[Path, dict[int, bytes], dict[str, int]], tmp_path: Path
) -> None:
    directory, images, broken = bad_pack
    out = tmp_path / "records"
    proc = run_module(
        BUILD, f"--recordio={directory / 'train.rec'}", f"--output={out}", "--shards=2", "--workers=2"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped" in proc.stdout
    for key in broken.values():
        assert f"/{key}.jpg" in proc.stdout or f"key {key}" in proc.stdout, proc.stdout
    examples = _read_tfrecords(str(out / "train-*"))
    good = sorted(set(range(8)) - set(broken.values()))
    stored = {int(e["image/filename"].decode().split("/")[1][:-4]): e["image/encoded"] for e in examples}
    assert stored == {key: images[key] for key in good}


# --- extraction -------------------------------------------------------------------------------


@pytest.mark.integration
def test_msceleb_to_jpeg_tree_and_bytes(face_pack: tuple[Path, dict[int, bytes]]) -> None:
    directory, images = face_pack
    proc = run_module(EXTRACT, str(directory), "--workers=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted((directory / "images").rglob("*"))
    written = {f.relative_to(directory / "images").as_posix(): f.read_bytes() for f in files if f.is_file()}
    assert written == {f"{FACE_LABELS[key]}/{key}.jpg": images[key] for key in FACE_LABELS}
    assert "identities" in proc.stdout and "3 classes, 32x32" in proc.stdout


@pytest.mark.integration
def test_msceleb_to_jpeg_skips_bad_records(
    bad_pack: tuple[Path, dict[int, bytes], dict[str, int]],
) -> None:
    directory, images, broken = bad_pack
    proc = run_module(EXTRACT, str(directory), "--workers=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip().startswith("skipped key")]
    assert sorted(int(line.split()[2]) for line in lines) == sorted(broken.values())
    good = set(range(8)) - set(broken.values())
    written = {int(f.stem) for f in (directory / "images").rglob("*.jpg")}
    assert written == good
    assert not list((directory / "images").rglob(".*")), "no temporary files left"


def test_cli_user_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """In this process (main(argv)); both commands run as processes in the tests above."""
    assert_main_user_error(capsys, extract_main, [tmp_path / "missing"], "train.rec", "not found")
    fake = tmp_path / "fake"
    fake.mkdir()
    Image.new("RGB", (8, 8)).save(fake / "train.rec", format="PNG")
    (fake / "train.idx").write_text("0\t0\n")
    assert_main_user_error(capsys, extract_main, [fake], "train.rec", "not a RecordIO file")
    assert_main_user_error(capsys, build_main,
                           [f"--recordio={fake / 'train.rec'}", f"--output={tmp_path / 'o'}"],
                           "train.rec", "not a RecordIO file")
    assert not (tmp_path / "o").exists()
    assert_main_user_error(capsys, build_main,
                           [f"--recordio={tmp_path / 'x.rec'}", f"--output={tmp_path / 'o'}"],
                           "x.rec", "not found")
