"""MTCNN face detection (Zhang et al. 2016) in NumPy, its three networks run by the LiteRT interpreter.

The pipeline and every pre- and post-processing step are those of the `mtcnn`
1.0.0 package (`sparse_embed.faces.detect.FaceDetector`), re-implemented
without TensorFlow so that detection runs on the device:

1. the image, scaled as (pixel - 127.5) / 128, is resized by area averaging
   (TensorFlow's `resize(..., method="area")`, sizes truncated) to each scale
   of a pyramid `12 / min_face_size * 0.709 ** k`;
2. P-Net slides over every scale (stride 2, 12-pixel cells); cells scoring
   above 0.6 become boxes, suppressed per scale (IoU 0.5) and then across
   scales (IoU 0.7), and squared;
3. R-Net scores 24x24 crops of those boxes (TensorFlow's `crop_and_resize`,
   bilinear, zero outside the image), refines them (score > 0.7, IoU 0.7), squares them;
4. O-Net scores 48x48 crops, refines the boxes and predicts the five
   landmarks (score > 0.8, IoU 0.7 over the smaller box); the boxes are
   clipped to the image.

The package's suppression keeps a box unless a box ranked above it, kept or
not, overlaps it by more than the threshold; that is reproduced here, so the
same boxes survive. The `.tflite` files come from
`python -m sparse_embed.faces.mtcnn_tflite --output=DIR`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from sparse_embed.edge.runtime import load_interpreter, quiet_runtime
from sparse_embed.errors import DataError

NETWORKS = ("pnet", "rnet", "onet")
# P-Net's receptive field and its output stride on the scaled image, in pixels.
PNET_CELL = 12
PNET_STRIDE = 2
# Pixel p -> (p - MEAN) / DIVISOR, the networks' input scaling.
MEAN = 127.5
DIVISOR = 128.0
# Sizes of the networks' outputs' last axis, which tell the outputs apart.
OFFSETS, SOFTMAX, LANDMARKS = 4, 2, 10


@dataclass(frozen=True)
class MTCNNSettings:
    """Detection parameters; the defaults are the `mtcnn` package's.

    Attributes:
        min_face_size: Smallest face searched for, in pixels.
        scale_factor: Ratio of consecutive pyramid scales.
        pnet_threshold: P-Net face score a proposal needs.
        rnet_threshold: R-Net face score a box needs.
        onet_threshold: O-Net face score a face needs.
        pnet_scale_iou: Suppression IoU within one pyramid scale.
        pnet_iou: Suppression IoU across the scales.
        rnet_iou: Suppression IoU after R-Net.
        onet_iou: Suppression overlap after O-Net (intersection over the smaller box).
    """

    min_face_size: int = 20
    scale_factor: float = 0.709
    pnet_threshold: float = 0.6
    rnet_threshold: float = 0.7
    onet_threshold: float = 0.8
    pnet_scale_iou: float = 0.5
    pnet_iou: float = 0.7
    rnet_iou: float = 0.7
    onet_iou: float = 0.7


@dataclass(frozen=True, eq=False)
class Detection:
    """One detected face.

    Attributes:
        box: (x, y, width, height) in image pixels.
        confidence: O-Net's face score in [0, 1].
        landmarks: [5, 2] float64 (x, y) points: left eye, right eye, nose,
            left and right mouth corner (image order: the eye on the image's left first).
    """

    box: tuple[float, float, float, float]
    confidence: float
    landmarks: np.ndarray

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) of the box centre."""
        x, y, w, h = self.box
        return x + w / 2, y + h / 2


def scale_pyramid(height: int, width: int, min_face_size: int, scale_factor: float) -> np.ndarray:
    """The image scales P-Net runs at, as the `mtcnn` package computes them.

    Args:
        height: Image height in pixels.
        width: Image width in pixels.
        min_face_size: Smallest face searched for, in pixels.
        scale_factor: Ratio of consecutive scales.

    Returns:
        float64 [k] scales, largest first (empty for images too small for a face).
    """
    min_dim = min(height, width)
    count = round(-((np.log(min_dim / PNET_CELL) / np.log(scale_factor)) + 1))
    return PNET_CELL / min_face_size * scale_factor ** np.arange(max(count, 0))


def resize_area(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area-averaging resize of a float image, TensorFlow's `resize(..., method="area")`.

    OpenCV's INTER_AREA averages the same input areas for any scale; the two
    agree to float32 rounding (4e-5 on [-1, 1] images).

    Args:
        image: float32 [H, W, C].
        height: Output height.
        width: Output width.

    Returns:
        float32 [height, width, C].
    """
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


def crop_and_resize(image: np.ndarray, boxes: np.ndarray, side: int) -> np.ndarray:
    """Bilinear crops of boxes resized to side x side, as TensorFlow's `image.crop_and_resize`.

    The package passes box corners divided by the image size; TensorFlow maps
    those onto [0, size - 1], so a corner x lands on x * (W - 1) / W. Samples
    outside the image are 0.

    Args:
        image: float32 [H, W, C].
        boxes: [n, 4] (x1, y1, x2, y2) in pixels.
        side: Crop side in pixels (> 1).

    Returns:
        float32 [n, side, side, C].
    """
    height, width = image.shape[:2]
    steps = np.arange(side, dtype=np.float32)

    def samples(low: np.ndarray, high: np.ndarray, size: int) -> tuple[np.ndarray, ...]:
        # In float32 and in TensorFlow's order of operations: a sample on the image's edge
        # then falls on the same side of it (inside or out) as in TensorFlow.
        low_n = (low / size).astype(np.float32)
        high_n = (high / size).astype(np.float32)
        last = np.float32(size - 1)
        step = (high_n - low_n) * last / np.float32(side - 1)
        coords = low_n[:, None] * last + steps[None, :] * step[:, None]
        valid = (coords >= 0) & (coords <= last)
        below = np.clip(np.floor(coords), 0, size - 1).astype(np.int64)
        above = np.clip(np.ceil(coords), 0, size - 1).astype(np.int64)
        return below, above, coords - np.floor(coords), valid

    top, bottom, y_lerp, y_valid = samples(boxes[:, 1], boxes[:, 3], height)
    left, right, x_lerp, x_valid = samples(boxes[:, 0], boxes[:, 2], width)
    top_rows, bottom_rows = top[:, :, None], bottom[:, :, None]
    left_cols, right_cols = left[:, None, :], right[:, None, :]
    x_weight = x_lerp[:, None, :, None]
    upper = image[top_rows, left_cols] + (image[top_rows, right_cols] - image[top_rows, left_cols]) * x_weight
    lower = (image[bottom_rows, left_cols]
             + (image[bottom_rows, right_cols] - image[bottom_rows, left_cols]) * x_weight)
    crops = upper + (lower - upper) * y_lerp[:, :, None, None]
    inside = (y_valid[:, :, None] & x_valid[:, None, :])[..., None]
    return np.where(inside, crops, 0.0).astype(np.float32)


def _overlaps(boxes: np.ndarray, method: str) -> np.ndarray:
    """[n, n] overlap of (x1, y1, x2, y2) boxes: IoU ("union") or intersection over the smaller ("min")."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inter_w = np.maximum(0.0, np.minimum(boxes[None, :, 2], boxes[:, None, 2])
                         - np.maximum(boxes[None, :, 0], boxes[:, None, 0]))
    inter_h = np.maximum(0.0, np.minimum(boxes[None, :, 3], boxes[:, None, 3])
                         - np.maximum(boxes[None, :, 1], boxes[:, None, 1]))
    inter = inter_w * inter_h
    if method == "union":
        denominator = area[:, None] + area[None, :] - inter
    else:
        denominator = np.minimum(area[:, None], area[None, :])
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / denominator


def _by_score(rows: np.ndarray) -> np.ndarray:
    """Rows ordered by score (column 4), highest first, in the package's order for ties."""
    return rows[np.argsort(rows[:, 4])[::-1]]


def suppress(rows: np.ndarray, threshold: float, method: str = "union", sort: bool = True) -> np.ndarray:
    """The package's non-maximum suppression of [n, 5 + k] rows (x1, y1, x2, y2, score, ...).

    A row survives unless a row ranked above it (kept or not) overlaps it by
    more than `threshold`.

    Args:
        rows: Boxes with their score and any further columns.
        threshold: Overlap above which the lower-ranked box goes.
        method: "union" (IoU) or "min" (intersection over the smaller box).
        sort: Rank by score first; False keeps the given order.

    Returns:
        The surviving rows, in rank order.
    """
    if len(rows) == 0:
        return rows
    if sort:
        rows = _by_score(rows)
    overlaps = _overlaps(rows[:, :4], method) > threshold
    beaten = np.triu(overlaps, k=1).any(axis=0)
    return rows[~beaten]


def _square(rows: np.ndarray) -> np.ndarray:
    """Boxes grown to squares of their longer side around the same centre."""
    rows = rows.copy()
    w = rows[:, 2] - rows[:, 0]
    h = rows[:, 3] - rows[:, 1]
    side = np.maximum(w, h)
    rows[:, 0] += w * 0.5 - side * 0.5
    rows[:, 1] += h * 0.5 - side * 0.5
    rows[:, 2] = rows[:, 0] + side
    rows[:, 3] = rows[:, 1] + side
    return rows


def _refine(rows: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Boxes moved by the regressed offsets, in units of the box size plus one (the package's)."""
    rows = rows.copy()
    w = rows[:, 2] - rows[:, 0] + 1
    h = rows[:, 3] - rows[:, 1] + 1
    rows[:, :4] += offsets * np.stack([w, h, w, h], axis=-1)
    return rows


class TFLiteMTCNN:
    """MTCNN through `pnet.tflite`, `rnet.tflite` and `onet.tflite` on the LiteRT interpreter.

    Args:
        model_dir: Directory holding the three files (`sparse_embed.faces.mtcnn_tflite`).
        settings: Detection parameters.
        num_threads: CPU threads of each interpreter; None: LiteRT's default.

    Raises:
        DataError: If a file is missing or is not a TFLite model.
    """

    def __init__(self, model_dir: str | os.PathLike, settings: MTCNNSettings = MTCNNSettings(),
                 num_threads: int | None = None) -> None:
        model_dir = Path(model_dir)
        missing = [name for name in NETWORKS if not (model_dir / f"{name}.tflite").is_file()]
        if missing:
            raise DataError(f"{model_dir} has no {', '.join(f'{n}.tflite' for n in missing)}; write them "
                            f"with python -m sparse_embed.faces.mtcnn_tflite --output_dir={model_dir}")
        self.settings = settings
        self._interpreters = {name: load_interpreter(model_dir / f"{name}.tflite", num_threads)
                              for name in NETWORKS}
        self._shapes: dict[str, tuple[int, ...]] = {}

    def _run(self, name: str, batch: np.ndarray) -> dict[int, np.ndarray]:
        """Runs one network on a batch; its outputs keyed by their last axis (OFFSETS, SOFTMAX, LANDMARKS)."""
        interpreter = self._interpreters[name]
        index = interpreter.get_input_details()[0]["index"]
        if self._shapes.get(name) != batch.shape:
            interpreter.resize_tensor_input(index, batch.shape)
            with quiet_runtime():
                interpreter.allocate_tensors()
            self._shapes[name] = batch.shape
        interpreter.set_tensor(index, np.ascontiguousarray(batch, dtype=np.float32))
        interpreter.invoke()
        return {int(d["shape"][-1]): interpreter.get_tensor(d["index"])
                for d in interpreter.get_output_details()}

    def _proposals(self, image: np.ndarray) -> np.ndarray:
        """P-Net over the pyramid: [n, 5] squared (x1, y1, x2, y2, score) proposals."""
        s = self.settings
        height, width = image.shape[:2]
        per_scale = []
        for scale in scale_pyramid(height, width, s.min_face_size, s.scale_factor):
            h, w = (np.asarray([height, width]) * scale).astype(int)
            # P-Net's output is empty below 11 pixels (two 3x3 convolutions, a 2x2 pool, a 3x3).
            if math.ceil((min(h, w) - 2) / 2) - 4 < 1:
                continue
            out = self._run("pnet", resize_area(image, h, w)[None])
            score = out[SOFTMAX][0, :, :, 1]
            ys, xs = np.nonzero(score > s.pnet_threshold)
            offsets = out[OFFSETS][0, ys, xs]
            x1, y1 = xs * PNET_STRIDE + 1.0, ys * PNET_STRIDE + 1.0
            x2, y2 = xs * PNET_STRIDE + float(PNET_CELL), ys * PNET_STRIDE + float(PNET_CELL)
            cell = PNET_CELL - 1
            rows = np.stack([x1 + offsets[:, 0] * cell, y1 + offsets[:, 1] * cell,
                             x2 + offsets[:, 2] * cell, y2 + offsets[:, 3] * cell,
                             score[ys, xs]], axis=-1).astype(np.float64)
            rows = _by_score(rows)
            rows[:, :4] /= scale
            per_scale.append(suppress(rows, s.pnet_scale_iou, sort=False))
        rows = np.concatenate(per_scale) if per_scale else np.empty((0, 5))
        return _square(suppress(rows, s.pnet_iou))

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Finds the faces of one RGB image.

        Args:
            image: [H, W, 3] uint8 RGB image.

        Returns:
            The faces, highest confidence first; empty when there is none.
        """
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"need an [H, W, 3] RGB image, got shape {image.shape}")
        s = self.settings
        scaled = (image.astype(np.float32) - MEAN) / DIVISOR
        rows = self._proposals(scaled)
        if len(rows):
            out = self._run("rnet", crop_and_resize(scaled, rows[:, :4], 24))
            rows[:, 4] = out[SOFTMAX][:, 1]
            rows = _refine(rows, out[OFFSETS])
            rows = _square(suppress(rows[rows[:, 4] > s.rnet_threshold], s.rnet_iou))
        if len(rows):
            out = self._run("onet", crop_and_resize(scaled, rows[:, :4], 48))
            w = rows[:, 2:3] - rows[:, 0:1] + 1
            h = rows[:, 3:4] - rows[:, 1:2] + 1
            points = out[LANDMARKS]
            xs = w * points[:, :5] + rows[:, 0:1] - 1
            ys = h * points[:, 5:] + rows[:, 1:2] - 1
            rows[:, 4] = out[SOFTMAX][:, 1]
            rows = np.concatenate([_refine(rows, out[OFFSETS]), xs, ys], axis=-1)
            rows = suppress(rows[rows[:, 4] > s.onet_threshold], s.onet_iou, method="min")
        height, width = image.shape[:2]
        faces = []
        for row in rows:
            x1, x2 = np.clip(row[[0, 2]], 0, width - 1)
            y1, y2 = np.clip(row[[1, 3]], 0, height - 1)
            landmarks = np.stack([row[5:10], row[10:15]], axis=-1).astype(np.float64)
            faces.append(Detection((float(x1), float(y1), float(x2 - x1), float(y2 - y1)),
                                   float(row[4]), landmarks))
        return sorted(faces, key=lambda face: -face.confidence)
