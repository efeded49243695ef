"""Face crops for the edge model: decode an image, then align it (MTCNN landmarks) or resize an aligned one.

The five-point alignment is the project's (`sparse_embed.faces.align`: the
ArcFace 112x112 and SphereFace 96x112 templates, Umeyama's similarity
transform); `sparse_embed.faces` needs only NumPy and OpenCV until a detector
or a whole tree is aligned, so it runs on the device as it is.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from sparse_embed.edge.mtcnn import Detection, TFLiteMTCNN
from sparse_embed.faces.align import TEMPLATES, umeyama

# The template other crop sizes are scaled from (insightface does the same for its 128x128 crops).
REFERENCE_CROP = "112x112"


def decode(path: str | os.PathLike) -> np.ndarray | None:
    """Reads and decodes one image file.

    Args:
        path: Image file (any format OpenCV decodes: JPEG, PNG, BMP, ...).

    Returns:
        [H, W, 3] uint8 RGB, or None when the file cannot be read or decoded.
    """
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        return None
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def crop_points(width: int, height: int) -> np.ndarray:
    """Where the five landmarks go in a width x height crop.

    Args:
        width: Crop width in pixels.
        height: Crop height in pixels.

    Returns:
        [5, 2] float64 (x, y) points: the registered template of that size
        ("112x112", "96x112"), otherwise the 112x112 one scaled to the size.
    """
    name = f"{width}x{height}"
    if name in TEMPLATES.names():
        return TEMPLATES.get(name).array()
    reference = TEMPLATES.get(REFERENCE_CROP)
    return reference.array() * np.array([width / reference.width, height / reference.height])


def align_face(image: np.ndarray, landmarks: np.ndarray, width: int, height: int) -> np.ndarray:
    """Warps `image` so the face's five landmarks land on the crop's template.

    Args:
        image: [H, W, 3] uint8 RGB image.
        landmarks: [5, 2] (x, y) points in `Detection.landmarks` order.
        width: Crop width in pixels.
        height: Crop height in pixels.

    Returns:
        [height, width, 3] uint8 crop; pixels from outside the image are black.
    """
    matrix = umeyama(landmarks, crop_points(width, height))
    return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def central_face(faces: list[Detection], height: int, width: int) -> Detection | None:
    """The face whose box centre is nearest the image centre (LFW's subject), or None when there is none.

    Args:
        faces: Detections in the image.
        height: Image height.
        width: Image width.
    """
    if not faces:
        return None
    centre = np.array([width / 2, height / 2])
    return min(faces, key=lambda face: float(np.sum((np.asarray(face.centre) - centre) ** 2)))


def resize_crop(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """An already-aligned crop brought to the model's input size (unchanged when it has it).

    Args:
        image: [H, W, 3] uint8 aligned crop.
        width: Model input width.
        height: Model input height.
    """
    if image.shape[:2] == (height, width):
        return image
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def face_crop(image: np.ndarray, width: int, height: int, detector: TFLiteMTCNN | None) -> np.ndarray | None:
    """The model input of one image: detected and aligned, or (without detector) resized.

    Args:
        image: [H, W, 3] uint8 RGB image.
        width: Model input width.
        height: Model input height.
        detector: MTCNN for raw images; None for images that are aligned crops already.

    Returns:
        [height, width, 3] uint8 crop, or None when the detector finds no face.
    """
    if detector is None:
        return resize_crop(image, width, height)
    face = central_face(detector.detect(image), *image.shape[:2])
    if face is None:
        return None
    return align_face(image, face.landmarks, width, height)
