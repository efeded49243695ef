"""Identify the faces of a video: an IoU tracker, one identity per track, the annotated video, the timeline.

A video is read with OpenCV (`cv2.VideoCapture`, FFmpeg underneath). Every
`every`-th frame is processed as an image is: faces detected, aligned and
embedded. Faces are linked across the processed frames by `IoUTracker`: each
track predicts its next box from its last velocity, and the faces of a frame
are matched to the predicted boxes one-to-one (Hungarian, maximising the summed
IoU; a pair needs IoU >= `iou`). A face matching no track starts one; a track
that matches no face for more than `max_missed` processed frames in a row ends.

Each track then gets ONE identity: its score for a person is the mean, over the
track's faces, of the face's score for that person (per-person matching as for
images, `Settings`). Tracks that share a frame never get the same person (a
person appears at most once per frame): over each group of tracks linked by
shared frames the assignment is the Hungarian one of images, on the tracks' mean
scores, as if every track of the group met every other (exact when they do);
then a track left `unknown` whose tracks do not all meet (a person leaving and
coming back while another stays) takes its best person that no track sharing a
frame with it holds. A track is named only above the threshold, `unknown`
otherwise.

Outputs, for `OUT/annotated/<name>` (the input's container and codec family:
MJPG in `.avi` and `.mkv`, MPEG-4 in `.mp4`, `.mov`, `.m4v`; MPEG-4 `.mp4` for
any other input) and `OUT/<stem>.timeline.csv`, and the report entry:

    {"input": path, "frames": n, "fps": f, "every": k,
     "faces": [{"box": [...], "name": ..., "score": ..., "far": ..., "landmarks": ..., "confidence": ...,
                "frame": i, "track": t}],
     "timeline": [{"track": t, "name": ..., "first_s": ..., "last_s": ..., "first_frame": ...,
                   "last_frame": ..., "faces": ..., "score": ..., "far": ...}],
     "annotated": "annotated/<name>", "timeline_csv": "<stem>.timeline.csv"}

A face's `score` is its own frame's score for its track's person (for an
`unknown` track: for the best person left to it); the timeline's is the track's
mean. A video the decoder cannot open, or one without a decodable frame, is an
entry with `"error"` and no faces, as an undecodable image is.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from sparse_embed.app.embedder import Detector, Embedder, find_faces
from sparse_embed.app.gallery import Gallery
from sparse_embed.app.identify import UNKNOWN, VIDEO_EXTENSIONS, Settings, annotate, assign, keep_faces
from sparse_embed.errors import ConfigError

# Read when a file is opened: FFmpeg's own complaints about a broken file would be a second,
# unformatted message beside the report's error.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

# The output container and FourCC per input container (the input's codec family); others: mp4v .mp4.
WRITERS = {".avi": "MJPG", ".mkv": "MJPG", ".mp4": "mp4v", ".mov": "mp4v", ".m4v": "mp4v"}
DEFAULT_WRITER = (".mp4", "mp4v")
# Frames per second assumed when the container does not say.
DEFAULT_FPS = 25.0
DEFAULT_IOU = 0.3
DEFAULT_MAX_MISSED = 5
TIMELINE_COLUMNS = ("track", "name", "first_s", "last_s", "first_frame", "last_frame", "faces", "score",
                    "far")


def is_video(path: str | os.PathLike) -> bool:
    """Whether `path` names a video (by its extension, `VIDEO_EXTENSIONS`)."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of every box of `a` with every box of `b`.

    Args:
        a: float [n, 4] boxes (x1, y1, x2, y2).
        b: float [m, 4] boxes.

    Returns:
        float [n, m].
    """
    a = np.asarray(a, np.float64).reshape(-1, 4)[:, None]
    b = np.asarray(b, np.float64).reshape(-1, 4)[None]
    w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = w * h
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / np.maximum(area_a + area_b - inter, 1e-12)


@dataclass
class _Track:
    box: np.ndarray
    velocity: np.ndarray
    missed: int = 0

    def predicted(self) -> np.ndarray:
        return self.box + self.velocity * (self.missed + 1)


class IoUTracker:
    """Links boxes across frames by IoU with each track's constant-velocity prediction.

    Args:
        iou_threshold: Smallest IoU of a face and a track's predicted box that links them.
        max_missed: Frames in a row a track may go without a face before it ends.
    """

    def __init__(self, iou_threshold: float = DEFAULT_IOU, max_missed: int = DEFAULT_MAX_MISSED) -> None:
        if not 0 < iou_threshold <= 1:
            raise ConfigError(f"--iou must lie in (0, 1], got {iou_threshold}")
        if max_missed < 0:
            raise ConfigError(f"--max_missed must be >= 0, got {max_missed}")
        self.iou_threshold = iou_threshold
        self.max_missed = max_missed
        self._tracks: dict[int, _Track] = {}
        self._next = 0

    def update(self, boxes: Sequence[Sequence[float]]) -> list[int]:
        """Links one frame's boxes to tracks.

        Args:
            boxes: The frame's boxes (x1, y1, x2, y2).

        Returns:
            The track id of each box (new ids count up from 0).
        """
        from scipy.optimize import linear_sum_assignment

        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        ids = list(self._tracks)
        result: list[int | None] = [None] * len(boxes)
        if ids and len(boxes):
            overlap = iou(boxes, np.stack([self._tracks[t].predicted() for t in ids]))
            rows, cols = linear_sum_assignment(np.where(overlap >= self.iou_threshold, overlap, 0.0),
                                               maximize=True)
            for i, j in zip(rows, cols, strict=True):
                if overlap[i, j] >= self.iou_threshold:
                    track = self._tracks[ids[j]]
                    track.velocity = (boxes[i] - track.box) / (track.missed + 1)
                    track.box, track.missed = boxes[i], 0
                    result[i] = ids[j]
        matched = set(result)
        for t in ids:
            if t not in matched:
                self._tracks[t].missed += 1
                if self._tracks[t].missed > self.max_missed:
                    del self._tracks[t]
        for i, t in enumerate(result):
            if t is None:
                self._tracks[self._next] = _Track(boxes[i], np.zeros(4))
                result[i] = self._next
                self._next += 1
        return [int(t) for t in result]


def _components(conflicts: list[set[int]]) -> list[list[int]]:
    seen: set[int] = set()
    groups = []
    for start in range(len(conflicts)):
        if start in seen:
            continue
        group, stack = [], [start]
        seen.add(start)
        while stack:
            t = stack.pop()
            group.append(t)
            for u in conflicts[t] - seen:
                seen.add(u)
                stack.append(u)
        groups.append(sorted(group))
    return groups


def assign_tracks(scores: np.ndarray, frames: Sequence[set[int]], threshold: float) -> list[int | None]:
    """One person per track, never the same person for two tracks that share a frame.

    Args:
        scores: float [T, P], each track's mean score per person.
        frames: Each track's frame numbers.
        threshold: A track is named only when its mean score is strictly above it.

    Returns:
        For each track, the column of its person, or None (`unknown`).
    """
    scores = np.asarray(scores, np.float64)
    result: list[int | None] = [None] * len(scores)
    conflicts = [{u for u in range(len(frames)) if u != t and frames[t] & frames[u]}
                 for t in range(len(frames))]
    for group in _components(conflicts):
        # The one-to-one assignment of an image's faces over the tracks linked by shared frames, as
        # if all of them met: exact where they do, and never two tracks that meet on one person.
        for t, person in zip(group, assign(scores[group], threshold), strict=True):
            result[t] = person
        # Tracks that do not all meet may share a person: a track left unknown takes its best person
        # above the threshold that no track it meets holds (best scores first).
        for _, t in sorted(((scores[t].max(initial=-np.inf), t) for t in group if result[t] is None),
                           reverse=True):
            free = [p for p in range(scores.shape[1])
                    if scores[t, p] > threshold and all(result[u] != p for u in conflicts[t])]
            if free:
                result[t] = max(free, key=lambda p: scores[t, p])
    return result


@dataclass(frozen=True)
class VideoOptions:
    """How a video is processed.

    Attributes:
        every: Process every `every`-th frame (1: all).
        max_missed: Processed frames a track may miss before it ends.
        iou: Smallest IoU that links a face to a track.
    """

    every: int = 1
    max_missed: int = DEFAULT_MAX_MISSED
    iou: float = DEFAULT_IOU

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError(f"--every must be >= 1, got {self.every}")
        IoUTracker(self.iou, self.max_missed)  # validates both


@dataclass
class _Face:
    frame: int
    track: int
    box: list[float]
    landmarks: list
    confidence: float


@dataclass
class _Pass:
    frames: int = 0
    fps: float = DEFAULT_FPS
    size: tuple[int, int] = (0, 0)
    faces: list[_Face] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)


def _frames(path: Path) -> Iterator[tuple[int, np.ndarray]]:
    capture = cv2.VideoCapture(str(path))
    try:
        index = 0
        while capture.isOpened():
            ok, frame = capture.read()
            if not ok:
                return
            yield index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        capture.release()


def video_info(path: str | os.PathLike) -> tuple[bool, float, int]:
    """(whether the decoder opens it, frames per second or 0, the container's frame count or 0)."""
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            return False, 0.0, 0
        fps = capture.get(cv2.CAP_PROP_FPS)
        count = capture.get(cv2.CAP_PROP_FRAME_COUNT)
        return True, float(fps) if np.isfinite(fps) else 0.0, max(0, int(count)) if np.isfinite(count) else 0
    finally:
        capture.release()


def _detect_and_track(path: Path, embedder: Embedder, detector: Detector | None, options: VideoOptions,
                      progress: Callable[[int], Any], settings: Settings) -> _Pass:
    result = _Pass()
    tracker = IoUTracker(options.iou, options.max_missed)
    for index, frame in _frames(path):
        result.frames = index + 1
        result.size = (frame.shape[1], frame.shape[0])
        progress(1)
        if index % options.every:
            continue
        found = keep_faces(find_faces(frame, detector, embedder.width, embedder.height), settings)
        tracks = tracker.update([face.box for face in found])
        if found:
            result.embeddings.append(embedder.embed([face.crop for face in found]))
        for face, track in zip(found, tracks, strict=True):
            result.faces.append(_Face(index, track, [round(v, 2) for v in face.box],
                                      np.round(face.landmarks, 2).tolist(), round(face.confidence, 6)))
    return result


def _far(gallery: Gallery, score: float | None) -> float | None:
    if gallery.calibration is None or score is None:
        return None
    return float(gallery.calibration.far_of([score])[0])


def _name(gallery: Gallery, scores: np.ndarray, settings: Settings, frames: list[set[int]],
          names: list[str]) -> tuple[list[int | None], np.ndarray]:
    threshold = gallery.threshold if settings.threshold is None else settings.threshold
    chosen = assign_tracks(scores, frames, threshold)
    # The person a face's score is reported for: the track's, or for an unknown track the best
    # person left to it by the tracks it meets.
    shown = np.full(len(chosen), -1, np.int64)
    for t, person in enumerate(chosen):
        if person is not None:
            shown[t] = person
            continue
        taken = {chosen[u] for u in range(len(chosen)) if u != t and frames[t] & frames[u]} - {None}
        free = [j for j in range(len(names)) if j not in taken]
        if free:
            shown[t] = free[int(np.argmax(scores[t, free]))]
    return chosen, shown


def annotated_suffix(path: str | os.PathLike) -> str:
    """The extension of the annotated copy of the video `path`: its own if `WRITERS` has it, else `.mp4`."""
    suffix = Path(path).suffix.lower()
    return suffix if suffix in WRITERS else DEFAULT_WRITER[0]


def _write_video(source: Path, destination: Path, fourcc: str, fps: float, size: tuple[int, int],
                 faces_of: dict[int, list[dict[str, Any]]], every: int,
                 progress: Callable[[int], Any]) -> int:
    """Writes the annotated copy of `source` (the faces of the last processed frame drawn on the
    frames skipped after it); returns the frames written."""
    tmp = destination.with_name(f".{destination.stem}.tmp{os.getpid()}{destination.suffix}")
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*fourcc), fps, size)
    written = 0
    try:
        if not writer.isOpened():
            raise OSError(f"OpenCV cannot write {fourcc} video to {destination}")
        for index, frame in _frames(source):
            faces = faces_of.get(index - index % every, [])
            picture = np.asarray(annotate(frame, faces)) if faces else frame
            writer.write(cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
            written += 1
            progress(1)
        writer.release()
        os.replace(tmp, destination)
    finally:
        writer.release()
        if tmp.exists():
            tmp.unlink()
    return written


def _write_timeline(path: Path, timeline: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, TIMELINE_COLUMNS)
            writer.writeheader()
            writer.writerows(timeline)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def identify_video(path: str | os.PathLike, gallery: Gallery, embedder: Embedder, detector: Detector | None,
                   out: str | os.PathLike, annotated: str, settings: Settings | None = None,
                   options: VideoOptions = VideoOptions(), progress: bool = True) -> dict[str, Any]:
    """Tracks and names the faces of one video; writes its annotated copy and timeline.

    Args:
        path: The video.
        gallery: The gallery.
        embedder: The gallery's model.
        detector: MTCNN, or None when each frame is an aligned crop.
        out: The output folder (`report.json`'s).
        annotated: The annotated video's path under `out`, with the extension of
            `annotated_suffix(path)`; the timeline is `out/<its stem>.timeline.csv`.
        settings: Matching settings; None: `Settings()`.
        options: Frame step and tracker settings.
        progress: Show a progress bar over the frames of each of the two passes (tqdm's
            `disable=None`: only on a terminal).

    Returns:
        The video's report entry (module docstring).
    """
    path, out = Path(path), Path(out)
    settings = settings or Settings()
    opened, fps, count = video_info(path)
    if not opened:
        return {"input": str(path), "faces": [], "error": "not a decodable video"}
    fps = fps if fps > 0 else DEFAULT_FPS
    with tqdm(total=count or None, desc=f"{path.name} faces", unit="frame", leave=False,
              disable=None if progress else True) as bar:
        seen = _detect_and_track(path, embedder, detector, options, bar.update, settings)
    if not seen.frames:
        return {"input": str(path), "faces": [], "error": "not a decodable video (no frame)"}
    tracks = sorted({face.track for face in seen.faces})
    rows_of = {t: [i for i, face in enumerate(seen.faces) if face.track == t] for t in tracks}
    embeddings = (np.concatenate(seen.embeddings) if seen.embeddings
                  else np.zeros((0, embedder.embedding_size), np.float32))
    names, face_scores = gallery.person_scores(embeddings, settings.matching, settings.mean_of)
    track_scores = (np.stack([face_scores[rows_of[t]].mean(axis=0) for t in tracks]) if tracks
                    else np.zeros((0, len(names))))
    frames = [{seen.faces[i].frame for i in rows_of[t]} for t in tracks]
    chosen, shown = _name(gallery, track_scores, settings, frames, names)

    faces, faces_of, timeline = [], {}, []
    for k, t in enumerate(tracks):
        name = UNKNOWN if chosen[k] is None else names[chosen[k]]
        score = None if shown[k] < 0 else float(track_scores[k, shown[k]])
        first, last = min(frames[k]), max(frames[k])
        timeline.append({"track": t, "name": name, "first_s": round(first / fps, 3),
                         "last_s": round(last / fps, 3), "first_frame": first, "last_frame": last,
                         "faces": len(rows_of[t]), "score": None if score is None else round(score, 6),
                         "far": _far(gallery, score)})
    track_index = {t: k for k, t in enumerate(tracks)}
    for i, face in enumerate(seen.faces):
        k = track_index[face.track]
        score = None if shown[k] < 0 else float(face_scores[i, shown[k]])
        entry = {"box": face.box, "name": timeline[k]["name"],
                 "score": None if score is None else round(score, 6), "far": _far(gallery, score),
                 "landmarks": face.landmarks, "confidence": face.confidence, "frame": face.frame,
                 "track": face.track}
        faces.append(entry)
        faces_of.setdefault(face.frame, []).append(entry)

    video = out / annotated
    video.parent.mkdir(parents=True, exist_ok=True)
    with tqdm(total=seen.frames, desc=f"{path.name} video", unit="frame", leave=False,
              disable=None if progress else True) as bar:
        _write_video(path, video, WRITERS.get(video.suffix.lower(), DEFAULT_WRITER[1]), fps, seen.size,
                     faces_of, options.every, bar.update)
    csv_path = out / f"{video.stem}.timeline.csv"
    _write_timeline(csv_path, timeline)
    return {"input": str(path), "frames": seen.frames, "fps": round(fps, 6), "every": options.every,
            "faces": faces, "timeline": timeline, "annotated": video.relative_to(out).as_posix(),
            "timeline_csv": csv_path.name}
