"""Five-point similarity alignment onto the ArcFace and SphereFace crop templates.

The templates are the landmark positions (eye centres, nose tip, mouth corners,
in image order: the eye on the image's left first) that insightface's
`face_align.norm_crop` (112x112) and SphereFace / the MLPerf edge benchmark
(96x112, width x height) warp faces onto. The ArcFace template is the SphereFace
one shifted 8 px right, which is why the two crops share their vertical layout.
Published LFW numbers of ArcFace-family models are measured on the 112x112 crop.

`as_rgb_uint8` brings a decoded image (grey, RGB or RGBA) to the [H, W, 3] uint8 form that
face alignment and the detector work on.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from sparse_embed.errors import ConfigError
from sparse_embed.registry import Registry

LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


@dataclass(frozen=True)
class CropTemplate:
    """Where the five landmarks go in an aligned crop.

    Attributes:
        width: Crop width in pixels.
        height: Crop height in pixels.
        points: [5, 2] (x, y) target positions, in LANDMARK_NAMES order.
    """

    width: int
    height: int
    points: tuple[tuple[float, float], ...]

    def array(self) -> np.ndarray:
        """The [5, 2] float64 target points."""
        return np.asarray(self.points, dtype=np.float64)


TEMPLATES: Registry[CropTemplate] = Registry("crop size")

_SPHEREFACE_POINTS = (
    (30.2946, 51.6963),
    (65.5318, 51.5014),
    (48.0252, 71.7366),
    (33.5493, 92.3655),
    (62.7299, 92.2041),
)
TEMPLATES.register("112x112")(
    CropTemplate(112, 112, tuple((x + 8.0, y) for x, y in _SPHEREFACE_POINTS)))
TEMPLATES.register("96x112")(CropTemplate(96, 112, _SPHEREFACE_POINTS))


def umeyama(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, shift), Umeyama 1991.

    Args:
        source: [N, 2] points to move, N >= 2.
        target: [N, 2] points they should land on.

    Returns:
        The [2, 3] matrix A with target ~= A @ [x, y, 1]; no reflection.

    Raises:
        ValueError: If the shapes differ or the source points are all equal.
    """
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if source.shape != target.shape or source.ndim != 2 or source.shape[1] != 2 or len(source) < 2:
        raise ValueError(f"need two [N>=2, 2] point sets, got {source.shape} and {target.shape}")
    mean_s, mean_t = source.mean(axis=0), target.mean(axis=0)
    centred_s, centred_t = source - mean_s, target - mean_t
    variance = (centred_s ** 2).sum() / len(source)
    if variance <= 0:
        raise ValueError("source points coincide: no transform is defined")
    covariance = centred_t.T @ centred_s / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    # The sign correction picks the best proper rotation when the optimum would mirror.
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0
    rotation = u @ np.diag(sign) @ vt
    scale = (singular * sign).sum() / variance
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = mean_t - scale * rotation @ mean_s
    return matrix


def template(crop: str) -> CropTemplate:
    """The crop template registered as `crop` ("112x112" or "96x112", width x height).

    Args:
        crop: A registered crop name.

    Raises:
        ConfigError: If `crop` is unknown.
    """
    return TEMPLATES.get(crop)


def alignment_matrix(landmarks: np.ndarray, crop: str = "112x112") -> np.ndarray:
    """The [2, 3] similarity transform taking `landmarks` onto the crop's template.

    Args:
        landmarks: [5, 2] (x, y) points in LANDMARK_NAMES order, or [3, 2] with
            only the first three (the eyes and the nose), for datasets that give
            no mouth corners; those land on the template's first three points.
        crop: A registered crop name.

    Raises:
        ValueError: If `landmarks` is not [5, 2] or [3, 2], or is degenerate.
    """
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape not in ((5, 2), (3, 2)):
        raise ValueError(f"need [5, 2] (or eyes and nose, [3, 2]) landmarks, got shape {landmarks.shape}")
    return umeyama(landmarks, template(crop).array()[: len(landmarks)])


def align(image: np.ndarray, landmarks: np.ndarray, crop: str = "112x112") -> np.ndarray:
    """Warps `image` so its five landmarks land on the crop template.

    Args:
        image: [H, W, C] uint8 image (any channel order; it is kept).
        landmarks: [5, 2] (x, y) points in LANDMARK_NAMES order, in `image` pixels
            (or [3, 2]: the eyes and nose, see `alignment_matrix`).
        crop: A registered crop name.

    Returns:
        The [height, width, C] aligned crop; pixels from outside `image` are black.
    """
    if image.ndim != 3:
        raise ConfigError(f"need an [H, W, C] image, got shape {image.shape}")
    matrix = alignment_matrix(landmarks, crop)
    size = template(crop)
    return cv2.warpAffine(image, matrix, (size.width, size.height), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Applies a [2, 3] affine matrix to [N, 2] points.

    Args:
        matrix: [2, 3] affine transform.
        points: [N, 2] (x, y) points.
    """
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """The [H, W, 3] uint8 RGB view of a decoded image (grey is repeated, alpha dropped).

    Args:
        image: [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] uint8 array.

    Raises:
        ConfigError: If the array is not a uint8 image of one of those shapes.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ConfigError(f"need a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ConfigError(f"need an [H, W, 1|3|4] image, got shape {image.shape}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])
