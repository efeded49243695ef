"""Landnet after a face detector: the five points of each detected face, from its box.

    landmarker = Landmarker.load("runs/landmarks/landnet")            # a run directory (Keras)
    landmarker = Landmarker.load("runs/landmarks/landnet/tflite/original.tflite")  # LiteRT only
    points = landmarker(image, box)                                   # [5, 2] (x, y) pixels

The crop Landnet sees is `landnet_box` of the detector's (x, y, width, height)
box: a square framed as its synthetic training faces are (the aligned 112x112
framing: forehead and some hair above the eyes, the chin near the bottom).
A `.tflite` file runs on the LiteRT interpreter without TensorFlow; a run
directory loads the Keras model (TensorFlow).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sparse_embed.errors import ConfigError
from sparse_embed.landmarks.data import crop, from_crop_units

# The synthetic faces' framing from a detector's box: a square `CROP_SCALE` times the
# box's width, its centre `CROP_RAISE` of its side above the box's centre.
CROP_SCALE = 1.3
CROP_RAISE = 0.08


def landnet_box(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """Landnet's square crop from a detector's (x, y, width, height) box.

    Args:
        box: The detector's box in pixels.

    Returns:
        (x, y, side, side) in pixels.
    """
    x, y, w, h = box
    side = CROP_SCALE * w
    cx, cy = x + w / 2, y + h / 2 - CROP_RAISE * side
    return cx - side / 2, cy - side / 2, side, side


class Landmarker:
    """Five points of a face from a detector's box, by a landmark network.

    Args:
        network: float32 [1, S, S, 3] crops in [0, 1] -> [1, 10] points in crop units.
        input_size: S, the network's input side.
        source: What it runs, for messages.
    """

    def __init__(self, network: Callable[[np.ndarray], np.ndarray], input_size: int, source: str) -> None:
        self.network = network
        self.input_size = input_size
        self.source = source

    @classmethod
    def load(cls, path: str | os.PathLike) -> Landmarker:
        """A landmarks run directory (`python -m sparse_embed.landmarks train`) or a `.tflite` of one.

        Args:
            path: The run directory or the `.tflite` file.

        Raises:
            ConfigError: If `path` is neither.
        """
        path = Path(path)
        if path.suffix == ".tflite":
            from sparse_embed.edge.runtime import TFLiteModel

            model = TFLiteModel.from_path(path)
            return cls(model, int(model.input_shape[1]), str(path))
        if not path.is_dir():
            raise ConfigError(f"landmark model {path} is neither a landmarks run directory nor a "
                              f".tflite file")
        from sparse_embed.landmarks.training import load_run

        config, keras_model = load_run(path)
        return cls(lambda x: keras_model(x, training=False).numpy(), config.input_size, str(path))

    def __call__(self, image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        """The five points of the face in `box`.

        Args:
            image: uint8 [H, W, 3] RGB.
            box: The detector's (x, y, width, height).

        Returns:
            float64 [5, 2] (x, y) pixels: eyes, nose tip, mouth corners (image order).
        """
        square = landnet_box(box)
        points = np.asarray(self.network(crop(image, square, self.input_size)[None]))
        return from_crop_units(points, square)[0]
