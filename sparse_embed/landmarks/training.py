"""Training, evaluation and compression of a landmark network (Keras `fit` on in-memory crops).

A landmarks run directory holds config.yaml, `model.keras` (the trained
float network) and metrics.json (its held-out figures). `compress_run`
fine-tunes the three compressed variants of the toolkit's table from it with
`sparse_embed.compression` (int8 QAT; magnitude pruning to
`target_sparsity` of each Conv2D kernel, the depthwise one stays dense as
TF-MOT cannot prune it; pruning-preserving int8 QAT of the pruned network),
converts each to TFLite and measures every file on the held-out crops.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sparse_embed import compression
from sparse_embed.compression import quantize as quantization
from sparse_embed.compression.converter import convert
from sparse_embed.config import CompressionConfig
from sparse_embed.edge.runtime import TFLiteModel
from sparse_embed.errors import ConfigError
from sparse_embed.fileio import atomic_path
from sparse_embed.keras import keras, tf
from sparse_embed.landmarks import metrics
from sparse_embed.landmarks.config import LandmarksConfig, config_from_run, save_landmarks_config
from sparse_embed.landmarks.data import load_crops, mirrored, read_examples
from sparse_embed.landmarks.losses import LANDMARK_LOSSES
from sparse_embed.models import LANDMARK_MODELS

MODEL_FILE = "model.keras"
METRICS_FILE = "metrics.json"


def training_arrays(config: LandmarksConfig, data_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """The training crops and points, with their mirror images when `config.flip`.

    Args:
        config: The run's config.
        data_dir: The directory its data files are relative to.
    """
    images, points = load_crops(read_examples(config, data_dir, train=True), config.input_size)
    if config.flip:
        flipped = mirrored(images, points)
        images, points = np.concatenate([images, flipped[0]]), np.concatenate([points, flipped[1]])
    return images, points


def _loss(config: LandmarksConfig) -> Callable:
    return LANDMARK_LOSSES.get(config.loss)(scale=float(config.input_size), width=config.wing_width,
                                            epsilon=config.wing_epsilon)


def fit(model: keras.Model, config: LandmarksConfig, images: np.ndarray, points: np.ndarray,
        steps: int, learning_rate: float) -> list[float]:
    """Trains `model` for `steps` steps of Adam with a cosine-decaying learning rate.

    Args:
        model: The network (float, pruned or quantization-aware).
        config: The run's config (loss, batch size, seed).
        images: float32 [N, S, S, 3] crops in [0, 1].
        points: float32 [N, 10] points in crop units.
        steps: Training steps.
        learning_rate: The initial learning rate.

    Returns:
        The loss of every step.
    """
    keras.utils.set_random_seed(config.seed)
    data = (tf.data.Dataset.from_tensor_slices((images, points))
            .shuffle(len(images), seed=config.seed, reshuffle_each_iteration=True)
            .repeat().batch(config.batch_size, drop_remainder=len(images) >= config.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, steps)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=_loss(config))
    history: list[float] = []
    record = keras.callbacks.LambdaCallback(on_batch_end=lambda _, logs: history.append(logs["loss"]))
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0,
              callbacks=[*compression.callbacks(model), record])
    return history


def train(config: LandmarksConfig, data_dir: str | os.PathLike, model_dir: str | os.PathLike) -> dict:
    """Trains a landmark network and measures it on the held-out examples.

    Args:
        config: The run's config.
        data_dir: The directory its data files are relative to.
        model_dir: The run directory (config.yaml, model.keras, metrics.json).

    Returns:
        {"first_loss", "last_loss", "nme", "failure_rate", "images"}.
    """
    images, points = training_arrays(config, data_dir)
    keras.utils.set_random_seed(config.seed)
    model = LANDMARK_MODELS.get(config.model)(input_size=config.input_size)
    losses = fit(model, config, images, points, config.steps, config.learning_rate)
    test_images, test_points = load_crops(read_examples(config, data_dir, train=False), config.input_size)
    figures = metrics.summary(model.predict(test_images, verbose=0), test_points)
    figures = {"train_images": len(images), "first_loss": losses[0],
               "last_loss": float(np.mean(losses[-20:])), **figures}
    model_dir = Path(model_dir)
    save_landmarks_config(config, model_dir)
    with atomic_path(model_dir / MODEL_FILE) as tmp:
        model.save(tmp.with_suffix(".keras"))
        os.replace(tmp.with_suffix(".keras"), tmp)
    (model_dir / METRICS_FILE).write_text(json.dumps({**figures, "data_dir": str(data_dir)}, indent=1) + "\n")
    return figures


def load_run(model_dir: str | os.PathLike) -> tuple[LandmarksConfig, keras.Model]:
    """The config and the trained float network of a landmarks run.

    Args:
        model_dir: A run directory of `train`.

    Raises:
        ConfigError: If it has no config or model.
    """
    config = config_from_run(model_dir)
    path = Path(model_dir) / MODEL_FILE
    if not path.is_file():
        raise ConfigError(f"{path} not found: the run in {model_dir} has not finished training")
    return config, keras.models.load_model(path, compile=False)


def _sparsity(model: keras.Model) -> float:
    """Fraction of zeros over every convolution kernel (depthwise included)."""
    kernels = [w.numpy() for layer in model.layers for w in layer.weights
               if "kernel" in w.name and "quantize" not in w.name]
    return float(sum(np.sum(k == 0) for k in kernels) / sum(k.size for k in kernels))


def compress_run(model_dir: str | os.PathLike, data_dir: str | os.PathLike, output_dir: str | os.PathLike,
                 steps: int | None = None) -> list[dict]:
    """The toolkit's compression table from a trained run: original, int8, pruned, int8 + pruned.

    Args:
        model_dir: A run directory of `train`.
        data_dir: Its data directory (training crops to fine-tune on, held-out crops to measure).
        output_dir: Where the four `.tflite` files are written.
        steps: Fine-tuning steps of each compressed variant; None: the config's `compress_steps`.

    Returns:
        One row per variant: name, TFLite mode, kernel sparsity, file bytes, NME
        and failure rate of the Keras model and of its TFLite file.
    """
    config, float_model = load_run(model_dir)
    steps = steps or config.compress_steps
    images, points = training_arrays(config, data_dir)
    test_images, test_points = load_crops(read_examples(config, data_dir, train=False), config.input_size)
    # Fine-tuning starts below the first run's rate: the variants start from trained weights.
    rate = config.learning_rate / 10
    prune_config = CompressionConfig(type="prune", target_sparsity=config.target_sparsity,
                                     end_step=max(1, steps * 3 // 4))
    pruned = compression.compress(float_model, prune_config, steps)
    fit(pruned, config, images, points, steps, rate)
    pruned = compression.for_export(pruned)
    qat = quantization.quantize_model(float_model, CompressionConfig(type="qat"))
    fit(qat, config, images, points, steps, rate)
    pqat = quantization.quantize_model(pruned, CompressionConfig(type="prune_qat"), preserve_sparsity=True)
    fit(pqat, config, images, points, steps, rate)
    variants = (("original", float_model, float_model, "fp32"), ("int8", qat, float_model, "int8"),
                (f"{config.target_sparsity:.0%} sparse", pruned, pruned, "fp32"),
                (f"int8 + {config.target_sparsity:.0%} sparse", pqat, pruned, "int8"))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, model, weights, mode in variants:
        content = convert(model, mode)
        path = output_dir / (name.replace(" + ", "_").replace(" ", "_").replace("%", "") + ".tflite")
        with atomic_path(path) as tmp:
            tmp.write_bytes(content)
        keras_figures = metrics.summary(model.predict(test_images, verbose=0), test_points)
        tflite_figures = metrics.summary(TFLiteModel.from_content(content)(test_images), test_points)
        rows.append({"model": name, "tflite": mode, "sparsity": round(_sparsity(weights), 4),
                     "bytes": len(content), "keras_nme": round(keras_figures["nme"], 4),
                     "nme": round(tflite_figures["nme"], 4),
                     "failure_rate": round(tflite_figures["failure_rate"], 4),
                     "images": tflite_figures["images"]})
    return rows
