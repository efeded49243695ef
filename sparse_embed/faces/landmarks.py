"""Dataset-supplied face boxes and landmarks, used instead of detection when a dataset ships them.

Formats (`LANDMARK_FORMATS`, chosen by name or by `detect_format`):

    lfw        One text line per image: the image path relative to the LFW root,
               then ten numbers x1 y1 ... x5 y5, separated by tabs or spaces
               (SphereFace's `lfw_landmark.txt`, as read by the OpenVINO
               training_extensions face recognition toolkit). Points in
               LANDMARK_NAMES order.
    vggface2   VGGFace2's `bb_landmark/loose_landmark_{train,test}.csv`: header
               `NAME_ID,P1X,P1Y,...,P5X,P5Y`, NAME_ID like `n000002/0001_01`
               (the image path without `.jpg`). Boxes come from the
               `loose_bb_*.csv` beside it (`NAME_ID,X,Y,W,H`) when there is one.
    megaface   One JSON per image, `foo.jpg.json` beside `foo.jpg`:
               `{"bounding_box": {"x", "y", "width", "height"}, "landmarks":
               {"0": {"x", "y"}, "1": ..., "2": ...}, ...}`. The points are the
               image-right eye ("0"), the image-left eye ("1") and the nose
               ("2") -- the reading of insightface's MegaFace alignment script --
               so the five points cannot be derived: the box and the three
               points guide detection instead (see `FaceAnnotation`).

An annotation is keyed by the image path relative to the image tree, with `/`
separators. A file that is missing or has a line that cannot be parsed is a
`DataError` naming the file and the line.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparse_embed.errors import DataError
from sparse_embed.registry import Registry

# The suffix a MegaFace annotation adds to its image's file name.
MEGAFACE_SUFFIX = ".json"
# The VGGFace2 landmark and box CSVs: file-name prefixes and headers.
VGGFACE2_LANDMARK_PREFIX = "loose_landmark_"
VGGFACE2_BOX_PREFIX = "loose_bb_"
VGGFACE2_LANDMARK_HEADER = ("NAME_ID", "P1X", "P1Y", "P2X", "P2Y", "P3X", "P3Y", "P4X", "P4Y", "P5X", "P5Y")
VGGFACE2_BOX_HEADER = ("NAME_ID", "X", "Y", "W", "H")
VGGFACE2_EXTENSION = ".jpg"


@dataclass(frozen=True, eq=False)
class FaceAnnotation:
    """Where a dataset says the face of one image is.

    Attributes:
        box: (x, y, width, height) in image pixels, or None.
        landmarks: [5, 2] float64 (x, y) points in LANDMARK_NAMES order, or None
            when the dataset does not give all five (the face is then detected,
            inside `box` when there is one).
        eyes_nose: [3, 2] float64 left eye, right eye, nose (image order) when
            the dataset gives those three but not the mouth corners, else None.
    """

    box: tuple[float, float, float, float] | None = None
    landmarks: np.ndarray | None = None
    eyes_nose: np.ndarray | None = None


@dataclass(frozen=True)
class LandmarkFormat:
    """One dataset's landmark file layout.

    Attributes:
        description: One line for --help and error messages.
        sniff: Whether a path looks like this format (cheap: reads at most a few lines).
        read: Reads a path into {relative image path: annotation}.
    """

    description: str
    sniff: Callable[[Path], bool]
    read: Callable[[Path], dict[str, FaceAnnotation]]


LANDMARK_FORMATS: Registry[LandmarkFormat] = Registry("landmark format")


def _point_array(values: list[float], path: Path, number: int) -> np.ndarray:
    """[5, 2] landmarks from ten numbers; a degenerate set is a DataError naming the line."""
    points = np.asarray(values, dtype=np.float64).reshape(5, 2)
    if not np.all(np.isfinite(points)) or np.ptp(points, axis=0).max() <= 0:
        raise DataError(f"{path} line {number}: the five landmarks are not finite, distinct points")
    return points


def _relative(name: str) -> str:
    """An image path as written in a landmark file, normalised to a relative `/` path."""
    name = name.strip().replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


# --- lfw ---------------------------------------------------------------------------------------


def _numbers(fields: list[str]) -> list[float] | None:
    try:
        return [float(field) for field in fields]
    except ValueError:
        return None


def _sniff_lfw(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open(errors="replace") as lines:
        for line in lines:
            fields = line.split()
            if fields:
                return len(fields) == 11 and _numbers(fields[1:]) is not None
    return False


def read_lfw_landmarks(path: str | os.PathLike) -> dict[str, FaceAnnotation]:
    """Reads an LFW landmark file: `path x1 y1 ... x5 y5` per line.

    Args:
        path: The text file (e.g. `lfw_landmark.txt`).

    Returns:
        {relative image path: annotation with landmarks}.

    Raises:
        DataError: If the file is missing or empty, or a line is not a path and ten numbers.
    """
    path = _existing_file(path, "LFW landmark file")
    annotations: dict[str, FaceAnnotation] = {}
    with path.open(errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if not fields:
                continue
            values = _numbers(fields[1:])
            if len(fields) != 11 or values is None:
                raise DataError(
                    f"{path} line {number} is not an image path and ten numbers x1 y1 ... x5 y5 "
                    f"({line.strip()[:60]!r})"
                )
            annotations[_relative(fields[0])] = FaceAnnotation(landmarks=_point_array(values, path, number))
    if not annotations:
        raise DataError(f"LFW landmark file {path} is empty")
    return annotations


LANDMARK_FORMATS.register("lfw")(LandmarkFormat(
    "text lines 'relative/image.jpg x1 y1 ... x5 y5' (lfw_landmark.txt)", _sniff_lfw, read_lfw_landmarks))


# --- vggface2 ----------------------------------------------------------------------------------


def _csv_rows(path: Path, header: tuple[str, ...]) -> list[tuple[int, str, list[float]]]:
    """(line number, NAME_ID, values) of a VGGFace2 CSV whose first row must be `header`."""
    with path.open(newline="", errors="replace") as file:
        reader = csv.reader(file)
        first = next(reader, None)
        if first is None or tuple(field.strip() for field in first) != header:
            raise DataError(f"{path} line 1 is not the header {','.join(header)} "
                            f"({','.join(first or [])[:60]!r})")
        rows = []
        for row in reader:
            if not row or not "".join(row).strip():
                continue
            values = _numbers(row[1:])
            if len(row) != len(header) or values is None:
                raise DataError(f"{path} line {reader.line_num} is not {','.join(header)} "
                                f"({','.join(row)[:60]!r})")
            rows.append((reader.line_num, row[0].strip(), values))
    return rows


def _sniff_vggface2(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open(newline="", errors="replace") as file:
        first = next(csv.reader(file), None)
    return first is not None and tuple(field.strip() for field in first) == VGGFACE2_LANDMARK_HEADER


def read_vggface2_landmarks(path: str | os.PathLike) -> dict[str, FaceAnnotation]:
    """Reads a VGGFace2 `loose_landmark_*.csv`, with the boxes of the `loose_bb_*.csv` beside it.

    Args:
        path: The landmark CSV.

    Returns:
        {NAME_ID + ".jpg": annotation with landmarks, and the box when the box CSV has it}.

    Raises:
        DataError: If a file is missing, has the wrong header or a malformed row.
    """
    path = _existing_file(path, "VGGFace2 landmark CSV")
    boxes: dict[str, tuple[float, float, float, float]] = {}
    if path.name.startswith(VGGFACE2_LANDMARK_PREFIX):
        box_path = path.with_name(VGGFACE2_BOX_PREFIX + path.name[len(VGGFACE2_LANDMARK_PREFIX):])
        if box_path.is_file():
            boxes = {name: tuple(values) for _, name, values in _csv_rows(box_path, VGGFACE2_BOX_HEADER)}
    annotations = {}
    for number, name, values in _csv_rows(path, VGGFACE2_LANDMARK_HEADER):
        annotations[_relative(name) + VGGFACE2_EXTENSION] = FaceAnnotation(
            box=boxes.get(name), landmarks=_point_array(values, path, number))
    if not annotations:
        raise DataError(f"VGGFace2 landmark CSV {path} has a header but no rows")
    return annotations


LANDMARK_FORMATS.register("vggface2")(LandmarkFormat(
    "VGGFace2 loose_landmark_*.csv (NAME_ID,P1X,...,P5Y), loose_bb_*.csv boxes beside it",
    _sniff_vggface2, read_vggface2_landmarks))


# --- megaface ----------------------------------------------------------------------------------


def read_megaface_json(path: str | os.PathLike) -> FaceAnnotation:
    """Reads one MegaFace / FaceScrub-devkit annotation, `<image>.json`.

    Args:
        path: The JSON file.

    Returns:
        The box (from "bounding_box") and, when "landmarks" has points "0", "1"
        and "2", `eyes_nose` (image-left eye "1", image-right eye "0", nose "2").
        `landmarks` is None: the files carry no mouth corners, so the five
        points come from detection inside the box.

    Raises:
        DataError: If the file is missing, is not JSON, or a present field is malformed.
    """
    path = _existing_file(path, "MegaFace annotation")
    try:
        data = json.loads(path.read_text(errors="replace"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno} is not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a JSON object with 'bounding_box' and 'landmarks'")
    box = None
    try:
        if "bounding_box" in data:
            bb = data["bounding_box"]
            box = (float(bb["x"]), float(bb["y"]), float(bb["width"]), float(bb["height"]))
            if box[2] <= 0 or box[3] <= 0:
                raise ValueError("empty box")
        eyes_nose = None
        points = data.get("landmarks") or {}
        if all(key in points for key in ("0", "1", "2")):
            eyes_nose = np.array([[float(points[key]["x"]), float(points[key]["y"])]
                                  for key in ("1", "0", "2")])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(
            f"{path}: 'bounding_box' must be {{x, y, width, height}} with a positive size and "
            f"'landmarks' {{'0': {{x, y}}, ...}} ({type(e).__name__}: {e})"
        ) from None
    return FaceAnnotation(box=box, eyes_nose=eyes_nose)


def _sniff_megaface(path: Path) -> bool:
    return path.is_dir() or path.name.endswith(MEGAFACE_SUFFIX)


def read_megaface_tree(path: str | os.PathLike) -> dict[str, FaceAnnotation]:
    """Reads every `<image>.json` under a MegaFace / FaceScrub image tree.

    Args:
        path: The directory (usually the image tree itself).

    Returns:
        {relative image path (the JSON's path without ".json"): annotation}.

    Raises:
        DataError: If the directory is missing or holds no annotation, or one is malformed.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"MegaFace annotation folder {root} not found; pass the image tree "
                        f"whose images have <image>.json beside them")
    annotations = {}
    for json_path in sorted(root.rglob("*" + MEGAFACE_SUFFIX)):
        name = json_path.relative_to(root).as_posix()[: -len(MEGAFACE_SUFFIX)]
        annotations[name] = read_megaface_json(json_path)
    if not annotations:
        raise DataError(f"no <image>{MEGAFACE_SUFFIX} annotation under {root}")
    return annotations


LANDMARK_FORMATS.register("megaface")(LandmarkFormat(
    "a folder of MegaFace <image>.jpg.json files (bounding_box, 3 landmarks)",
    _sniff_megaface, read_megaface_tree))


# --- choosing and reading ----------------------------------------------------------------------


def _existing_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} not found")
    return path


def detect_format(path: str | os.PathLike) -> str:
    """The name of the registered format that `path` looks like.

    Args:
        path: A landmark file, or a folder of MegaFace JSON files.

    Raises:
        DataError: If `path` is missing or matches no format.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"landmark file {path} not found")
    for name in LANDMARK_FORMATS.names():
        if LANDMARK_FORMATS.get(name).sniff(path):
            return name
    raise DataError(
        f"cannot tell the landmark format of {path}; pass --landmarks_format "
        f"({', '.join(LANDMARK_FORMATS.names())})"
    )


def read_landmarks(path: str | os.PathLike, landmarks_format: str | None = None
                   ) -> dict[str, FaceAnnotation]:
    """Reads a landmark file of the given format, or of the format it looks like.

    Args:
        path: A landmark file or folder.
        landmarks_format: A registered format name; None detects it.

    Returns:
        {relative image path: annotation}.

    Raises:
        ConfigError: If `landmarks_format` is unknown.
        DataError: If the file is missing or malformed.
    """
    name = detect_format(path) if landmarks_format is None else landmarks_format
    return LANDMARK_FORMATS.get(name).read(Path(path))
