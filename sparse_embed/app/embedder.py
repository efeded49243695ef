"""One face model for the app: a Keras run directory or an exported `.tflite` file; detection and alignment.

`load_embedder` opens either kind behind one interface (`Embedder`): aligned
RGB crops in, L2-normalised embeddings out, with the flip mode applied as
`sparse_embed.evaluate` applies it (`none`, `sum` or `concat` of the
embeddings of the crop and of its mirror image). Its `fingerprint` is a
SHA-256 of the weights and of the embedding configuration (model config,
input size, flip mode), which a gallery records and checks.

With a `.tflite` model nothing here imports TensorFlow: the model runs on the
edge package's LiteRT runtime, and faces are found by its TFLite MTCNN
(`--mtcnn=DIR`, the three networks written by
`python -m sparse_embed.faces.mtcnn_tflite`). A Keras run directory imports
TensorFlow (`sparse_embed.inference`) and detects with the `mtcnn` package
(`sparse_embed.faces.detect`) unless a TFLite MTCNN directory is given.

Faces are aligned onto the 112x112 ArcFace template scaled to the model's
input (`sparse_embed.edge.preprocess.align_face`), the alignment the
training crops have; `--aligned` images are crops already, resized.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sparse_embed.edge.preprocess import align_face, crop_points, resize_crop
from sparse_embed.errors import ConfigError, DataError

FLIP_MODES = ("none", "sum", "concat")
# The flip mode of a .tflite model when none is given: the MLPerf edge protocol's.
TFLITE_FLIP = "concat"
TFLITE_SUFFIX = ".tflite"


def is_tflite(model: str | os.PathLike) -> bool:
    """Whether `model` names an exported `.tflite` file (otherwise: a run directory)."""
    return str(model).endswith(TFLITE_SUFFIX)


def _normalise(e: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(e, axis=1, keepdims=True)
    return (e / np.maximum(norm, 1e-12)).astype(np.float32)


class Embedder(Protocol):
    """Aligned face crops -> L2-normalised embeddings.

    Attributes:
        model: The model as given (run directory or `.tflite` path).
        width: Input width in pixels.
        height: Input height in pixels.
        embedding_size: Dimension of the embeddings `embed` returns (twice the
            model's with flip `concat`).
        flip: The flip mode.
        sparse: Whether the embeddings are sparse (a sparse index stores them).
        fingerprint: SHA-256 of the weights and the embedding configuration.
        has_confidence: Whether the model predicts a confidence per embedding (a probabilistic run).
    """

    model: str
    width: int
    height: int
    embedding_size: int
    flip: str
    sparse: bool
    fingerprint: str
    has_confidence: bool

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """float32 [n, embedding_size] L2-normalised embeddings of uint8 [height, width, 3] RGB crops."""

    def confidence(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """float32 [n] predicted confidences of the crops' embeddings (with flip: the smaller view's)."""


def _fingerprint(weights: Callable[[Any], None], config: dict) -> str:
    digest = hashlib.sha256()
    weights(digest)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    return digest.hexdigest()


class KerasEmbedder:
    """A training run's backbone (its latest checkpoint), embedded as `sparse_embed.evaluate` does.

    Args:
        model_dir: A directory written by `sparse_embed.train`.
        flip: Flip mode; None: the run's `eval.flip`.
        batch_size: Crops per call of the backbone.
    """

    def __init__(self, model_dir: str | os.PathLike, flip: str | None = None, batch_size: int = 64) -> None:
        # TensorFlow only here, so a .tflite model never loads it.
        from sparse_embed.config import config_to_dict
        from sparse_embed.inference import confidence_function, embedding_function, load_backbone

        backbone, config = load_backbone(model_dir)
        self.model = str(model_dir)
        self.flip = flip or config.eval.flip
        self.height, self.width = config.model.input_shape
        self.sparse = config.model.final_activation != "none"
        self.batch_size = batch_size
        self._step = embedding_function(backbone, self.flip)
        distribution = config.model.distribution.build(config.model.embedding_size)
        self.has_confidence = bool(distribution.has_confidence)
        self._confidence_step = (confidence_function(backbone, distribution, self.flip)
                                 if self.has_confidence else None)
        probe = self._step(np.zeros((1, self.height, self.width, 3), np.float32)).numpy()
        self.embedding_size = int(probe.shape[1])

        def weights(digest: Any) -> None:
            for variable in backbone.weights:
                digest.update(variable.name.encode())
                digest.update(np.ascontiguousarray(variable.numpy()).tobytes())

        self.fingerprint = _fingerprint(weights, {"model": config_to_dict(config)["model"],
                                                  "flip": self.flip, "kind": "keras"})

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """See `Embedder.embed`."""
        if not len(crops):
            return np.zeros((0, self.embedding_size), np.float32)
        return self._run(self._step, crops)

    def confidence(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """See `Embedder.confidence`.

        Raises:
            ConfigError: If the run has no confidence (a `dirac` model).
        """
        if self._confidence_step is None:
            raise ConfigError(f"model {self.model} predicts no confidence (a dirac run); a "
                              "probabilistic run (model.distribution gaussian or vmf) does")
        if not len(crops):
            return np.zeros(0, np.float32)
        return self._run(self._confidence_step, crops)

    def _run(self, step: Callable[[Any], Any], crops: Sequence[np.ndarray]) -> np.ndarray:
        x = np.stack(crops).astype(np.float32) / 127.5 - 1.0
        return np.concatenate([step(x[i:i + self.batch_size]).numpy()
                               for i in range(0, len(x), self.batch_size)]).astype(np.float32)


class TFLiteEmbedder:
    """An exported `.tflite` embedding model on the LiteRT interpreter (no TensorFlow).

    Args:
        path: The `.tflite` file (float or integer-only I/O).
        flip: Flip mode; None: `TFLITE_FLIP`.
        sparse: Whether its embeddings are sparse; None: decided by the embedding of a grey crop
            (a ReLU output holds exact zeros).
        num_threads: Interpreter threads; None: LiteRT's default.
    """

    def __init__(self, path: str | os.PathLike, flip: str | None = None, sparse: bool | None = None,
                 num_threads: int | None = None) -> None:
        from sparse_embed.edge.model import EmbeddingModel

        self._model = EmbeddingModel(path, num_threads)
        self.model = str(path)
        self.flip = flip or TFLITE_FLIP
        self.width, self.height = self._model.width, self._model.height
        base = self._model.embedding_size
        self.embedding_size = 2 * base if self.flip == "concat" else base
        if sparse is None:
            probe = self._model.run(self._model.prepare(np.full((self.height, self.width, 3), 128, np.uint8)))
            sparse = bool((probe == 0).any())
        self.sparse = sparse
        self.has_confidence = bool(self._model.has_confidence)
        content = Path(path).read_bytes()
        self.fingerprint = _fingerprint(lambda digest: digest.update(content),
                                        {"flip": self.flip, "kind": "tflite"})

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """See `Embedder.embed`."""
        out = []
        for crop in crops:
            e = self._model.run(self._model.prepare(crop))
            if self.flip != "none":
                e_flip = self._model.run(self._model.prepare(np.ascontiguousarray(crop[:, ::-1])))
                e = np.concatenate([e, e_flip]) if self.flip == "concat" else e + e_flip
            out.append(e.astype(np.float32))
        if not out:
            return np.zeros((0, self.embedding_size), np.float32)
        return _normalise(np.stack(out))

    def confidence(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """See `Embedder.confidence`.

        Raises:
            ConfigError: If the model has no confidence output.
        """
        if not self.has_confidence:
            raise ConfigError(f"model {self.model} has no confidence output (export a probabilistic run)")
        out = []
        for crop in crops:
            views = [crop] if self.flip == "none" else [crop, np.ascontiguousarray(crop[:, ::-1])]
            out.append(min(self._model.run_with_confidence(self._model.prepare(view))[1] for view in views))
        return np.asarray(out, np.float32)


class RerankEmbedder:
    """A sparse gallery's model and the dense model that re-ranks its candidates, as one embedder.

    `embed` gives each crop's embedding by the model followed by the dense
    model's, each L2-normalised: the vectors a gallery with a re-rank model
    takes (`Gallery.split`). Everything else is the model's (fingerprint,
    confidence, flip), so the gallery checks the model as without re-ranking.

    Args:
        model: The gallery's (sparse) model.
        dense: The dense model.

    Raises:
        ConfigError: If the two take different input sizes (one aligned crop feeds both).
    """

    def __init__(self, model: Embedder, dense: Embedder) -> None:
        if (model.width, model.height) != (dense.width, dense.height):
            raise ConfigError(f"re-rank model {dense.model} takes {dense.width}x{dense.height} crops, model "
                              f"{model.model} {model.width}x{model.height}: both must take the same size")
        self.main, self.dense = model, dense
        self.model, self.flip, self.sparse = model.model, model.flip, model.sparse
        self.width, self.height = model.width, model.height
        self.embedding_size = model.embedding_size + dense.embedding_size
        self.fingerprint = model.fingerprint
        self.has_confidence = model.has_confidence

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """See `Embedder.embed`: [n, model's size + dense model's size]."""
        return np.concatenate([self.main.embed(crops), self.dense.embed(crops)], axis=1)

    def confidence(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """See `Embedder.confidence` (the model's)."""
        return self.main.confidence(crops)


def load_embedder(model: str | os.PathLike, flip: str | None = None) -> Embedder:
    """The embedder of a run directory or a `.tflite` file.

    Args:
        model: A directory written by `sparse_embed.train`, or a `.tflite` file.
        flip: Flip mode (`FLIP_MODES`); None: the run's `eval.flip`, or `TFLITE_FLIP`.

    Raises:
        ConfigError: On an unknown flip mode or a model that is neither.
        DataError: If the model cannot be loaded.
    """
    if flip is not None and flip not in FLIP_MODES:
        raise ConfigError(f"flip must be one of {', '.join(FLIP_MODES)}, got {flip!r}")
    if is_tflite(model):
        return TFLiteEmbedder(model, flip)
    if not Path(model).is_dir():
        raise ConfigError(f"--model {model} is neither a run directory nor a .tflite file")
    return KerasEmbedder(model, flip)


@dataclass(frozen=True, eq=False)
class FoundFace:
    """One face of an image, aligned for the model.

    Attributes:
        box: (x1, y1, x2, y2) in image pixels.
        landmarks: [5, 2] (x, y) points: eyes, nose tip, mouth corners (image order).
        confidence: The detector's score (1.0 for an aligned crop).
        crop: uint8 [height, width, 3] RGB model input.
    """

    box: tuple[float, float, float, float]
    landmarks: np.ndarray
    confidence: float
    crop: np.ndarray


class Detector(Protocol):
    """MTCNN: `detect(image)` gives faces with `box` (x, y, w, h), `confidence` and `landmarks` [5, 2]."""

    def detect(self, image: np.ndarray) -> list: ...


def load_detector(mtcnn_dir: str | os.PathLike | None, tflite_model: bool) -> Detector:
    """The face detector: the TFLite MTCNN of `mtcnn_dir`, or the `mtcnn` package's (TensorFlow).

    Args:
        mtcnn_dir: Directory of pnet/rnet/onet.tflite, or None.
        tflite_model: Whether the embedding model is a `.tflite` file: then TensorFlow
            stays out of the process, and `mtcnn_dir` is required.

    Raises:
        ConfigError: If a `.tflite` model comes without `mtcnn_dir`.
        DataError: If `mtcnn_dir` lacks a network.
    """
    if mtcnn_dir is not None:
        from sparse_embed.edge.mtcnn import TFLiteMTCNN

        return TFLiteMTCNN(mtcnn_dir)
    if tflite_model:
        raise ConfigError("a .tflite model detects faces with the TFLite MTCNN: pass --mtcnn=DIR (written by "
                          "python -m sparse_embed.faces.mtcnn_tflite --output=DIR), or --aligned for "
                          "aligned crops")
    from sparse_embed.faces.detect import FaceDetector

    return FaceDetector()


# Where the alignment's five points come from (`--landmarks`).
LANDMARK_SOURCES = ("mtcnn", "landnet")


class LandnetDetector:
    """A detector whose five points come from Landnet on its boxes (`--landmarks=landnet`).

    MTCNN finds the faces; Landnet (`sparse_embed.landmarks.predict`) places
    the points the alignment uses, from each box. A `.tflite` Landnet keeps
    TensorFlow out of the process, as a `.tflite` embedding model does.

    Args:
        detector: From `load_detector`.
        landnet: A landmarks run directory or its `.tflite` file.
    """

    def __init__(self, detector: Detector, landnet: str | os.PathLike) -> None:
        from sparse_embed.landmarks.predict import Landmarker

        self.detector = detector
        self.landmarker = Landmarker.load(landnet)

    def detect(self, image: np.ndarray) -> list:
        """The detector's faces, each with Landnet's points in place of the detector's.

        Args:
            image: uint8 [H, W, 3] RGB.
        """
        return [dataclasses.replace(face, landmarks=self.landmarker(image, face.box))
                for face in self.detector.detect(image)]


def detect_faces(image: np.ndarray, detector: Detector, width: int, height: int) -> list[FoundFace]:
    """Every face MTCNN finds in `image`, highest confidence first, aligned to width x height.

    Args:
        image: uint8 [H, W, 3] RGB.
        detector: From `load_detector`.
        width: Model input width.
        height: Model input height.
    """
    found = []
    for face in detector.detect(image):
        x, y, w, h = face.box
        landmarks = np.asarray(face.landmarks, np.float64)
        found.append(FoundFace((float(x), float(y), float(x + w), float(y + h)), landmarks,
                               float(face.confidence), align_face(image, landmarks, width, height)))
    return found


def aligned_face(image: np.ndarray, width: int, height: int) -> FoundFace:
    """An image that is an aligned crop already, as one face: the whole image, template landmarks.

    Args:
        image: uint8 [H, W, 3] RGB aligned crop.
        width: Model input width.
        height: Model input height.
    """
    h, w = image.shape[:2]
    landmarks = crop_points(w, h)
    return FoundFace((0.0, 0.0, float(w), float(h)), landmarks, 1.0, resize_crop(image, width, height))


def find_faces(image: np.ndarray, detector: Detector | None, width: int, height: int) -> list[FoundFace]:
    """The faces of an image: detected (with a detector) or the image itself as an aligned crop (None).

    Args:
        image: uint8 [H, W, 3] RGB.
        detector: From `load_detector`, or None for `--aligned` input.
        width: Model input width.
        height: Model input height.
    """
    if detector is None:
        return [aligned_face(image, width, height)]
    return detect_faces(image, detector, width, height)


def check_model_file(model: str | os.PathLike) -> None:
    """Raises `DataError` when `model` names a `.tflite` file that does not exist."""
    if is_tflite(model) and not Path(model).is_file():
        raise DataError(f"model {model} not found")
