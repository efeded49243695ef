"""LFW verification on the device, the MLPerf edge face protocol, with the TFLite interpreter only.

    python -m sparse_embed.edge.lfw --model=mobilefacenet.tflite --pairs=lfw/pairs.txt \\
        --images=lfw/images --align=models/mtcnn --first=600 --num_threads=2
    python -m sparse_embed.edge.lfw --model=model.tflite --pairs=pairs.txt --images=ALIGNED --aligned
    # a probabilistic run's export: also drop the 10% least confident pairs
    python -m sparse_embed.edge.lfw --model=pfe.tflite --pairs=pairs.txt --images=ALIGNED --aligned \\
        --reject_fraction=0.1

For each pair the model runs four times, on image A, A mirrored, B and B
mirrored (batch 1); each image's two embeddings are concatenated (1024-d for
a 512-d model) and the pair's score is the cosine of the two concatenations
(0 where one is all zeros). Accuracy uses the threshold chosen by 10-fold
cross-validation (`sparse_embed.metrics.verification`): on the pairs file's
folds when the evaluated pairs span two or more (LFW View 2's 10 x 600), else
on 10 contiguous folds of them (the first 600 pairs, the MLPerf setting, are
fold 0 of `pairs.txt`); or `--verification_threshold` fixes it.

Pre-processing decodes every image once and, with `--align=DIR`, finds the
face with MTCNN (`DIR/{pnet,rnet,onet}.tflite`, written by
`python -m sparse_embed.faces.mtcnn_tflite`), takes the one nearest the image
centre and warps its five landmarks onto the crop template of the model's
input size; `--aligned` takes the images as crops already, resized to the
input size if they differ. The model's input is float32 RGB in [-1, 1]
(pixel / 127.5 - 1); integer-only models get it quantized, their output
dequantized, with the scale and zero point in the file.

Images that cannot be decoded (and, with `--align`, images without a face)
are counted and named, and their pairs are skipped; nothing left to evaluate
is an error. The report ends with the MLPerf README's three phases in
seconds (pre-process, inference for all pairs, post-process) and the mean
milliseconds per inference. Where it fits: docs/compression.md.

A model with a confidence output (`sparse_embed.export` of a probabilistic
run) gives each of the four runs of a pair a confidence; the pair's is the
smallest of the four (an image's is the smaller of its two views', a
pair's the smaller of its two images'). The report adds their statistics,
and `--reject_fraction=F` drops the floor(F x pairs) least confident pairs
(equal confidences in file order) and reports the accuracy on the rest,
its threshold chosen on them as above. A model without a confidence output
refuses --reject_fraction.

Only NumPy, OpenCV and `ai_edge_litert` are imported (argparse, not absl),
never TensorFlow: this is the script that runs on the device.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparse_embed.cli import deprecated_alias, make_parser, program, user_errors_exit
from sparse_embed.data import format_summary
from sparse_embed.data.verification import Pairs, read_pairs
from sparse_embed.edge.model import EmbeddingModel
from sparse_embed.edge.mtcnn import TFLiteMTCNN
from sparse_embed.edge.preprocess import decode, face_crop
from sparse_embed.errors import ConfigError, DataError
from sparse_embed.fileio import atomic_path
from sparse_embed.metrics.uncertainty import confidence_order
from sparse_embed.metrics.verification import verification_metrics

# Image A, A mirrored, image B, B mirrored.
INFERENCES_PER_PAIR = 4
FOLDS = 10
# Progress lines per phase.
PROGRESS_STEPS = 10
# How many problem images the report names; the rest are counted.
SHOWN_EXAMPLES = 3


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags of `python -m sparse_embed.edge.lfw`."""
    parser = make_parser(__doc__, program(__name__))
    parser.add_argument("--model", required=True, help="The .tflite embedding model.")
    parser.add_argument("--pairs", required=True, help="LFW-format pairs file (pairs.txt).")
    parser.add_argument("--images", required=True, help="Image root: one folder per identity.")
    parser.add_argument("--first", type=int, default=None,
                        help="Evaluate only the first N pairs of the file (MLPerf: 600). Default: all.")
    parser.add_argument("--num_threads", type=int, default=os.cpu_count() or 1,
                        help="CPU threads of the interpreters. Default: all cores.")
    deprecated_alias(parser, "--threads", "--num_threads")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--align", metavar="MTCNN_DIR",
                        help="Detect and align faces with MTCNN's pnet/rnet/onet.tflite in this directory "
                             "(python -m sparse_embed.faces.mtcnn_tflite --output=MTCNN_DIR).")
    source.add_argument("--aligned", action="store_true",
                        help="The images are aligned face crops already (resized to the model's input).")
    parser.add_argument("--verification_threshold", type=float, default=None,
                        help="Fixed cosine threshold (same pair when score > T). Default: 10-fold.")
    deprecated_alias(parser, "--threshold", "--verification_threshold")
    parser.add_argument("--reject_fraction", type=float, default=None,
                        help="Drop this fraction of the pairs, the least confident (the smallest "
                             "confidence of their four runs), and report the accuracy on the rest; "
                             "needs a model with a confidence output. Default: keep all.")
    parser.add_argument("--output", default=None,
                        help="Also write the results, with every pair's score, to this JSON file.")
    return parser


