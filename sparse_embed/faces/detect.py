"""MTCNN face detection: boxes, confidences and the five landmarks. The one module that imports `mtcnn`.

One Keras per process: the `mtcnn` package builds its three networks with
`tf.keras`. TensorFlow is imported here through `sparse_embed.keras`, which
sets `TF_USE_LEGACY_KERAS=1` first, so `tf.keras` is Keras 2 (`tf_keras`),
the same Keras as the project's models (TF-MOT needs Keras 2). A detector and
a project model therefore live in one process, e.g. to align and embed in one
pass. Imported first, `mtcnn` would build its networks with Keras 3 (what
`tf.keras` means when TF_USE_LEGACY_KERAS is unset and Keras 3 is installed),
and the process would hold two Keras; this module's import order prevents that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparse_embed.errors import ConfigError
from sparse_embed.faces.align import LANDMARK_NAMES, as_rgb_uint8
from sparse_embed.keras import tf

# isort: split
# After sparse_embed.keras, so tf.keras is Keras 2 when mtcnn builds its networks (module docstring).
import mtcnn

# MTCNN's default smallest face, in pixels; smaller ones are not searched for.
MIN_FACE_SIZE = 20
# MTCNN's three networks in pipeline order, with the square input side each takes (P-Net: any size,
# it slides over the image pyramid; R- and O-Net: crops of the previous stage's boxes).
NETWORK_INPUT_SIDES = {"pnet": None, "rnet": 24, "onet": 48}


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face.

    Attributes:
        box: (x, y, width, height) in image pixels.
        confidence: The detector's score in [0, 1].
        landmarks: [5, 2] float64 (x, y) points in LANDMARK_NAMES order (image
            order: the eye on the image's left first).
    """

    box: tuple[float, float, float, float]
    confidence: float
    landmarks: np.ndarray

    @property
    def area(self) -> float:
        """Box area in square pixels."""
        return self.box[2] * self.box[3]

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) of the box centre."""
        x, y, w, h = self.box
        return x + w / 2, y + h / 2


class FaceDetector:
    """MTCNN (Zhang et al. 2016) from the `mtcnn` package, on the CPU.

    Build one per process and reuse it: building loads the three networks.

    Args:
        min_face_size: Smallest face searched for, in pixels.
        device: TensorFlow device the networks run on.
    """

    def __init__(self, min_face_size: int = MIN_FACE_SIZE, device: str = "CPU:0") -> None:
        if min_face_size < 1:
            raise ConfigError(f"min_face_size must be >= 1, got {min_face_size}")
        self.min_face_size = min_face_size
        self.device = device
        self._mtcnn = mtcnn.MTCNN(device=device)

    def detect(self, image: np.ndarray) -> list[Face]:
        """Finds the faces of one RGB image.

        Args:
            image: [H, W, 3] uint8 RGB image (grey and RGBA are converted).

        Returns:
            The faces, highest confidence first; empty when there is none.
        """
        image = as_rgb_uint8(image)
        if min(image.shape[:2]) < 12:
            # PNet's window is 12 px: a smaller image cannot hold a face.
            return []
        results = self._mtcnn.detect_faces(image, min_face_size=self.min_face_size)
        faces = []
        for result in results:
            keypoints = result["keypoints"]
            landmarks = np.array([keypoints[name] for name in LANDMARK_NAMES], dtype=np.float64)
            faces.append(Face(tuple(float(v) for v in result["box"]), float(result["confidence"]),
                              landmarks))
        return sorted(faces, key=lambda face: -face.confidence)


def mtcnn_networks() -> dict[str, tf.keras.Model]:
    """The P-, R- and O-Net the `mtcnn` package ships, with its weights loaded.

    Returns:
        Network name (the keys of NETWORK_INPUT_SIDES, in pipeline order) -> the
        subclassed Keras 2 model: P-Net maps [B, H, W, 3] to (box offsets
        [B, h, w, 4], face softmax [B, h, w, 2]); R-Net maps [B, 24, 24, 3] to
        (offsets [B, 4], softmax [B, 2]); O-Net maps [B, 48, 48, 3] to (offsets
        [B, 4], landmarks [B, 10] (x1..x5, y1..y5 in box units), softmax [B, 2]).
        Inputs are RGB scaled as (pixel - 127.5) / 128.
    """
    stages = mtcnn.MTCNN(stages="face_and_landmarks_detection").stages
    return {name: stage.model for name, stage in zip(NETWORK_INPUT_SIDES, stages, strict=True)}


def limit_threads(num_threads: int) -> None:
    """Caps TensorFlow's CPU threads in this process (one of several detector workers).

    Args:
        num_threads: Threads for intra- and inter-op parallelism.
    """
    try:
        tf.config.threading.set_intra_op_parallelism_threads(num_threads)
        tf.config.threading.set_inter_op_parallelism_threads(num_threads)
    except RuntimeError:
        # The runtime already started (a detector was built first): keep its pools.
        pass

