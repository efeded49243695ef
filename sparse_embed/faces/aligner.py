"""Face crops from images: choose the face (policy), align it, and do so for a whole folder tree.

`align_image` turns one image into aligned crops: the dataset's landmarks when
it gives them, otherwise MTCNN's, the face chosen by a policy (`POLICIES`):

    center    the face whose box centre is nearest the image centre (the usual
              choice for LFW and MegaFace, whose images are centred on their subject)
    largest   the face with the largest box
    all       every face, most confident first

A face-less image gives no crop: it is reported, never silently replaced by a
centre crop, unless a fallback (`FALLBACKS`, e.g. `center_crop`) is asked for,
and then it is counted as a fallback. `align_tree` does this for every image
of a folder tree with several processes, mirroring the tree into JPEG crops.

This module does not import TensorFlow: a detector is built (and MTCNN
imported, from `sparse_embed.faces.detect`) only where one is needed.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from sparse_embed.errors import ConfigError, DataError
from sparse_embed.faces.align import align, as_rgb_uint8, template
from sparse_embed.faces.landmarks import FaceAnnotation, read_landmarks
from sparse_embed.fileio import atomic_path
from sparse_embed.registry import Registry

if TYPE_CHECKING:
    from sparse_embed.faces.detect import Face, FaceDetector

# Files whose suffix is one of these are images to align; others in the tree are left alone.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"})
JPEG_QUALITY = 95
# A detection counts as the face a dataset's box marks when they overlap this much (IoU),
# insightface's threshold in its MegaFace alignment.
MIN_BOX_IOU = 0.3
# How many examples of each problem the summary names; the rest are only counted.
SHOWN_EXAMPLES = 5

# How an image's crops were obtained (`Aligned.outcome`).
FROM_LANDMARKS = "landmarks"  # the dataset's five points
FROM_DETECTION = "detected"  # MTCNN's five points
FROM_EYES_NOSE = "eyes_nose"  # the dataset's eyes and nose (no mouth corners), no detection matched
NO_FACE = "no_face"
FALLBACK = "fallback"
ALIGNED_OUTCOMES = (FROM_LANDMARKS, FROM_DETECTION, FROM_EYES_NOSE)


# --- policies and fallbacks --------------------------------------------------------------------

Policy = Callable[[Sequence["Face"], tuple[int, int]], list["Face"]]
POLICIES: Registry[Policy] = Registry("face policy")


@POLICIES.register("center")
def _center(faces: Sequence[Face], shape: tuple[int, int]) -> list[Face]:
    """The face whose box centre is nearest the image centre."""
    cy, cx = shape[0] / 2, shape[1] / 2
    return [min(faces, key=lambda f: (f.centre[0] - cx) ** 2 + (f.centre[1] - cy) ** 2)] if faces else []


@POLICIES.register("largest")
def _largest(faces: Sequence[Face], shape: tuple[int, int]) -> list[Face]:
    """The face with the largest box."""
    return [max(faces, key=lambda f: f.area)] if faces else []


@POLICIES.register("all")
def _all(faces: Sequence[Face], shape: tuple[int, int]) -> list[Face]:
    """Every face, most confident first."""
    return sorted(faces, key=lambda f: -f.confidence)


Fallback = Callable[[np.ndarray, str], np.ndarray]
FALLBACKS: Registry[Fallback] = Registry("fallback")


@FALLBACKS.register("center_crop")
def center_crop(image: np.ndarray, crop: str) -> np.ndarray:
    """The largest centred region of the crop's aspect ratio, resized to the crop size.

    Args:
        image: [H, W, C] image.
        crop: A registered crop name.
    """
    size = template(crop)
    height, width = image.shape[:2]
    scale = min(width / size.width, height / size.height)
    w, h = max(1, round(size.width * scale)), max(1, round(size.height * scale))
    x, y = (width - w) // 2, (height - h) // 2
    return cv2.resize(image[y : y + h, x : x + w], (size.width, size.height), interpolation=cv2.INTER_AREA)


# --- one image ---------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Aligned:
    """The crops of one image and how they were obtained.

    Attributes:
        crops: Aligned [height, width, 3] crops, in the policy's order; empty for no face.
        outcome: One of FROM_LANDMARKS, FROM_DETECTION, FROM_EYES_NOSE, NO_FACE, FALLBACK.
        faces_found: Faces the detector found (1 for dataset landmarks).
    """

    crops: tuple[np.ndarray, ...]
    outcome: str
    faces_found: int


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x, y, width, height) boxes.

    Args:
        a: First box.
        b: Second box.
    """
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def align_faces(image: np.ndarray, detector: FaceDetector | None, crop: str = "112x112",
                policy: str = "center", annotation: FaceAnnotation | None = None,
                fallback: str | None = None) -> Aligned:
    """Aligns the face(s) of one image, reporting how (see `Aligned`).

    Dataset landmarks, when `annotation` has all five, are used as they are.
    Otherwise the detector runs; with a dataset box the detection overlapping
    it best (IoU >= MIN_BOX_IOU) is the face, else `policy` chooses. A box with
    no matching detection falls back to the dataset's eyes and nose when it has them.

    Args:
        image: [H, W, 3] uint8 RGB image (grey and RGBA are converted).
        detector: A face detector; None only when `annotation` has landmarks.
        crop: A registered crop name ("112x112", "96x112").
        policy: A registered face policy ("center", "largest", "all").
        annotation: The dataset's box / landmarks for this image, if any.
        fallback: A registered fallback ("center_crop") for face-less images; None gives no crop.

    Raises:
        ConfigError: If a name is unknown, or there is neither a detector nor landmarks.
    """
    image = as_rgb_uint8(image)
    choose = POLICIES.get(policy)
    make_fallback = FALLBACKS.get(fallback) if fallback is not None else None
    template(crop)
    if annotation is not None and annotation.landmarks is not None:
        return Aligned((align(image, annotation.landmarks, crop),), FROM_LANDMARKS, 1)
    if detector is None:
        raise ConfigError("no landmarks for this image and no detector to find them; pass a FaceDetector")
    faces = detector.detect(image)
    if annotation is not None and annotation.box is not None:
        overlaps = [(box_iou(face.box, annotation.box), i) for i, face in enumerate(faces)]
        best = max(overlaps, default=(0.0, -1))
        chosen = [faces[best[1]]] if best[0] >= MIN_BOX_IOU else []
    else:
        chosen = choose(faces, image.shape[:2])
    if chosen:
        return Aligned(tuple(align(image, face.landmarks, crop) for face in chosen), FROM_DETECTION,
                       len(faces))
    if annotation is not None and annotation.eyes_nose is not None:
        return Aligned((align(image, annotation.eyes_nose, crop),), FROM_EYES_NOSE, len(faces))
    if make_fallback is not None:
        return Aligned((make_fallback(image, crop),), FALLBACK, len(faces))
    return Aligned((), NO_FACE, len(faces))


