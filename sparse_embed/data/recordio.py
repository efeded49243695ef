"""InsightFace / MXNet RecordIO image packs, read without MXNet.

A pack is `train.rec` (the records), `train.idx` (text lines `key<TAB>offset`:
the byte offset of each record) and, in InsightFace face packs, a `property`
file beside them (one line `num_classes,height,width`).

Framing (dmlc-core RecordIO): every record starts with the uint32 little-endian
magic 0xced7230a and a uint32 `lrecord`; `lrecord >> 29` is the continuation
flag and its low 29 bits the payload length; the payload follows, zero-padded
to a multiple of 4 bytes. The writer splits a payload at each 4-aligned
occurrence of the magic, dropping the magic: the parts carry flag 1 (first),
2 (middle) and 3 (last); flag 0 is a record in one part. The reader joins the
parts with the magic re-inserted between them.

Payload (MXNet `recordio.pack`): an `IRHeader` (`<IfQQ`: flag, label, id,
id2); when `flag > 0`, `flag` float32 labels follow (the label vector, which
replaces the scalar label); then the encoded image, usually JPEG.

Layouts:

    face pack   key 0 is a header record with a 2-value label [a, b): images are
                keys 1 .. a-1, keys a .. b-1 are one record per identity whose
                label is that identity's [start, end) range of image keys.
    plain       every key is one image.

A pack whose key 0 has `flag == 2` and a range `1 <= a <= b` is a face pack;
any other pack is plain. An image's class is its integer label (the first value
of a label vector).

Records that cannot be read (truncated file, offset past the end, bad magic,
an image that does not decode) are skipped, counted and reported by key;
whole-file problems raise `DataError`.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from sparse_embed.errors import DataError
from sparse_embed.fileio import atomic_path

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
_FRAME = struct.Struct("<II")
_IR_HEADER = struct.Struct("<IfQQ")
LENGTH_MASK = (1 << 29) - 1
FLAG_SHIFT = 29

# Continuation flags of a record part.
WHOLE, FIRST, MIDDLE, LAST = 0, 1, 2, 3

PROPERTY = "property"
# Bytes of a payload read to parse its header without reading the image:
# the IRHeader and a label vector of up to 10 values.
HEADER_PREFIX = _IR_HEADER.size + 40
# How many skipped records the summary names; the rest are only counted.
SHOWN_SKIPS = 5
# Image formats accepted as they are, and the file extension each is extracted under.
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png"}


class RecordError(DataError):
    """One record cannot be read; the message is the short reason it is skipped."""


class IRHeader(NamedTuple):
    """MXNet's image record header.

    Attributes:
        flag: Length of the label vector; 0 when `label` is a scalar.
        label: The scalar label, or the label vector when `flag > 0`.
        id: Record id (usually the key).
        id2: Second id (unused by InsightFace).
    """

    flag: int
    label: float | tuple[float, ...]
    id: int
    id2: int

    @property
    def class_label(self) -> int:
        """The integer class: the scalar label, or the first value of the label vector."""
        return int(self.label[0] if isinstance(self.label, tuple) else self.label)


def unpack(payload: bytes) -> tuple[IRHeader, bytes]:
    """Splits an image record's payload into its header and the encoded image.

    Args:
        payload: A whole record, as returned by `RecordReader.read`.

    Returns:
        (header, image bytes).

    Raises:
        RecordError: If the payload is shorter than its header says.
    """
    if len(payload) < _IR_HEADER.size:
        raise RecordError(f"record of {len(payload)} bytes is shorter than the 24-byte image header")
    flag, label, id_, id2 = _IR_HEADER.unpack_from(payload)
    start = _IR_HEADER.size
    if flag > 0:
        end = start + 4 * flag
        if len(payload) < end:
            raise RecordError(
                f"record of {len(payload)} bytes is shorter than its {flag}-value label vector"
            )
        label = struct.unpack_from(f"<{flag}f", payload, start)
        start = end
    return IRHeader(flag, label, id_, id2), payload[start:]


class RecordReader:
    """Random access to the records of one `.rec` file.

    Picklable: a copy sent to a worker process opens the file again there.

    Args:
        path: The `.rec` file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.size = self.path.stat().st_size
        self._file: BinaryIO | None = None

    def __getstate__(self) -> dict[str, object]:
        return {"path": self.path, "size": self.size, "_file": None}

    def _handle(self) -> BinaryIO:
        if self._file is None:
            self._file = self.path.open("rb")
        return self._file

    def close(self) -> None:
        """Closes the file; a later read opens it again."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _part(self, offset: int, limit: int | None = None) -> tuple[int, bytes, int]:
        """Reads one part: (continuation flag, up to `limit` payload bytes, next part's offset)."""
        if offset + _FRAME.size > self.size:
            raise RecordError(f"truncated: no record header at byte {offset} ({self.size}-byte file)")
        file = self._handle()
        file.seek(offset)
        magic, lrecord = _FRAME.unpack(file.read(_FRAME.size))
        if magic != MAGIC:
            raise RecordError(f"bad magic 0x{magic:08x} at byte {offset}")
        flag, length = lrecord >> FLAG_SHIFT, lrecord & LENGTH_MASK
        start = offset + _FRAME.size
        if start + length > self.size:
            raise RecordError(
                f"truncated: record part at byte {offset} needs {length} bytes, "
                f"the file ends {self.size - start} bytes after its header"
            )
        payload = file.read(length if limit is None else min(length, limit))
        return flag, payload, start + ((length + 3) & ~3)

    def read(self, offset: int) -> bytes:
        """Reads the record at `offset`, joining a multi-part record.

        Args:
            offset: Byte offset of the record's first part, from the `.idx`.

        Returns:
            The payload (IRHeader, labels, image).

        Raises:
            RecordError: If the record is past the end, truncated or not framed as RecordIO.
        """
        if offset >= self.size:
            raise RecordError(f"offset {offset} is past the end of the {self.size}-byte file")
        flag, payload, following = self._part(offset)
        if flag == WHOLE:
            return payload
        if flag != FIRST:
            raise RecordError(f"record at byte {offset} starts with a continuation part (flag {flag})")
        parts = [payload]
        while flag != LAST:
            flag, payload, following = self._part(following)
            if flag not in (MIDDLE, LAST):
                raise RecordError(f"multi-part record at byte {offset} broken by a part with flag {flag}")
            parts.append(payload)
        # dmlc-core's writer dropped a magic at every split; put them back.
        return MAGIC_BYTES.join(parts)

    def read_header(self, offset: int) -> IRHeader:
        """Reads only the header of the record at `offset`, not its image.

        Args:
            offset: Byte offset of the record, from the `.idx`.

        Raises:
            RecordError: As `read`, or if the record is shorter than its header.
        """
        if offset >= self.size:
            raise RecordError(f"offset {offset} is past the end of the {self.size}-byte file")
        flag, prefix, _ = self._part(offset, HEADER_PREFIX)
        if flag not in (WHOLE, FIRST):
            raise RecordError(f"record at byte {offset} starts with a continuation part (flag {flag})")
        try:
            return unpack(prefix)[0]
        except RecordError:
            if flag == WHOLE and len(prefix) < HEADER_PREFIX:
                raise
        # A long label vector, or a magic inside the header split the record: read all of it.
        return unpack(self.read(offset))[0]


@dataclass(frozen=True)
class Property:
    """The `property` file of an InsightFace pack."""

    num_classes: int
    height: int
    width: int


@dataclass(frozen=True)
class RecordIO:
    """An opened, checked RecordIO pack.

    Attributes:
        rec: The `.rec` file.
        idx: The `.idx` file.
        offsets: Record key -> byte offset, from the `.idx`.
        layout: `face_pack` or `plain` (see the module docstring).
        image_keys: Keys of the image records, in order.
        identity_keys: Keys of the per-identity records (face packs only).
        property: The `property` file's values, when there is one.
    """

    rec: Path
    idx: Path
    offsets: dict[int, int]
    layout: str
    image_keys: tuple[int, ...]
    identity_keys: tuple[int, ...]
    property: Property | None


def read_index(path: str | os.PathLike) -> dict[int, int]:
    """Reads an `.idx` file: lines `key<TAB>offset`.

    Args:
        path: The `.idx` file.

    Returns:
        Key -> byte offset.

    Raises:
        DataError: If the file is missing, empty or has a malformed line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"RecordIO index {path} not found; the .idx must sit beside the .rec with the same name"
        )
    offsets: dict[int, int] = {}
    with path.open() as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            try:
                key, offset = int(fields[0]), int(fields[1])
            except (ValueError, IndexError):
                raise DataError(
                    f"{path} line {number} is not 'key<TAB>offset' ({line.strip()[:40]!r}); "
                    f"use the .idx written with the .rec"
                ) from None
            offsets[key] = offset
    if not offsets:
        raise DataError(f"RecordIO index {path} is empty; use the .idx written with the .rec")
    return offsets


def read_property(path: str | os.PathLike) -> Property | None:
    """Reads an InsightFace `property` file (`num_classes,height,width`).

    Args:
        path: The `property` file.

    Returns:
        Its values, or None when there is no such file.

    Raises:
        DataError: If the file exists but is not three comma-separated integers.
    """
    path = Path(path)
    if not path.is_file():
        return None
    text = path.read_text().strip()
    try:
        num_classes, height, width = (int(value) for value in text.split(","))
    except ValueError:
        raise DataError(
            f"{path} is not 'num_classes,height,width' ({text[:40]!r}); fix or remove it"
        ) from None
    return Property(num_classes, height, width)


def _face_pack_range(reader: RecordReader, offsets: dict[int, int]) -> tuple[int, int] | None:
    """The [a, b) range of a face pack's header record, or None for a plain pack."""
    if 0 not in offsets:
        return None
    try:
        header = reader.read_header(offsets[0])
    except RecordError:
        return None
    if header.flag != 2:
        return None
    first, end = (int(value) for value in header.label)
    return (first, end) if 1 <= first <= end else None


def open_recordio(rec_path: str | os.PathLike) -> RecordIO:
    """Opens and checks a RecordIO pack: files present, index readable, RecordIO framing.

    Args:
        rec_path: The `.rec` file; the `.idx` of the same name and `property` sit beside it.

    Returns:
        The pack, its layout detected.

    Raises:
        DataError: If the `.rec` or `.idx` is missing or malformed, or the `.rec` is not RecordIO.
    """
    rec = Path(rec_path)
    if not rec.is_file():
        raise DataError(
            f"RecordIO file {rec} not found; pass the train.rec of an InsightFace or MXNet pack"
        )
    idx = rec.with_suffix(".idx")
    offsets = read_index(idx)
    with rec.open("rb") as file:
        start = file.read(len(MAGIC_BYTES))
    if start != MAGIC_BYTES:
        raise DataError(
            f"{rec} is not a RecordIO file (it does not start with the RecordIO magic); "
            f"pass the .rec of an InsightFace or MXNet pack"
        )
    reader = RecordReader(rec)
    try:
        face_range = _face_pack_range(reader, offsets)
    finally:
        reader.close()
    if face_range is None:
        layout, image_keys, identity_keys = "plain", tuple(sorted(offsets)), ()
    else:
        first, end = face_range
        layout, image_keys, identity_keys = "face_pack", tuple(range(1, first)), tuple(range(first, end))
    return RecordIO(
        rec, idx, offsets, layout, image_keys, identity_keys, read_property(rec.parent / PROPERTY)
    )


def check_image(data: bytes) -> tuple[str, str]:
    """Decodes `data` to check that it is a usable JPEG or PNG image.

    Args:
        data: Encoded image bytes.

    Returns:
        (PIL format name, "") for a usable image, ("", reason) otherwise.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image_format = image.format or ""
    except UnidentifiedImageError:
        return "", "not an image (unrecognised format)"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # PIL reports truncated or corrupt data through these.
        return "", f"corrupt image: {e}"
    if image_format not in EXTENSIONS:
        return "", f"{image_format} image; expected {' or '.join(EXTENSIONS)}"
    return image_format, ""


class ImageRecord(NamedTuple):
    """One image of a pack.

    Attributes:
        key: Record key.
        label: Integer class label.
        data: The encoded image, as stored.
        format: PIL format name (`JPEG`, `PNG`) when checked, else "".
    """

    key: int
    label: int
    data: bytes
    format: str


class ImageRecords:
    """Iterates over the image records of a pack, skipping the unreadable ones.

    After (or during) iteration, `skipped` lists `(key, reason)` for every
    record that was left out.

    Args:
        pack: The opened pack.
        keys: Keys to read, in order; default all of `pack.image_keys`.
        check: Whether to decode each image and skip those that are not usable JPEG/PNG.
    """

    def __init__(self, pack: RecordIO, keys: Sequence[int] | None = None, check: bool = True) -> None:
        self.pack = pack
        self.keys = pack.image_keys if keys is None else keys
        self.check = check
        self.skipped: list[tuple[int, str]] = []

    def __iter__(self) -> Iterator[ImageRecord]:
        reader = RecordReader(self.pack.rec)
        try:
            for key in self.keys:
                offset = self.pack.offsets.get(key)
                if offset is None:
                    self.skipped.append((key, f"not in {self.pack.idx.name}"))
                    continue
                try:
                    header, data = unpack(reader.read(offset))
                except RecordError as e:
                    self.skipped.append((key, str(e)))
                    continue
                image_format = ""
                if self.check:
                    image_format, error = check_image(data)
                    if error:
                        self.skipped.append((key, error))
                        continue
                yield ImageRecord(key, header.class_label, data, image_format)
        finally:
            reader.close()


class LabelledKey(NamedTuple):
    """An image record located and labelled from its header alone."""

    key: int
    offset: int
    label: int


def scan_labels(pack: RecordIO) -> tuple[list[LabelledKey], list[tuple[int, str]]]:
    """Reads the header of every image record (not its image) to learn its label.

    Args:
        pack: The opened pack.

    Returns:
        (readable records in key order, `(key, reason)` of each record skipped).
    """
    found: list[LabelledKey] = []
    skipped: list[tuple[int, str]] = []
    reader = RecordReader(pack.rec)
    try:
        for key in tqdm(pack.image_keys, unit="rec", desc="labels", disable=None):
            offset = pack.offsets.get(key)
            if offset is None:
                skipped.append((key, f"not in {pack.idx.name}"))
                continue
            try:
                found.append(LabelledKey(key, offset, reader.read_header(offset).class_label))
            except RecordError as e:
                skipped.append((key, str(e)))
    finally:
        reader.close()
    return found, skipped


# Set in each extraction worker by `_init_worker`, so the index is sent once per worker.
_WORKER_STATE: tuple[RecordIO, Path] | None = None


def _init_worker(pack: RecordIO | None, output_dir: Path | None) -> None:
    global _WORKER_STATE
    _WORKER_STATE = None if pack is None or output_dir is None else (pack, output_dir)


def _extract_chunk(keys: Sequence[int]) -> tuple[int, set[int], list[tuple[int, str]]]:
    """Writes the images of `keys`: (images written, their labels, skipped records)."""
    assert _WORKER_STATE is not None, "_init_worker sets the pack"
    pack, output_dir = _WORKER_STATE
    records = ImageRecords(pack, keys)
    written, labels = 0, set()
    for record in records:
        path = output_dir / str(record.label) / f"{record.key}{EXTENSIONS[record.format]}"
        with atomic_path(path) as tmp:
            tmp.write_bytes(record.data)
        written += 1
        labels.add(record.label)
    return written, labels, records.skipped


def extract_images(
    pack: RecordIO, output_dir: str | os.PathLike, num_workers: int = 1, chunk_size: int = 256
) -> dict[str, object]:
    """Extracts a pack's images to `<output_dir>/<label>/<key>.jpg`, bytes unchanged.

    JPEGs are written as `.jpg`, PNGs as `.png`; each file is written under a
    temporary name and renamed. Records that cannot be read or decoded are
    skipped and reported by key.

    Args:
        pack: The opened pack.
        output_dir: Root of the folder-per-identity tree.
        num_workers: Processes reading and writing images; the keys are split between them.
        chunk_size: Keys handed to a worker at a time.

    Returns:
        Summary: output, layout, images, identities, skipped, and the first skipped
        `(key, reason)` pairs.

    Raises:
        ValueError: If `num_workers` or `chunk_size` is below 1.
    """
    if num_workers < 1 or chunk_size < 1:
        raise ValueError(f"num_workers and chunk_size must be >= 1, got {num_workers}, {chunk_size}")
    output_dir = Path(output_dir)
    keys = pack.image_keys
    chunks = [keys[i : i + chunk_size] for i in range(0, len(keys), chunk_size)]
    written, labels = 0, set()
    skipped: list[tuple[int, str]] = []
    pool = None
    if num_workers == 1:
        _init_worker(pack, output_dir)
        results: Iterator[tuple[int, set[int], list[tuple[int, str]]]] = map(_extract_chunk, chunks)
    else:
        # Fork where possible: a forked worker inherits the index instead of unpickling it.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = multiprocessing.get_context(method).Pool(
            num_workers, initializer=_init_worker, initargs=(pack, output_dir)
        )
        results = pool.imap(_extract_chunk, chunks)
    try:
        with tqdm(total=len(keys), unit="img", desc="images", disable=None) as bar:
            for chunk, (count, chunk_labels, chunk_skipped) in zip(chunks, results, strict=True):
                written += count
                labels |= chunk_labels
                skipped += chunk_skipped
                bar.update(len(chunk))
    finally:
        if pool is not None:
            pool.terminate()
        _init_worker(None, None)
    return {
        "output": str(output_dir),
        "layout": pack.layout,
        "images": written,
        "identities": len(labels),
        "skipped": len(skipped),
        "skipped_examples": skipped[:SHOWN_SKIPS],
    }
