"""Landmark examples: face crops and their five points, from the synthetic faces or CelebA.

Readers (`LANDMARK_SOURCES`, by `data_format`) return `LandmarkExample`s (an
image path, the crop box, the five points in image pixels); `load_crops`
cuts and resizes the crops and puts the points in crop units ([0, 1]).

CelebA's lists (`read_celeba`), as the data set ships them:

    list_landmarks_align_celeba.txt    line 1: the number of images; line 2: the header
                                       lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y
                                       leftmouth_x leftmouth_y rightmouth_x rightmouth_y;
                                       then `000001.jpg 69 109 106 113 77 142 73 152 108 154`
    list_bbox_celeba.txt               line 1: the count; line 2: `image_id x_1 y_1 width height`;
                                       then `000001.jpg 95 71 226 313`

CelebA's "left" is the image's left (lefteye_x < righteye_x), the order of
Landnet's and MTCNN's points. The box list belongs to the in-the-wild images
(with `list_landmarks_celeba.txt`); without one, each image's central square
is its crop (the aligned images). NumPy and PIL only.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sparse_embed.errors import DataError
from sparse_embed.faces.landmarks import FaceAnnotation
from sparse_embed.landmarks.config import LandmarksConfig
from sparse_embed.registry import Registry

CELEBA_LANDMARK_HEADER = ("lefteye_x", "lefteye_y", "righteye_x", "righteye_y", "nose_x", "nose_y",
                          "leftmouth_x", "leftmouth_y", "rightmouth_x", "rightmouth_y")
CELEBA_BOX_HEADER = ("image_id", "x_1", "y_1", "width", "height")
# Mirror image: the points' order after a horizontal flip (left and right swap).
FLIP_ORDER = (1, 0, 2, 4, 3)


@dataclass(frozen=True, eq=False)
class LandmarkExample:
    """One annotated face.

    Attributes:
        image: The image file.
        box: (x, y, width, height) of the crop in image pixels, or None: the image's central square.
        points: float64 [5, 2] (x, y) in image pixels, eyes, nose tip, mouth corners (image order).
    """

    image: Path
    box: tuple[float, float, float, float] | None
    points: np.ndarray


def _read_list(path: Path, header: Sequence[str]) -> dict[str, np.ndarray]:
    """A CelebA list: count line, header line, then `name v1 v2 ...` rows."""
    if not path.is_file():
        raise DataError(f"{path} not found")
    lines = path.read_text().splitlines()
    if len(lines) < 2:
        raise DataError(f"{path}: expected a count line and a header line, got {len(lines)} line(s)")
    try:
        count = int(lines[0].strip())
    except ValueError as e:
        raise DataError(f"{path}:1: expected the number of images, got {lines[0]!r}") from e
    if tuple(lines[1].split()) != tuple(header):
        raise DataError(f"{path}:2: expected the header {' '.join(header)}, got {lines[1]!r}")
    rows: dict[str, np.ndarray] = {}
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        # The name, then one value per header column (the box list names its name column).
        width = len([h for h in header if h != "image_id"]) + 1
        try:
            if len(fields) != width:
                raise ValueError(f"{len(fields)} fields, expected {width}")
            rows[fields[0]] = np.array([float(v) for v in fields[1:]])
        except ValueError as e:
            raise DataError(f"{path}:{number}: cannot read {line!r} ({e})") from e
    if len(rows) != count:
        raise DataError(f"{path}: line 1 says {count} images, the list has {len(rows)}")
    return rows


def read_celeba(landmarks_path: str | os.PathLike,
                bbox_path: str | os.PathLike | None = None) -> dict[str, FaceAnnotation]:
    """Reads CelebA's landmark list and, optionally, its box list.

    Args:
        landmarks_path: `list_landmarks_align_celeba.txt` (or `list_landmarks_celeba.txt`).
        bbox_path: `list_bbox_celeba.txt`, or None.

    Returns:
        Image file name -> annotation: `landmarks` [5, 2] (x, y) pixels, `box`
        (x, y, width, height) when a box list is given.

    Raises:
        DataError: If a file is missing, a line cannot be read, the count line
            disagrees with the rows, or an image with landmarks has no box.
    """
    points = _read_list(Path(landmarks_path), CELEBA_LANDMARK_HEADER)
    boxes = _read_list(Path(bbox_path), CELEBA_BOX_HEADER) if bbox_path else {}
    if bbox_path:
        missing = sorted(set(points) - set(boxes))
        if missing:
            raise DataError(f"{bbox_path}: no box for {len(missing)} image(s) of {landmarks_path}, "
                            f"first {missing[0]}")
    return {name: FaceAnnotation(box=tuple(float(v) for v in boxes[name]) if name in boxes else None,
                                 landmarks=values.reshape(5, 2))
            for name, values in points.items()}


LANDMARK_SOURCES: Registry[Callable[[LandmarksConfig, Path, bool], list[LandmarkExample]]] = Registry(
    "landmarks data_format")


@LANDMARK_SOURCES.register("synthetic")
def _synthetic(config: LandmarksConfig, data_dir: Path, train: bool) -> list[LandmarkExample]:
    path = data_dir / config.landmarks_file
    if not path.is_file():
        raise DataError(f"{path} not found: generate the faces with `python -m sparse_embed.data.synthetic "
                        f"--write_landmarks`")
    split = (config.train_split if train else config.test_split) + "/"
    examples = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row["image"].startswith(split):
                values = np.array([float(row[k]) for k in list(row)[1:]]).reshape(5, 2)
                examples.append(LandmarkExample(data_dir / row["image"], None, values))
    if not examples:
        raise DataError(f"{path} lists no image of split {split.rstrip('/')!r}")
    return examples


@LANDMARK_SOURCES.register("celeba")
def _celeba(config: LandmarksConfig, data_dir: Path, train: bool) -> list[LandmarkExample]:
    annotations = read_celeba(data_dir / config.landmarks_file,
                              data_dir / config.bbox_file if config.bbox_file else None)
    names = sorted(annotations)
    held_out = max(1, round(len(names) * config.test_fraction))
    names = names[:-held_out] if train else names[-held_out:]
    return [LandmarkExample(data_dir / config.image_dir / name, annotations[name].box,
                            annotations[name].landmarks) for name in names]


def read_examples(config: LandmarksConfig, data_dir: str | os.PathLike, train: bool) -> list[LandmarkExample]:
    """The training or the held-out examples of a config's data.

    Args:
        config: The run's config (`data_format` and its files).
        data_dir: The directory the config's files are relative to.
        train: The training examples, else the held-out ones.
    """
    return LANDMARK_SOURCES.get(config.data_format)(config, Path(data_dir), train)


def central_square(width: int, height: int) -> tuple[float, float, float, float]:
    """The largest square centred in a width x height image, as (x, y, side, side).

    Args:
        width: Image width in pixels.
        height: Image height in pixels.
    """
    side = min(width, height)
    return (width - side) / 2, (height - side) / 2, float(side), float(side)


def crop(image: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """Cuts `box` out of an image and resizes it to size x size (outside the image is black).

    Args:
        image: uint8 [H, W, 3] RGB.
        box: (x, y, width, height) in pixels.
        size: Output side in pixels.

    Returns:
        float32 [size, size, 3] in [0, 1], Landnet's input.
    """
    x, y, w, h = box
    height, width = image.shape[:2]
    # Pad so that the box lies inside (a detector's box may cross the border), then let
    # PIL's resize filter the box region: a plain transform would alias when shrinking.
    pad = int(np.ceil(max(0.0, -x, -y, x + w - width, y + h - height)))
    if pad:
        image = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    pil = Image.fromarray(np.ascontiguousarray(image[..., :3])).convert("RGB")
    resized = pil.resize((size, size), Image.BILINEAR, box=(x + pad, y + pad, x + pad + w, y + pad + h))
    return np.asarray(resized, np.float32) / 255.0


def to_crop_units(points: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Image-pixel points [5, 2] -> crop units ([0, 1] inside the box).

    Args:
        points: (x, y) pixels.
        box: (x, y, width, height) of the crop.
    """
    x, y, w, h = box
    return (np.asarray(points, np.float64) - (x, y)) / (w, h)