class _Progress:
    """Prints `label: done/total` at every tenth of the way, on stdout (stderr is for errors)."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total = label, total
        self._step = max(1, math.ceil(total / PROGRESS_STEPS))
        self._next = self._step

    def update(self, done: int) -> None:
        if self.total and (done >= self._next or done == self.total):
            print(f"{self.label}: {done}/{self.total}", flush=True)
            self._next = done + self._step


@dataclass(frozen=True)
class Prepared:
    """The model inputs of the pairs' images, after pre-processing.

    Attributes:
        tensors: Image path -> (input of the image, input of its mirror image).
        undecodable: Paths that could not be decoded.
        no_face: Paths where the detector found no face.
        seconds: Time spent.
    """

    tensors: dict[str, tuple[np.ndarray, np.ndarray]]
    undecodable: tuple[str, ...]
    no_face: tuple[str, ...]
    seconds: float


def prepare_images(paths: Sequence[str], model: EmbeddingModel, detector: TFLiteMTCNN | None,
                   verbose: bool = True) -> Prepared:
    """Pre-processing: decodes each image once, detects and aligns (or resizes) it, builds both inputs.

    Args:
        paths: Image files, each once.
        model: The embedding model (its input size and type).
        detector: MTCNN for raw images; None for aligned crops.
        verbose: Print progress.

    Returns:
        The inputs, and the images that gave none.
    """
    start = time.perf_counter()
    progress = _Progress("pre-process", len(paths)) if verbose else None
    tensors, undecodable, no_face = {}, [], []
    for done, path in enumerate(paths, 1):
        image = decode(path)
        if image is None:
            undecodable.append(path)
        else:
            crop = face_crop(image, model.width, model.height, detector)
            if crop is None:
                no_face.append(path)
            else:
                tensors[path] = (model.prepare(crop), model.prepare(crop[:, ::-1]))
        if progress:
            progress.update(done)
    return Prepared(tensors, tuple(undecodable), tuple(no_face), time.perf_counter() - start)


def embed_pairs(model: EmbeddingModel, left: Sequence[str], right: Sequence[str],
                tensors: dict[str, tuple[np.ndarray, np.ndarray]], verbose: bool = True
                ) -> tuple[np.ndarray, float, np.ndarray | None]:
    """Inference: four runs per pair (A, A mirrored, B, B mirrored), timed together.

    Args:
        model: The embedding model.
        left: First image of each pair.
        right: Second image of each pair.
        tensors: The inputs from `prepare_images`.
        verbose: Print progress.

    Returns:
        (float32 [n, 4, D] embeddings in run order, seconds spent in the runs,
        float32 [n, 4] confidences of the runs, or None for a model without a
        confidence output).
    """
    out = np.empty((len(left), INFERENCES_PER_PAIR, model.embedding_size), np.float32)
    confidences = np.empty((len(left), INFERENCES_PER_PAIR), np.float32)
    run = model.run_with_confidence if model.has_confidence else None
    progress = _Progress("inference", len(left)) if verbose else None
    seconds = 0.0
    for i, (a, b) in enumerate(zip(left, right, strict=True)):
        inputs = (*tensors[a], *tensors[b])
        start = time.perf_counter()
        for k, tensor in enumerate(inputs):
            if run is None:
                out[i, k] = model.run(tensor)
            else:
                out[i, k], confidences[i, k] = run(tensor)
        seconds += time.perf_counter() - start
        if progress:
            progress.update(i + 1)
    return out, seconds, confidences if run is not None else None


def reject(scores: np.ndarray, issame: np.ndarray, folds: np.ndarray, confidences: np.ndarray,
           fraction: float, threshold: float | None = None) -> dict[str, float | int | str]:
    """Accuracy on the pairs left once the least confident `fraction` of them are dropped.

    Args:
        scores: float [n] pair scores.
        issame: bool [n].
        folds: int [n], each pair's fold in the pairs file.
        confidences: float [n] pair confidences, higher = surer.
        fraction: The fraction of pairs to drop, in [0, 1): floor(fraction x n) of them.
        threshold: A fixed threshold; None chooses it on the kept pairs (see `accuracy`).

    Returns:
        `reject_fraction`, `rejected_pairs`, `kept_pairs`, `kept_min_confidence`
        (the lowest confidence kept) and the kept pairs' `accuracy`,
        `threshold`, `accuracy_protocol` (and `accuracy_std` where there are folds)
        prefixed with `kept_`.

    Raises:
        DataError: If the threshold has to be chosen and the kept pairs are all of one kind.
    """
    order = confidence_order(confidences)
    dropped = math.floor(fraction * len(scores))
    kept = np.sort(order[:len(scores) - dropped])
    result = accuracy(scores[kept], issame[kept], folds[kept], threshold)
    return {"reject_fraction": fraction, "rejected_pairs": dropped, "kept_pairs": int(len(kept)),
            "kept_min_confidence": float(np.min(confidences[kept])),
            **{f"kept_{key}": result[key] for key in ("accuracy", "accuracy_std", "threshold",
                                                      "accuracy_protocol") if key in result}}


def flip_concat_cosine(embeddings: np.ndarray) -> np.ndarray:
    """Pair scores: the cosine of [A, A mirrored] and [B, B mirrored] concatenated.

    Args:
        embeddings: [n, 4, D] (A, A mirrored, B, B mirrored) per pair.

    Returns:
        float64 [n] cosines; 0 where a concatenation is all zeros (a fully sparse embedding).
    """
    n = len(embeddings)
    a = embeddings[:, :2].reshape(n, -1).astype(np.float64)
    b = embeddings[:, 2:].reshape(n, -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.sum(a * b, axis=1)
    return np.divide(dots, norms, out=np.zeros(n), where=norms > 0)


def accuracy(scores: np.ndarray, issame: np.ndarray, folds: np.ndarray,
             threshold: float | None = None) -> dict[str, float | str]:
    """Verification accuracy: at a fixed threshold, or with the threshold chosen 10-fold.

    Args:
        scores: float [n] pair scores.
        issame: bool [n].
        folds: int [n], each pair's fold in the pairs file.
        threshold: A fixed threshold; None chooses it by cross-validation
            (module docstring).

    Returns:
        accuracy, threshold and accuracy_protocol; with cross-validation also
        accuracy_std (two or more folds), auc and eer.

    Raises:
        DataError: If a threshold has to be chosen and the pairs are all of one kind.
    """
    if threshold is not None:
        return {"accuracy": float(np.mean((scores > threshold) == issame)), "threshold": threshold,
                "accuracy_protocol": "given threshold (--verification_threshold)"}
    file_folds = folds if np.unique(folds).size >= 2 else None
    metrics = verification_metrics(scores, issame, folds=file_folds, nfolds=min(FOLDS, len(scores)))
    return {key: metrics[key] for key in ("accuracy", "accuracy_std", "threshold", "accuracy_protocol",
                                          "auc", "eer") if key in metrics}


def _select(pairs: Pairs, first: int | None) -> Pairs:
    """The first `first` pairs (all when None)."""
    n = len(pairs) if first is None else min(first, len(pairs))
    return Pairs(pairs.left[:n], pairs.right[:n], pairs.issame[:n], pairs.fold[:n])


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _examples(paths: Sequence[str]) -> str:
    shown = ", ".join(paths[:SHOWN_EXAMPLES])
    return shown + (f", ... ({len(paths) - SHOWN_EXAMPLES} more)" if len(paths) > SHOWN_EXAMPLES else "")


def evaluate(model: EmbeddingModel, pairs: Pairs, detector: TFLiteMTCNN | None = None,
             threshold: float | None = None, verbose: bool = True,
             reject_fraction: float | None = None) -> dict:
    """Runs the protocol on pairs: pre-process, inference, post-process.

    Args:
        model: The embedding model.
        pairs: The pairs to evaluate (with their folds).
        detector: MTCNN for raw images; None for aligned crops.
        threshold: Fixed threshold; None: 10-fold (see `accuracy`).
        verbose: Print progress.
        reject_fraction: Also measure the accuracy without this fraction of the
            least confident pairs (`reject`); needs a confidence output.

    Returns:
        The results: counts, accuracy (see `accuracy`), the three phases'
        seconds and ms per inference, the skipped images, and per evaluated
        pair its index in `pairs`, score and issame; with a confidence output
        also `confidence` (mean, std, min, median, max of the pair
        confidences), every pair's confidence and, with `reject_fraction`,
        what `reject` returns.

    Raises:
        DataError: If no pair is left once the images without an input are
            skipped, or the threshold cannot be chosen.
    """
    paths = list(dict.fromkeys((*pairs.left, *pairs.right)))
    prepared = prepare_images(paths, model, detector, verbose)
    kept = np.array([a in prepared.tensors and b in prepared.tensors
                     for a, b in zip(pairs.left, pairs.right, strict=True)], dtype=bool)
    problems = []
    if prepared.undecodable:
        problems.append(f"{_count(len(prepared.undecodable), 'image')} could not be decoded "
                        f"({_examples(prepared.undecodable)})")
    if prepared.no_face:
        problems.append(f"{_count(len(prepared.no_face), 'image')} without a face MTCNN finds "
                        f"({_examples(prepared.no_face)})")
    if not kept.any():
        raise DataError(f"no pair left to evaluate: all {len(pairs)} pairs skipped, "
                        f"{'; '.join(problems)}; check the images")
    index = np.flatnonzero(kept)
    left = [pairs.left[i] for i in index]
    right = [pairs.right[i] for i in index]
    embeddings, inference_s, run_confidences = embed_pairs(model, left, right, prepared.tensors, verbose)

    start = time.perf_counter()
    scores = flip_concat_cosine(embeddings)
    result = accuracy(scores, pairs.issame[index], pairs.fold[index], threshold)
    confident: dict = {}
    if run_confidences is not None:
        pair_confidences = run_confidences.min(axis=1).astype(np.float64)
        confident = {"confidence": {name: float(f(pair_confidences)) for name, f in (
            ("mean", np.mean), ("std", np.std), ("min", np.min), ("median", np.median),
            ("max", np.max))}, "pair_confidences": pair_confidences.tolist()}
        if reject_fraction is not None:
            confident.update(reject(scores, pairs.issame[index], pairs.fold[index], pair_confidences,
                                    reject_fraction, threshold))
    postprocess_s = time.perf_counter() - start
    inferences = INFERENCES_PER_PAIR * len(index)
    return {
        "model": str(model.path),
        "input_size": [model.height, model.width],
        "input_dtype": model.input_dtype.name,
        "embedding_size": model.embedding_size,
        "has_confidence": model.has_confidence,
        "pairs_selected": len(pairs),
        "pairs": len(index),
        "skipped_pairs": len(pairs) - len(index),
        "problems": problems,
        "undecodable": list(prepared.undecodable),
        "no_face": list(prepared.no_face),
        "images": len(paths),
        "aligned_by_detector": detector is not None,
        **result,
        "inferences": inferences,
        "preprocess_s": prepared.seconds,
        "inference_s": inference_s,
        "postprocess_s": postprocess_s,
        "ms_per_inference": 1000.0 * inference_s / inferences,
        "pair_index": index.tolist(),
        "scores": scores.tolist(),
        "issame": pairs.issame[index].tolist(),
        **confident,
    }


def format_report(result: dict, threads: int) -> str:
    """The closing summary and the three-phase timing table.

    Args:
        result: The output of `evaluate`.
        threads: Interpreter threads used.
    """
    height, width = result["input_size"]
    size = result["embedding_size"]
    spread = f" +- {100 * result['accuracy_std']:.2f}" if "accuracy_std" in result else ""
    pairs = f"{result['pairs']} of {result['pairs_selected']} evaluated, {result['skipped_pairs']} skipped"
    if result["problems"]:
        pairs += f": {'; '.join(result['problems'])}"
    preprocess = "decode, detect and align" if result["aligned_by_detector"] else "decode"
    rows = [
        ("model", f"{height}x{width} {result['input_dtype']} input, {size}-d output "
                  f"({2 * size}-d flip-concatenated)"
                  + (", confidence output" if result.get("has_confidence") else "")),
        ("pairs", pairs),
        ("accuracy", f"{100 * result['accuracy']:.2f}%{spread} ({result['accuracy_protocol']})"),
        ("threshold", f"{result['threshold']:.4f}"),
    ]
    if "confidence" in result:
        c = result["confidence"]
        rows.append(("pair confidence", f"mean {c['mean']:.4g}, std {c['std']:.3g}, min {c['min']:.4g}, "
                                        f"median {c['median']:.4g}, max {c['max']:.4g} "
                                        f"(smallest of the 4 runs)"))
    if "reject_fraction" in result:
        kept_spread = f" +- {100 * result['kept_accuracy_std']:.2f}" if "kept_accuracy_std" in result else ""
        rows += [
            ("rejected", f"{result['rejected_pairs']} least confident pairs "
                         f"(--reject_fraction={result['reject_fraction']:g}), "
                         f"kept confidence >= {result['kept_min_confidence']:.4g}"),
            ("accuracy kept", f"{100 * result['kept_accuracy']:.2f}%{kept_spread} on "
                              f"{result['kept_pairs']} pairs ({result['kept_accuracy_protocol']})"),
        ]
    rows += [
        ("phase", "seconds"),
        ("pre-process", f"{result['preprocess_s']:.2f} ({preprocess} {result['images']} images)"),
        ("inference", f"{result['inference_s']:.2f} ({result['inferences']} inferences, "
                      f"{INFERENCES_PER_PAIR} per pair, {_count(threads, 'thread')})"),
        ("post-process", f"{result['postprocess_s']:.2f} (concatenate, cosine, accuracy)"),
        ("ms per inference", f"{result['ms_per_inference']:.2f}"),
    ]
    return format_summary(f"LFW verification (MLPerf edge protocol): {Path(result['model']).name}", rows)


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """Parses the flags, runs the protocol, prints the report (and writes --output)."""
    args = build_parser().parse_args(argv)
    if args.first is not None and args.first < 1:
        raise ConfigError(f"--first must be at least 1, got {args.first}")
    if args.num_threads < 1:
        raise ConfigError(f"--num_threads must be at least 1, got {args.num_threads}")
    if args.verification_threshold is not None and not math.isfinite(args.verification_threshold):
        raise ConfigError(f"--verification_threshold must be a finite number, got "
                          f"{args.verification_threshold}")
    if args.reject_fraction is not None and not 0 <= args.reject_fraction < 1:
        raise ConfigError(f"--reject_fraction must be in [0, 1), got {args.reject_fraction}")
    model = EmbeddingModel(args.model, num_threads=args.num_threads)
    if args.reject_fraction is not None and not model.has_confidence:
        raise ConfigError(f"--reject_fraction needs a model with a confidence output (the export of a "
                          f"probabilistic run); {args.model} has only the embedding")
    detector = TFLiteMTCNN(args.align, num_threads=args.num_threads) if args.align else None
    pairs = _select(read_pairs(args.pairs, args.images), args.first)
    result = evaluate(model, pairs, detector, args.verification_threshold,
                      reject_fraction=args.reject_fraction)
    print(format_report(result, args.num_threads))
    if args.output:
        with atomic_path(args.output) as tmp:
            tmp.write_text(json.dumps(result, indent=2))


def run() -> None:
    """Console-script entry point."""
    main()


if __name__ == "__main__":
    run()