def align_image(image: np.ndarray, detector: FaceDetector | None, crop: str = "112x112",
                policy: str = "center", landmarks: np.ndarray | FaceAnnotation | None = None,
                fallback: str | None = None) -> list[np.ndarray]:
    """Aligned crops of one image's face(s); an empty list when there is no face.

    Args:
        image: [H, W, 3] uint8 RGB image (grey and RGBA are converted).
        detector: A face detector; None only when `landmarks` gives the five points.
        crop: A registered crop name ("112x112", "96x112").
        policy: A registered face policy ("center", "largest", "all").
        landmarks: [5, 2] points in LANDMARK_NAMES order, or a dataset's
            `FaceAnnotation` (e.g. from `read_megaface_json`); None detects.
        fallback: A registered fallback ("center_crop") for face-less images.

    Raises:
        ConfigError: If a name is unknown, or there is neither a detector nor landmarks.
    """
    if landmarks is not None and not isinstance(landmarks, FaceAnnotation):
        landmarks = FaceAnnotation(landmarks=np.asarray(landmarks, dtype=np.float64))
    return list(align_faces(image, detector, crop, policy, landmarks, fallback).crops)


# --- a folder tree -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """What every worker needs, sent once per worker."""

    input_dir: Path
    output_dir: Path
    crop: str
    policy: str
    fallback: str | None
    min_face_size: int
    threads: int | None


class _Worker:
    """One process's state: the job and a detector built on first need."""

    def __init__(self, job: _Job) -> None:
        self.job = job
        self._detector: FaceDetector | None = None

    def detector(self) -> FaceDetector:
        if self._detector is None:
            from sparse_embed.faces import detect

            if self.job.threads is not None:
                detect.limit_threads(self.job.threads)
            self._detector = detect.FaceDetector(min_face_size=self.job.min_face_size)
        return self._detector


