"""Export orchestration: a backbone to export folders, each model through the parity gate.

For each quantization mode of a format, `export` converts or writes the
model (`formats`), runs the parity gate on the written file (`parity`), and
writes `<output>/<format>_<quantize>[_flip]/` with the model and its
export.json, the folder swapped in complete; `format_summary` is the closing
table. The pieces:

- `serving`: the serving function every format starts from;
- `converter`: the TFLite converter and its quantization modes;
- `formats`: how each format writes a model and loads it back;
- `images`: the representative set and held-out images;
- `parity`: the gate's figures and verdict;
- `sparse_embed.edge.runtime`: the TFLite runtime the gate runs `.tflite` files on.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sparse_embed.compression import for_export, is_quantized
from sparse_embed.compression.converter import QUANTIZATIONS
from sparse_embed.compression.formats import check_format
from sparse_embed.compression.parity import ParityData, gate_failure, is_sparse, parity
from sparse_embed.compression.rewrite import rewrite_prelu
from sparse_embed.compression.serving import CONFIDENCE_NAME, OUTPUT_NAME, serving_function
from sparse_embed.config import Config
from sparse_embed.errors import ConfigError
from sparse_embed.fileio import atomic_path
from sparse_embed.keras import keras, tf


def default_min_cosine(quantize: str) -> float:
    """The parity gate's default threshold for a mode (0.999 float, 0.98 int8 kinds).

    Args:
        quantize: A name in `QUANTIZATIONS`.
    """
    return QUANTIZATIONS.get(quantize).min_cosine


def check_confidence_modes(config: Config, quantize: Sequence[str]) -> None:
    """Refuses the integer modes for a run with a confidence output.

    The confidence is a logarithm of the extra head's output (-mean log sigma^2,
    log kappa): TFLite has no int8 kernel for its LOG and NEG, and an integer
    model may not keep float ops. The float modes, and `dynamic` (int8 weights,
    float activations), convert it.

    Args:
        config: The run config.
        quantize: Names in `QUANTIZATIONS`.

    Raises:
        ConfigError: If the run has a confidence and a mode has integer ops.
    """
    distribution = config.model.distribution
    integer = [q for q in quantize if QUANTIZATIONS.get(q).integer_ops]
    if integer and distribution.build(config.model.embedding_size).has_confidence:
        raise ConfigError(
            f"--quantize={integer[0]}: the confidence output of a model.distribution.name="
            f"{distribution.name} run is a logarithm (LOG, NEG), which has no int8 kernel; export it "
            f"with --quantize=fp32, fp16 or dynamic (int8 weights, float activations)")


def failed_name(filename: str) -> str:
    """The name a model that failed the gate keeps: `model.failed.tflite`, `saved_model.failed`.

    Args:
        filename: The model's name in a passed export.
    """
    stem, dot, suffix = filename.partition(".")
    return f"{stem}.failed{dot}{suffix}"


@dataclass(frozen=True)
class ExportResult:
    """One export: where it is and what export.json says.

    Attributes:
        folder: The export folder (model + export.json).
        model_path: The model file (or SavedModel directory).
        record: The contents of export.json.
    """

    folder: Path
    model_path: Path
    record: dict[str, Any]

    @property
    def passed(self) -> bool:
        """Whether the parity gate passed."""
        return bool(self.record["passed"])


def _size_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def export_folder(output: str | os.PathLike, fmt: str, quantize: str, flip_concat: bool) -> Path:
    """Where one export goes: `<output>/<format>_<quantize>`, `_flip` appended with flip-concat.

    Args:
        output: The parent folder (`<model_dir>/export` by default).
        fmt: A name in `FORMATS`.
        quantize: A name in `QUANTIZATIONS`.
        flip_concat: Whether the graph has the flip-concat.
    """
    return Path(output) / f"{fmt}_{quantize}{'_flip' if flip_concat else ''}"


def export(model: keras.Model, config: Config, fmt: str, quantize: Sequence[str],
           output: str | os.PathLike, data: ParityData, representative: np.ndarray | None = None,
           flip_concat: bool = False, min_cosine: float | None = None, max_accuracy_drop: float = 0.5,
           provenance: dict[str, Any] | None = None,
           progress: Callable[[str], None] | None = None) -> list[ExportResult]:
    """Writes exported models and their export.json, each after the parity gate ran on the written file.

    Each folder (`export_folder`) is built under a temporary name and renamed
    into place, so it never holds a half-written model; an earlier export in
    the same folder is replaced. A model that fails the gate is kept for
    inspection under `failed_name` (`model.failed.tflite`), next to an
    export.json with `"passed": false` and the reason.

    Args:
        model: The run's backbone (Keras), the parity reference.
        config: The run config.
        fmt: A name in `FORMATS`.
        quantize: Names in `QUANTIZATIONS` that the format takes, one model each.
        output: Parent of the export folders.
        data: Held-out images and pairs of the parity gate.
        representative: Calibration images of the `int8` modes.
        flip_concat: Bake the flip-concat test-time augmentation into the graph.
        min_cosine: Gate threshold on the mean cosine; None is each mode's default.
        max_accuracy_drop: Gate threshold on the accuracy drop, in points.
        provenance: Extra entries for export.json (run directory, data sources).
        progress: Called with a line before each long step (conversion, parity gate).

    A probabilistic run (`config.model.distribution` with a confidence) is
    exported with two outputs, `embedding` (the mean) and `confidence`
    (`serving.serving_function`), and the gate compares both.

    Returns:
        One result per mode; `passed` says whether the gate passed.

    Raises:
        ConfigError: If the format does not take a mode, an integer mode keeps a float op,
            or is asked of a run with a confidence (`check_confidence_modes`).
    """
    entries = [check_format(fmt, q) for q in quantize]
    check_confidence_modes(config, quantize)
    say = progress or (lambda line: None)
    model = for_export(model)
    # One trace for the reference and the float conversions, one for the integer ones
    # (PReLU rewritten), traced when first needed.
    distribution = config.model.distribution.build(config.model.embedding_size)
    serve = serving_function(model, flip_concat, distribution)

    @functools.cache
    def integer_serving() -> tuple[Any, keras.Model]:
        rewritten = rewrite_prelu(model)
        if rewritten is model:
            return serve, model
        return serving_function(rewritten, flip_concat, distribution), rewritten

    def converted(mode: str) -> tuple[Any, keras.Model]:
        return integer_serving() if QUANTIZATIONS.get(mode).integer_ops else (serve, model)

    def reference(images: np.ndarray) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        outputs = serve(tf.constant(images))
        if CONFIDENCE_NAME in outputs:
            return outputs[OUTPUT_NAME].numpy(), outputs[CONFIDENCE_NAME].numpy()
        return outputs[OUTPUT_NAME].numpy()

    results = []
    for entry, mode in zip(entries, quantize, strict=True):
        threshold = default_min_cosine(mode) if min_cosine is None else min_cosine
        folder = export_folder(output, fmt, mode, flip_concat)
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            written = tmp / entry.filename
            say(f"{fmt} {mode}: converting")
            spec = entry.write(*converted(mode), mode, representative, written)
            say(f"{fmt} {mode}: parity gate on {len(data.images)} held-out images"
                + (f" and {len(data.pairs)} pairs" if data.pairs is not None else ""))
            figures = parity(reference, entry.load(written), data, config, is_sparse(config))
            reason = gate_failure(figures, threshold, max_accuracy_drop)
            name = failed_name(entry.filename) if reason else entry.filename
            written.rename(tmp / name)
            size = _size_bytes(tmp / name)
            record = {
                "format": fmt, "quantize": mode, "file": name,
                "size_bytes": size, "size_mib": size / 2**20,
                "model": config.model.name, "embedding_size": config.model.embedding_size,
                "compression": config.compression.type, "quantization_aware": is_quantized(model),
                "flip_concat": flip_concat,
                "output_is": ("concat(e(x), e(flip(x))), " if flip_concat else "e(x), ")
                + "not L2-normalised" + (", the mean of the distribution's parameters"
                                         if distribution.has_confidence else ""),
                **({"confidence_is": f"{CONFIDENCE_NAME}: the {config.model.distribution.name} "
                                     f"distribution's confidence, float32 [N], higher is surer"
                                     + (", the smaller of both views'" if flip_concat else "")}
                   if distribution.has_confidence else {}),
                "input_is": "RGB NHWC float32 in [-1, 1] (x / 127.5 - 1); an int8 input takes "
                            "round(x / scale) + zero_point with the input's quantization",
                **spec,
                "representative_count": 0 if representative is None else int(len(representative)),
                "parity": figures, "min_cosine": threshold, "max_accuracy_drop": max_accuracy_drop,
                "passed": not reason, "reason": reason,
                **(provenance or {}),
            }
            (tmp / "export.json").write_text(json.dumps(record, indent=2))
            if folder.exists():
                # os.replace cannot put a directory over a non-empty one.
                shutil.rmtree(folder)
        results.append(ExportResult(folder, folder / name, record))
    return results


def format_summary(results: Sequence[ExportResult]) -> str:
    """The closing table of an export: one row per model.

    Args:
        results: The exports, in order.

    Returns:
        The table as text (no trailing newline).
    """
    head = (f"{'format':<12}{'quantize':<10}{'MiB':>8}{'mean cos':>11}{'min cos':>10}"
            f"{'acc keras':>11}{'acc export':>11}{'nnz keras':>11}{'nnz export':>11}  result")
    lines = [head, "-" * len(head)]

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}"

    def nnz(side: dict[str, Any]) -> str:
        return f"{side['mean_nnz']:.1f}" if "mean_nnz" in side else "-"

    for result in results:
        r, p = result.record, result.record["parity"]
        lines.append(
            f"{r['format']:<12}{r['quantize']:<10}{r['size_mib']:>8.3f}{p['mean_cosine']:>11.6f}"
            f"{p['min_cosine']:>10.6f}{pct(p['keras']['accuracy']):>11}{pct(p['exported']['accuracy']):>11}"
            f"{nnz(p['keras']):>11}{nnz(p['exported']):>11}  {'PASS' if result.passed else 'FAIL'}")
    return "\n".join(lines)
