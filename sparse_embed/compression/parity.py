"""The parity gate: an exported model and the Keras model on the same images and pairs.

The gate runs the written file (TFLite on the runtime of the edge devices,
`sparse_embed.edge.runtime`; the SavedModel reloaded; ONNX through
onnxruntime) and the Keras model on the same held-out images and
verification pairs, and compares embeddings (mean and minimum cosine),
verification accuracy, and the nnz and FLOPs per pair of sparse models. A
model with a confidence output (a probabilistic run) is also compared on it:
the largest difference as a fraction of the Keras confidences' scale (the
larger of their range and their largest magnitude), which the gate holds to
1 - the cosine threshold (0.001 for the float modes, 0.02 for the int8 ones).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from sparse_embed.config import Config
from sparse_embed.data.pipeline import files_dataset, missing_paths
from sparse_embed.data.verification import Pairs, unique_images
from sparse_embed.errors import DataError
from sparse_embed.metrics.verification import verification_metrics
from sparse_embed.sparsity import sparsity_stats_np

# A model as the gate sees it: float32 [N, H, W, 3] images in [-1, 1] -> float32 [N, D] embeddings,
# or (embeddings, float32 [N] confidences) for a model with a confidence output.
Embedder = Callable[[np.ndarray], np.ndarray | tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True, eq=False)
class ParityData:
    """What the parity gate embeds with both models.

    Attributes:
        images: float32 [N, H, W, 3] held-out images in [-1, 1].
        pairs: Verification pairs (their images are embedded too), or None.
    """

    images: np.ndarray
    pairs: Pairs | None = None


def _batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size]


def _outputs(embedder: Embedder, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(embeddings, confidences or None) of one batch."""
    out = embedder(batch)
    return (out[0], out[1]) if isinstance(out, tuple) else (out, None)