def from_crop_units(points: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Crop units -> image pixels, the inverse of `to_crop_units`.

    Args:
        points: [..., 2] (x, y) in crop units.
        box: (x, y, width, height) of the crop.
    """
    x, y, w, h = box
    return np.asarray(points, np.float64).reshape(-1, 5, 2) * (w, h) + (x, y)


def load_crops(examples: Sequence[LandmarkExample], size: int) -> tuple[np.ndarray, np.ndarray]:
    """The network's inputs and targets for a list of examples.

    Args:
        examples: From `read_examples`.
        size: The network's input side.

    Returns:
        (float32 [N, size, size, 3] crops in [0, 1], float32 [N, 10] points in crop units).

    Raises:
        DataError: If an image cannot be read.
    """
    images, targets = [], []
    for example in examples:
        try:
            with Image.open(example.image) as pil:
                pixels = np.asarray(pil.convert("RGB"))
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read image {example.image}: {e}") from e
        box = example.box or central_square(pixels.shape[1], pixels.shape[0])
        images.append(crop(pixels, box, size))
        targets.append(to_crop_units(example.points, box).ravel())
    return np.stack(images).astype(np.float32), np.stack(targets).astype(np.float32)


def mirrored(images: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal mirror images and their points (x -> 1 - x, left and right swapped).

    Args:
        images: [N, H, W, 3] crops.
        points: [N, 10] points in crop units.
    """
    p = points.reshape(-1, 5, 2)[:, FLIP_ORDER].copy()
    p[..., 0] = 1.0 - p[..., 0]
    return images[:, :, ::-1], p.reshape(-1, 10).astype(points.dtype)
