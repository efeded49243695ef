"""The landmark metric: mean point error over the true inter-ocular distance, and the failure rate.

The OpenVINO toolkit calls the first "RMSE"; it is a normalised mean error
(NME): for each image, the mean over the five points of the Euclidean
distance between predicted and true point, divided by the distance between
the two true eye points. A failure is an image whose NME exceeds 0.1.
NumPy only.
"""

from __future__ import annotations

import numpy as np

# The points' order (models/landnet.py): eyes first, so points 0 and 1 give the inter-ocular distance.
LEFT_EYE, RIGHT_EYE = 0, 1
FAILURE_THRESHOLD = 0.1


def _points(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x.reshape(x.shape[0], -1, 2)


def normalised_errors(predicted: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-image mean point error over the true inter-ocular distance.

    Args:
        predicted: [N, 10] (x1, y1, ..., x5, y5) or [N, 5, 2] points.
        true: The true points, same shape and units as `predicted`.

    Returns:
        float64 [N].

    Raises:
        ValueError: If the shapes differ or an image's true eyes coincide.
    """
    p, t = _points(predicted), _points(true)
    if p.shape != t.shape:
        raise ValueError(f"predicted points {p.shape} and true points {t.shape} differ in shape")
    ocular = np.linalg.norm(t[:, LEFT_EYE] - t[:, RIGHT_EYE], axis=-1)
    if np.any(ocular <= 0):
        raise ValueError(f"{int(np.sum(ocular <= 0))} image(s) have both true eyes at one point")
    return np.linalg.norm(p - t, axis=-1).mean(axis=-1) / ocular


def summary(predicted: np.ndarray, true: np.ndarray,
            threshold: float = FAILURE_THRESHOLD) -> dict[str, float]:
    """The metric of a set of images: mean NME and the failure rate.

    Args:
        predicted: [N, 10] or [N, 5, 2] points.
        true: The true points.
        threshold: An image fails when its NME is above this.

    Returns:
        {"nme": mean NME, "failure_rate": fraction of images above `threshold`, "images": N}.
    """
    errors = normalised_errors(predicted, true)
    return {"nme": float(errors.mean()), "failure_rate": float(np.mean(errors > threshold)),
            "images": int(errors.size)}