_WORKER: _Worker | None = None


def _init_worker(job: _Job | None) -> None:
    global _WORKER
    _WORKER = None if job is None else _Worker(job)


def read_image(path: Path) -> np.ndarray | None:
    """Decodes an image file to [H, W, 3] uint8 RGB; None when it is not a readable image.

    Args:
        path: The image file.
    """
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def output_names(relative: str, count: int) -> list[str]:
    """Output paths of an image's `count` crops: the same relative path as a `.jpg`, then `_1`, `_2`, ...

    Args:
        relative: The image's path relative to the input tree.
        count: Number of crops.
    """
    path = Path(relative)
    stem = path.stem if path.suffix.lower() in IMAGE_EXTENSIONS else path.name
    suffix = path.suffix if path.suffix.lower() in (".jpg", ".jpeg") else ".jpg"
    return [(path.parent / f"{stem}{f'_{i}' if i else ''}{suffix}").as_posix() for i in range(count)]


def write_jpeg(path: Path, image_rgb: np.ndarray) -> None:
    """Writes an RGB image as a JPEG under a temporary name, then renames it into place.

    Args:
        path: Destination.
        image_rgb: [H, W, 3] uint8 RGB.
    """
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise DataError(f"cannot encode the crop for {path} as JPEG")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.tobytes())


def _align_chunk(items: Sequence[tuple[str, FaceAnnotation | None]]) -> list[tuple[str, str, int, int]]:
    """Aligns and writes a chunk of images: (relative path, outcome, faces found, crops written) each."""
    assert _WORKER is not None, "_init_worker sets the job"
    job = _WORKER.job
    results = []
    for relative, annotation in items:
        image = read_image(job.input_dir / relative)
        if image is None:
            results.append((relative, "unreadable", 0, 0))
            continue
        needs_detector = annotation is None or annotation.landmarks is None
        aligned = align_faces(image, _WORKER.detector() if needs_detector else None, job.crop, job.policy,
                              annotation, job.fallback)
        for name, crop in zip(output_names(relative, len(aligned.crops)), aligned.crops, strict=True):
            write_jpeg(job.output_dir / name, crop)
        results.append((relative, aligned.outcome, aligned.faces_found, len(aligned.crops)))
    return results


def list_images(root: Path) -> tuple[list[str], int]:
    """Relative `/` paths of the images under `root` (sorted) and the number of other files skipped.

    Args:
        root: Top of the tree; hidden files and folders are ignored.
    """
    images, others = [], 0
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            relative = (Path(folder) / name).relative_to(root).as_posix()
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                images.append(relative)
            else:
                others += 1
    return images, others


def match_annotations(annotations: dict[str, FaceAnnotation], images: Sequence[str]
                      ) -> tuple[dict[str, FaceAnnotation], list[str]]:
    """Pairs annotations with the images of a tree.

    A key matches the image of the same relative path; a file that names images
    by file name only (no folder) matches them by file name.

    Args:
        annotations: {image path as the landmark file names it: annotation}.
        images: Relative paths of the tree's images.

    Returns:
        ({image relative path: annotation}, sorted keys naming no image of the tree).
    """
    by_path = set(images)
    by_name: dict[str, str] = {}
    if annotations and all("/" not in key for key in annotations):
        by_name = {Path(image).name: image for image in images}
    matched, missing = {}, []
    for key, annotation in annotations.items():
        image = key if key in by_path else by_name.get(key)
        if image is None:
            missing.append(key)
        else:
            matched[image] = annotation
    return matched, sorted(missing)


