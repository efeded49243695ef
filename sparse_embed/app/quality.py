"""The enrolment quality gate: faces below a bar are refused, each with the reason.

A gallery is only as good as its worst enrolled face: a tiny, blurred or
half-turned face gives an embedding that matches strangers. `enroll` can
refuse such faces before they go in (`QualityGate`), on four optional bars:

- `min_face_px`: the shorter side of the detector's box, in image pixels;
- `min_detector_score`: MTCNN's confidence that the box is a face;
- `check_landmarks`: the five points must look like a face seen from the
  front (`landmark_problem`);
- `min_confidence`: the confidence a probabilistic model predicts for the
  embedding (`sparse_embed.inference.confidence_function`; the exported
  `.tflite` model's second output), for a run that has one.

A refused face is reported with the bar it missed and skipped, as a face
that is not found is. An `--aligned` crop is the whole image, has no
detector score (1.0) and template landmarks: only the size and the
confidence bars can refuse it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparse_embed.errors import ConfigError

# The landmark check: points may lie this fraction of the box's size outside it (MTCNN's box is
# tight on the face, its points sometimes just beyond it).
BOX_MARGIN = 0.1
# The landmark check: the eyes at least this fraction of the box's width apart (a face turned
# far to the side brings them together).
MIN_EYE_DISTANCE = 0.2


def landmark_problem(landmarks: np.ndarray, box: tuple[float, float, float, float]) -> str | None:
    """Why five points do not look like a frontal face in `box`, or None when they do.

    The points are eyes, nose tip and mouth corners in image order (the left
    eye of the image first). They must lie in the box (with `BOX_MARGIN`), the
    eyes and the mouth corners in left-right order, the eyes above the nose
    and the nose above the mouth, and the eyes `MIN_EYE_DISTANCE` of the box's
    width apart.

    Args:
        landmarks: [5, 2] (x, y).
        box: (x1, y1, x2, y2).
    """
    points = np.asarray(landmarks, np.float64).reshape(5, 2)
    x1, y1, x2, y2 = box
    width, height = max(x2 - x1, 1e-6), max(y2 - y1, 1e-6)
    mx, my = BOX_MARGIN * width, BOX_MARGIN * height
    x, y = points[:, 0], points[:, 1]
    if ((x < x1 - mx) | (x > x2 + mx) | (y < y1 - my) | (y > y2 + my)).any():
        return "landmarks outside the face box"
    if x[0] >= x[1] or x[3] >= x[4]:
        return "landmarks out of left-right order"
    eyes, nose, mouth = y[:2].mean(), y[2], y[3:].mean()
    if not eyes < nose < mouth:
        return "landmarks not eyes above nose above mouth"
    if np.hypot(*(points[1] - points[0])) < MIN_EYE_DISTANCE * width:
        return f"eyes closer than {MIN_EYE_DISTANCE:g} of the face's width (a face turned aside)"
    return None


@dataclass(frozen=True)
class QualityGate:
    """The bars a face must pass to be enrolled; None (or False) leaves a bar out.

    Attributes:
        min_face_px: Smallest shorter side of the face box, pixels.
        min_detector_score: Smallest detector confidence, in [0, 1].
        check_landmarks: Whether the five points must pass `landmark_problem`.
        min_confidence: Smallest predicted confidence of the embedding (a probabilistic run's).

    Raises:
        ConfigError: If a bar is out of range.
    """

    min_face_px: float | None = None
    min_detector_score: float | None = None
    check_landmarks: bool = False
    min_confidence: float | None = None

    def __post_init__(self) -> None:
        if self.min_face_px is not None and not self.min_face_px > 0:
            raise ConfigError(f"--min_face_px must be > 0, got {self.min_face_px}")
        if self.min_detector_score is not None and not 0 <= self.min_detector_score <= 1:
            raise ConfigError(f"--min_detector_score must lie in [0, 1], got {self.min_detector_score}")
        if self.min_confidence is not None and not np.isfinite(self.min_confidence):
            raise ConfigError(f"--min_confidence must be finite, got {self.min_confidence}")

    def face_problem(self, box: tuple[float, float, float, float], landmarks: np.ndarray,
                     score: float) -> str | None:
        """Why a found face misses a bar of the detection (size, score, landmarks), or None.

        Args:
            box: (x1, y1, x2, y2) in image pixels.
            landmarks: [5, 2] (x, y).
            score: The detector's confidence.
        """
        x1, y1, x2, y2 = box
        side = min(x2 - x1, y2 - y1)
        if self.min_face_px is not None and side < self.min_face_px:
            return f"face {side:.0f} px, below --min_face_px={self.min_face_px:g}"
        if self.min_detector_score is not None and score < self.min_detector_score:
            return f"detector score {score:.3f}, below --min_detector_score={self.min_detector_score:g}"
        if self.check_landmarks:
            return landmark_problem(landmarks, box)
        return None

    def confidence_problem(self, confidence: float) -> str | None:
        """Why an embedding's predicted confidence misses `min_confidence`, or None.

        Args:
            confidence: The model's confidence of the embedding (NaN: none predicted).
        """
        if self.min_confidence is not None and not confidence >= self.min_confidence:
            return f"confidence {confidence:.3f}, below --min_confidence={self.min_confidence:g}"
        return None
