"""Export a trained model for deployment (TFLite, SavedModel, ONNX), gated by parity with Keras.

    python -m sparse_embed.export --model_dir=runs/sparse_mfn --data_dir=data/synth \
        --format=tflite --quantize=fp32,int8_full
    python -m sparse_embed.export --model_dir=runs/sparse_mfn --data_dir=data/synth \
        --format=tflite --quantize=int8 --representative='data/calib/*.tfrecord' \
        --representative_count=500 --flip_concat
    python -m sparse_embed.export --model_dir=runs/sparse_mfn --format=onnx \
        --pairs=data/lfw/pairs.txt --pairs_images=data/lfw/images

Each (format, quantize) goes to its own folder, `<output>/<format>_<quantize>`
(`_flip` appended with --flip_concat; --output defaults to <model_dir>/export):
`model.tflite` / `saved_model/` / `model.onnx` next to `export.json` (size,
input / output spec with int8 quantization parameters, parity figures, the
gate's verdict). The model takes float32 NHWC RGB in [-1, 1] at the run's
input size (`int8_full`: int8, quantized with the input's scale and
zero_point) and outputs the embedding, not L2-normalised (with --flip_concat
`concat(e(x), e(flip(x)))`).

The representative set (int8, int8_full) is the first --representative_count
images of --representative (TFRecord glob, image folder or .npy array) or of
the run's TFRecords under --data_dir. The parity gate embeds the next
--held_out TFRecords (held out from the representative set) and the
verification pairs (--pairs, or the run's data.pairs under --data_dir when it
exists) with the exported and the Keras model. A model below --min_cosine
(mean cosine; default 0.999 fp32 / fp16, 0.98 dynamic / int8 / int8_full) or
losing more than --max_accuracy_drop points of verification accuracy is kept
as `model.failed.tflite` with `"passed": false` in export.json, and the
command exits with status 1 and a one-line reason.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from absl import app, flags

from sparse_embed.cli import user_errors_exit
from sparse_embed.errors import ConfigError

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Directory written by sparse_embed.train.")
_FORMAT = flags.DEFINE_string("format", "tflite", "saved_model | tflite | onnx.")
_QUANTIZE = flags.DEFINE_list("quantize", ["fp32"],
                              "fp32 | fp16 | dynamic | int8 | int8_full, or several, comma-separated "
                              "(tflite; saved_model and onnx are fp32).")
_REPRESENTATIVE = flags.DEFINE_string(
    "representative", None,
    "Calibration images of int8 / int8_full: TFRecord glob, image folder or .npy float32 "
    "[N, H, W, 3] in [-1, 1]; default: the run's TFRecords under --data_dir.")
_REPRESENTATIVE_COUNT = flags.DEFINE_integer("representative_count", 200,
                                             "Images of the representative set.")
_DATA_DIR = flags.DEFINE_string("data_dir", None,
                                "The run's data dir: its TFRecords (representative set, held-out "
                                "images) and data.pairs.")
_PAIRS = flags.DEFINE_string("pairs", None, "Verification pairs of the parity gate.")
_PAIRS_IMAGES = flags.DEFINE_string("pairs_images", None, "Image root --pairs refers to.")
_HELD_OUT = flags.DEFINE_integer("held_out", 200,
                                 "TFRecords after the representative set that the parity gate embeds.")
_FLIP_CONCAT = flags.DEFINE_bool("flip_concat", False,
                                 "Bake the MLPerf flip-concat into the graph: [B, 2d] output.")
_OUTPUT = flags.DEFINE_string("output", None, "Parent of the export folders; default <model_dir>/export.")
_MIN_COSINE = flags.DEFINE_float("min_cosine", None,
                                 "Lowest mean cosine to the Keras model; default 0.999 for fp32 / "
                                 "fp16, 0.98 for dynamic / int8 / int8_full.")
_MAX_ACCURACY_DROP = flags.DEFINE_float("max_accuracy_drop", 0.5,
                                        "Largest verification accuracy drop, in percentage points.")


@user_errors_exit
def main(argv: list[str]) -> None:
    """Checks the inputs, exports each mode, prints the summary and the gate's verdict."""
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _MODEL_DIR.value:
        raise ConfigError("--model_dir is required")
    if _REPRESENTATIVE_COUNT.value < 1 or _HELD_OUT.value < 0:
        raise ConfigError("--representative_count must be >= 1 and --held_out >= 0")
    if _PAIRS.value and not _PAIRS_IMAGES.value:
        raise ConfigError("--pairs needs --pairs_images (the image root it refers to)")
    from sparse_embed.config import config_from_model_dir
    from sparse_embed.data.checks import train_inputs
    from sparse_embed.data.verification import read_pairs

    config = config_from_model_dir(_MODEL_DIR.value)
    records = train_inputs(config, _DATA_DIR.value)[0] if _DATA_DIR.value else None
    pairs = None
    if _PAIRS.value:
        pairs = read_pairs(_PAIRS.value, _PAIRS_IMAGES.value)
    elif _DATA_DIR.value and (Path(_DATA_DIR.value) / config.data.pairs).is_file():
        pairs = read_pairs(Path(_DATA_DIR.value) / config.data.pairs,
                           Path(_DATA_DIR.value) / config.data.pairs_images)
    if records is None and pairs is None:
        raise ConfigError("the parity gate needs images: pass --data_dir (the run's data) or --pairs")
    # TensorFlow is imported only once the inputs are known to be usable.
    from sparse_embed.compression import tflite
    from sparse_embed.inference import load_backbone

    for quantize in _QUANTIZE.value:
        tflite.check_format(_FORMAT.value, quantize)
    if _REPRESENTATIVE.value and not any(tflite.QUANTIZATIONS.get(q).representative
                                         for q in _QUANTIZE.value):
        raise ConfigError("--representative calibrates --quantize=int8 / int8_full only")
    representative = None
    source = _REPRESENTATIVE.value or records
    needs = any(tflite.QUANTIZATIONS.get(q).representative for q in _QUANTIZE.value)
    # A quantization-aware run needs none (its fake-quant ranges are the scales) but
    # still gets one where there is data: it calibrates any tensor without a range.
    if needs and source:
        print(f"representative set: {_REPRESENTATIVE_COUNT.value} images of {source}", flush=True)
        representative = tflite.load_images(source, _REPRESENTATIVE_COUNT.value,
                                            config.model.input_shape)
    backbone, config = load_backbone(_MODEL_DIR.value)
    # Held-out images come after the representative ones when both are the run's records.
    start = len(representative) if representative is not None and source == records else 0
    held_out = np.zeros((0, *config.model.input_shape, 3), np.float32)
    if records and _HELD_OUT.value:
        held_out = tflite.load_images(records, _HELD_OUT.value, config.model.input_shape, start)
    data = tflite.ParityData(held_out, pairs)
    output = Path(_OUTPUT.value or Path(_MODEL_DIR.value) / "export")
    provenance = {"model_dir": str(_MODEL_DIR.value), "representative": source if needs else None,
                  "held_out_from": records, "pairs": _PAIRS.value or (
                      str(Path(_DATA_DIR.value) / config.data.pairs) if pairs is not None else None)}
    results = tflite.export(backbone, config, _FORMAT.value, _QUANTIZE.value, output, data,
                            representative, _FLIP_CONCAT.value, _MIN_COSINE.value,
                            _MAX_ACCURACY_DROP.value, provenance,
                            progress=lambda line: print(line, flush=True))
    print(tflite.format_summary(results))
    for result in results:
        print(f"  {result.model_path}")
    failed = [r for r in results if not r.passed]
    if failed:
        first = failed[0]
        print(f"sparse_embed.export: parity gate failed for {len(failed)} of {len(results)} model(s), "
              f"first {first.record['format']} {first.record['quantize']}: {first.record['reason']} "
              f"(kept as {first.model_path}, export.json passed=false)", file=sys.stderr)
        sys.exit(1)


def run() -> None:
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