def align_tree(input_dir: str | os.PathLike, output_dir: str | os.PathLike, crop: str = "112x112",
               policy: str = "center", landmarks: str | os.PathLike | dict[str, FaceAnnotation] | None = None,
               landmarks_format: str | None = None, fallback: str | None = None, workers: int = 1,
               min_face_size: int = 20, chunk_size: int = 16) -> dict[str, object]:
    """Aligns every image of a folder tree into a mirrored tree of JPEG crops.

    `output_dir/<same relative path>.jpg` gets the crop of each image (with
    policy `all`, extra faces get `_1`, `_2`, ... suffixes); each file is
    written under a temporary name and renamed. Images with dataset landmarks
    are aligned from them, the others from MTCNN detections. Each worker
    process builds its own detector once.

    Args:
        input_dir: Top of the image tree.
        output_dir: Top of the crop tree (created).
        crop: A registered crop name ("112x112", "96x112").
        policy: A registered face policy ("center", "largest", "all").
        landmarks: A landmark file / MegaFace folder, or annotations already read; None detects everything.
        landmarks_format: Format of the `landmarks` file; None detects it.
        fallback: A registered fallback ("center_crop") for face-less images; None writes nothing for them.
        workers: Processes; 1 runs in this process.
        min_face_size: Smallest face the detector searches for, in pixels.
        chunk_size: Images handed to a worker at a time.

    Returns:
        Summary: input, output, crop, policy, images, aligned (from landmarks / detected /
        eyes_nose), no_face, several_faces, unreadable, missing, fallback, crops, other_files,
        and up to SHOWN_EXAMPLES examples of the no-face, unreadable and missing images.

    Raises:
        ConfigError: If a name is unknown or a count is below 1.
        DataError: If the input tree is missing or holds no image, or the landmark file is bad.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    template(crop)
    POLICIES.get(policy)
    if fallback is not None:
        FALLBACKS.get(fallback)
    if workers < 1 or chunk_size < 1 or min_face_size < 1:
        raise ConfigError(f"workers, chunk_size and min_face_size must be >= 1, "
                          f"got {workers}, {chunk_size}, {min_face_size}")
    if not input_dir.is_dir():
        raise DataError(f"input folder {input_dir} not found; pass the top of the image tree")
    if output_dir.resolve() == input_dir.resolve():
        raise ConfigError(f"output folder {output_dir} is the input folder; pass another folder")
    images, others = list_images(input_dir)
    if not images:
        raise DataError(f"no image ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {input_dir}")
    annotations: dict[str, FaceAnnotation] = {}
    missing: list[str] = []
    if landmarks is not None:
        raw = landmarks if isinstance(landmarks, dict) else read_landmarks(landmarks, landmarks_format)
        annotations, missing = match_annotations(raw, images)
    items = [(image, annotations.get(image)) for image in images]
    chunks = [items[i : i + chunk_size] for i in range(0, len(items), chunk_size)]
    counts = dict.fromkeys((*ALIGNED_OUTCOMES, NO_FACE, FALLBACK, "unreadable"), 0)
    examples: dict[str, list[str]] = {NO_FACE: [], "unreadable": []}
    several, crops = 0, 0
    job = _Job(input_dir, output_dir, crop, policy, fallback, min_face_size,
               None if workers == 1 else max(1, (os.cpu_count() or 1) // workers))
    pool = None
    if workers == 1:
        _init_worker(job)
        results: Iterator[list[tuple[str, str, int, int]]] = map(_align_chunk, chunks)
    else:
        # Spawn, not fork: the workers run TensorFlow, whose thread pools do not survive a fork.
        pool = multiprocessing.get_context("spawn").Pool(
            min(workers, len(chunks)), initializer=_init_worker, initargs=(job,))
        results = pool.imap_unordered(_align_chunk, chunks)
    # Imported here: the package's alignment (align.py, this module) also runs
    # on edge devices, which have NumPy and OpenCV but no progress-bar library.
    from tqdm import tqdm

    try:
        with tqdm(total=len(items), unit="img", desc="faces", disable=None) as bar:
            for chunk in results:
                for relative, outcome, faces_found, written in chunk:
                    counts[outcome] += 1
                    several += faces_found > 1
                    crops += written
                    if outcome in examples and len(examples[outcome]) < SHOWN_EXAMPLES:
                        examples[outcome].append(relative)
                bar.update(len(chunk))
    finally:
        if pool is not None:
            pool.terminate()
        _init_worker(None)
    return {
        "input": str(input_dir),
        "output": str(output_dir),
        "crop": crop,
        "policy": policy,
        "images": len(images),
        "aligned": sum(counts[outcome] for outcome in ALIGNED_OUTCOMES),
        "from_landmarks": counts[FROM_LANDMARKS],
        "detected": counts[FROM_DETECTION],
        "eyes_nose": counts[FROM_EYES_NOSE],
        "no_face": counts[NO_FACE],
        "several_faces": several,
        "unreadable": counts["unreadable"],
        "missing": len(missing),
        "fallback": counts[FALLBACK],
        "crops": crops,
        "other_files": others,
        "no_face_examples": sorted(examples[NO_FACE]),
        "unreadable_examples": sorted(examples["unreadable"]),
        "missing_examples": missing[:SHOWN_EXAMPLES],
    }