def _embed_both(reference: Embedder, exported: Embedder, batches: Iterator[np.ndarray],
                confidences: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Both models' embeddings of the batches; their confidences, if any, go to `confidences`."""
    ref, out = [], []
    for batch in batches:
        (ref_emb, ref_conf), (out_emb, out_conf) = _outputs(reference, batch), _outputs(exported, batch)
        if (ref_conf is None) != (out_conf is None):
            raise DataError("the exported model and the Keras model disagree on having a confidence "
                            "output; export again")
        ref.append(ref_emb)
        out.append(out_emb)
        if ref_conf is not None:
            confidences.append((ref_conf, out_conf))
    return np.concatenate(ref), np.concatenate(out)


def _normalize(e: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(e, axis=1, keepdims=True)
    return e / np.maximum(norm, 1e-12)


def parity(reference: Embedder, exported: Embedder, data: ParityData, config: Config,
           sparse: bool, batch_size: int = 32) -> dict[str, Any]:
    """Embeds the parity data with both models and compares them.

    Args:
        reference: The Keras serving function, float32 images -> embeddings.
        exported: The exported model, the same contract.
        data: Held-out images and optional pairs.
        config: The run config (input shape, zero threshold, folds).
        sparse: Also report nnz and FLOPs per pair of both.
        batch_size: Images per call.

    Returns:
        `images`, `mean_cosine`, `min_cosine`, `max_abs_diff`, with a confidence
        output `confidence_max_abs_diff` and `confidence_max_rel_diff` (over the
        Keras confidences' scale, module docstring), and per model (`keras`,
        `exported`) `accuracy` (null without pairs), with a confidence output
        `mean_confidence`, and with `sparse` `mean_nnz`, `flops_per_pair`.

    Raises:
        DataError: If there is nothing to compare, or an image of the pairs does not decode.
    """
    refs: list[np.ndarray] = []
    outs: list[np.ndarray] = []
    confidences: list[tuple[np.ndarray, np.ndarray]] = []
    if len(data.images):
        ref, out = _embed_both(reference, exported, _batches(data.images, batch_size), confidences)
        refs.append(ref)
        outs.append(out)
    scores: dict[str, np.ndarray] = {}
    if data.pairs is not None:
        paths, left, right = unique_images(data.pairs)
        dataset = files_dataset(list(paths), None, batch_size, config.model.input_shape)
        names: list[str] = []

        def images() -> Iterator[np.ndarray]:
            for batch, _, batch_names in dataset:
                names.extend(n.decode() for n in batch_names.numpy())
                yield batch.numpy()

        pair_ref, pair_out = _embed_both(reference, exported, images(), confidences)
        unreadable = missing_paths(paths, names)
        if unreadable:
            raise DataError(f"{len(unreadable)} image(s) of the pairs do not decode, first: "
                            f"{unreadable[0]}; replace or re-align them")
        for key, emb in (("keras", pair_ref), ("exported", pair_out)):
            e = _normalize(emb)
            scores[key] = np.sum(e[left] * e[right], axis=1)
        refs.append(pair_ref)
        outs.append(pair_out)
    if not refs:
        raise DataError("the parity gate has no images: pass --data_dir (held-out TFRecords) or --pairs")
    ref, out = np.concatenate(refs), np.concatenate(outs)
    cosine = np.sum(_normalize(ref) * _normalize(out), axis=1)
    figures: dict[str, Any] = {
        "images": int(len(ref)),
        "mean_cosine": float(cosine.mean()),
        "min_cosine": float(cosine.min()),
        "max_abs_diff": float(np.abs(ref - out).max()),
    }
    keras_confidence = exported_confidence = None
    if confidences:
        keras_confidence = np.concatenate([c for c, _ in confidences]).astype(np.float64)
        exported_confidence = np.concatenate([c for _, c in confidences]).astype(np.float64)
        diff = float(np.abs(keras_confidence - exported_confidence).max())
        scale = max(float(np.ptp(keras_confidence)), float(np.abs(keras_confidence).max()), 1e-6)
        figures.update(confidence_max_abs_diff=diff, confidence_max_rel_diff=diff / scale)
    for key, emb, confidence in (("keras", ref, keras_confidence),
                                 ("exported", out, exported_confidence)):
        side: dict[str, Any] = {"accuracy": None}
        if confidence is not None:
            side["mean_confidence"] = float(confidence.mean())
        if scores:
            side["accuracy"] = float(verification_metrics(scores[key], data.pairs.issame,
                                                          folds=data.pairs.fold)["accuracy"])
        if sparse:
            stats = sparsity_stats_np(emb, config.sparsity.zero_threshold)
            side.update(mean_nnz=float(stats["nnz"]), flops_per_pair=float(stats["flops"]))
        figures[key] = side
    return figures


def gate_failure(figures: dict[str, Any], min_cosine: float, max_accuracy_drop: float) -> str:
    """Why the parity figures fail the gate, or "" when they pass.

    Args:
        figures: What `parity` returned.
        min_cosine: Lowest acceptable mean cosine.
        max_accuracy_drop: Largest acceptable accuracy drop, in percentage points.
    """
    if figures["mean_cosine"] < min_cosine:
        return f"mean cosine to the Keras model {figures['mean_cosine']:.6f} < --min_cosine={min_cosine:g}"
    relative = figures.get("confidence_max_rel_diff")
    if relative is not None and relative > 1 - min_cosine:
        return (f"the confidence differs from the Keras model's by up to {relative:.3g} of its scale "
                f"> 1 - --min_cosine = {1 - min_cosine:g}")
    keras_acc, exported_acc = figures["keras"]["accuracy"], figures["exported"]["accuracy"]
    if keras_acc is not None and 100 * (keras_acc - exported_acc) > max_accuracy_drop:
        return (f"verification accuracy drops {100 * (keras_acc - exported_acc):.2f} points "
                f"({100 * keras_acc:.2f}% -> {100 * exported_acc:.2f}%) > "
                f"--max_accuracy_drop={max_accuracy_drop:g}")
    return ""


def is_sparse(config: Config) -> bool:
    """Whether a run learns sparse embeddings (sparse final activation or a sparsity regularizer).

    Args:
        config: The run config.
    """
    return config.model.final_activation != "none" or config.sparsity.type != "none"
