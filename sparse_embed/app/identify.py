"""Identify the faces of images against a gallery: one-to-one assignment, the report, annotated images.

Within one image the faces are assigned to people one-to-one (the Hungarian
algorithm, `scipy.optimize.linear_sum_assignment`, maximising the summed
score over the face-person pairs above the threshold), as Open Model Zoo's
face recognition demo does: a person appears at most once per image, and a
face whose best person went to a better-matching face takes its own next
best, or `unknown`. A face is named only when its score is above the
gallery's threshold; every score carries its false-accept rate once the
gallery is calibrated (`far`, null before).

The report (`OUT/report.json`) is a list with one entry per input:

    {"input": path, "faces": [{"box": [x1, y1, x2, y2], "name": ..., "score": ..., "far": ...,
                               "landmarks": [[x, y] x 5], "confidence": ...}], "annotated": file}

and an input that is not a decodable image has `"error"` and no faces.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sparse_embed.app.embedder import Detector, Embedder, FoundFace, find_faces
from sparse_embed.app.gallery import Gallery
from sparse_embed.errors import DataError

UNKNOWN = "unknown"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Inputs read as videos (`sparse_embed.app.video`), by extension.
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv", ".flv")
# Annotation colours (RGB): a named face, an unknown one.
NAMED_COLOUR = (40, 200, 60)
UNKNOWN_COLOUR = (230, 60, 40)


def assign(scores: np.ndarray, threshold: float) -> list[int | None]:
    """One-to-one assignment of faces to people: each person to at most one face.

    Maximises the summed score of the assigned (face, person) pairs, where only
    pairs scoring above `threshold` may be assigned.

    Args:
        scores: float [F, P], face-by-person scores.
        threshold: A pair must score strictly above it.

    Returns:
        For each face, the column of its person, or None.
    """
    from scipy.optimize import linear_sum_assignment

    scores = np.asarray(scores, np.float64)
    faces, people = scores.shape
    result: list[int | None] = [None] * faces
    if not faces or not people:
        return result
    allowed = scores > threshold
    # Pairs below the threshold weigh nothing: the assignment never prefers them, and any it
    # makes is dropped below. So only the people some face may take enter the assignment (a
    # few columns of a gallery of a million).
    columns = np.flatnonzero(allowed.any(axis=0))
    weight = np.where(allowed[:, columns], scores[:, columns] - threshold, 0.0)
    rows, cols = linear_sum_assignment(weight, maximize=True)
    for face, col in zip(rows, cols, strict=True):
        if allowed[face, columns[col]]:
            result[face] = int(columns[col])
    return result


def collect_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The image and video files of the inputs: files as given, folders searched recursively (sorted).

    Raises:
        DataError: If an input does not exist, or the inputs hold no file.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*")
                            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"input {path} does not exist")
    if not files:
        raise DataError(f"no image or video files in {', '.join(map(str, inputs))}")
    return files


@dataclass(frozen=True)
class Settings:
    """How faces are matched.

    Attributes:
        matching: `best`, `mean` (of the `mean_of` best embeddings of a person) or `centroid`
            (the person's mean embedding; a gallery that keeps means).
        mean_of: Embeddings averaged per person with `mean`.
        threshold: The score a match needs; None: the gallery's.
        min_face_px: Detections whose box's shorter side is below it are not faces; None: all are.
        min_detector_score: Detections the detector scores below it are not faces; None: all are.
    """

    matching: str = "best"
    mean_of: int = 3
    threshold: float | None = None
    min_face_px: float | None = None
    min_detector_score: float | None = None


def keep_faces(faces: list[FoundFace], settings: Settings) -> list[FoundFace]:
    """The detections that pass the settings' size and score bars (a tiny or doubtful box is
    more often a false detection than a face anyone can name).

    Args:
        faces: From `find_faces`.
        settings: Its `min_face_px` and `min_detector_score`.
    """
    def passes(face: FoundFace) -> bool:
        x1, y1, x2, y2 = face.box
        return ((settings.min_face_px is None or min(x2 - x1, y2 - y1) >= settings.min_face_px)
                and (settings.min_detector_score is None or face.confidence >= settings.min_detector_score))

    return [face for face in faces if passes(face)]


def identify_faces(image: np.ndarray, gallery: Gallery, embedder: Embedder, detector: Detector | None,
                   settings: Settings = Settings()) -> list[dict[str, Any]]:
    """The faces of one image with their person (or `unknown`), score and false-accept rate.

    Args:
        image: uint8 [H, W, 3] RGB.
        gallery: The gallery.
        embedder: The gallery's model.
        detector: MTCNN, or None when the image is an aligned crop.
        settings: Matching settings.

    Returns:
        One dict per face (the report's face entries), highest detector confidence first.
    """
    faces = keep_faces(find_faces(image, detector, embedder.width, embedder.height), settings)
    if not faces:
        return []
    matches = match_faces(embedder.embed([f.crop for f in faces]), gallery, settings)
    return [{"box": [round(v, 2) for v in face.box], **match,
             "landmarks": np.round(face.landmarks, 2).tolist(),
             "confidence": round(face.confidence, 6)}
            for face, match in zip(faces, matches, strict=True)]


def match_faces(embeddings: np.ndarray, gallery: Gallery,
                settings: Settings = Settings()) -> list[dict[str, Any]]:
    """The person (or `unknown`), score and false-accept rate of the faces of one image.

    Args:
        embeddings: float32 [F, embedding_size], the faces' L2-normalised embeddings.
        gallery: The gallery.
        settings: Matching settings.

    Returns:
        One dict per face: name, score (None in an empty gallery) and far (None before calibration).
    """
    candidates = None
    if settings.matching == "best":
        # Each face's F best people (F faces) decide the one-to-one assignment and an unknown
        # face's best free person, and they lie among its (F - 1) x R + 1 best rows when nobody
        # has more than R: fewer rows to rank than the default, exact all the same.
        candidates = (len(embeddings) - 1) * gallery.most_rows_per_person() + 1
    elif settings.matching == "centroid":
        # One mean per person: each face's F best means hold its F best people.
        candidates = len(embeddings)
    names, scores = gallery.person_scores(embeddings, settings.matching, settings.mean_of, candidates)
    threshold = gallery.threshold if settings.threshold is None else settings.threshold
    chosen = assign(scores, threshold)
    # The people no face took: an unknown face's score is its best among them, for the record.
    free = np.ones(len(names), bool)
    free[[c for c in chosen if c is not None]] = False
    out = []
    for i, person in enumerate(chosen):
        if person is not None:
            name, score = names[person], float(scores[i, person])
        else:
            name = UNKNOWN
            score = float(scores[i, free].max()) if free.any() else None
        far = None
        if gallery.calibration is not None and score is not None:
            far = float(gallery.calibration.far_of([score])[0])
        out.append({"name": name, "score": None if score is None else round(score, 6), "far": far})
    return out


def annotate(image: np.ndarray, faces: list[dict[str, Any]]) -> Any:
    """The image with each face's box, landmarks, name and score drawn (a PIL image).

    Args:
        image: uint8 [H, W, 3] RGB.
        faces: The face entries of `identify_faces`.
    """
    from PIL import Image, ImageDraw

    picture = Image.fromarray(image)
    draw = ImageDraw.Draw(picture)
    width = max(1, round(min(image.shape[:2]) / 200))
    for face in faces:
        colour = UNKNOWN_COLOUR if face["name"] == UNKNOWN else NAMED_COLOUR
        draw.rectangle(face["box"], outline=colour, width=width)
        for x, y in face["landmarks"]:
            draw.ellipse([x - width, y - width, x + width, y + width], fill=colour)
        label = face["name"] if face["score"] is None else f"{face['name']} {face['score']:.2f}"
        if face["far"] is not None:
            label += f" FAR {face['far']:.0e}"
        x1, y1 = face["box"][:2]
        text_box = draw.textbbox((x1, y1), label)
        top = max(0, y1 - (text_box[3] - text_box[1]) - 2)
        draw.rectangle([x1, top, x1 + text_box[2] - text_box[0] + 4, y1], fill=colour)
        draw.text((x1 + 2, top), label, fill=(255, 255, 255))
    return picture


def annotated_name(path: Path, used: set[str], suffix: str = ".jpg") -> str:
    """A file name for the annotated copy of `path` whose stem is not in `used` (which it joins).

    Stems, not names, are kept distinct: a video's timeline is named after its stem.
    """
    stem, k = path.stem, 1
    while stem in used:
        k += 1
        stem = f"{path.stem}-{k}"
    used.add(stem)
    return f"{stem}{suffix}"
