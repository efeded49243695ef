"""Export a trained model for deployment (TFLite, SavedModel, ONNX), gated by parity with Keras.

    python -m sparse_embed.export --model_dir=runs/sparse_mfn --format=tflite --quantize=fp32,int8_full
    python -m sparse_embed.export --model_dir=runs/sparse_mfn --data_dir=data/synth \\
        --format=tflite --quantize=int8 --representative='data/calib/*.tfrecord' \\
        --representative_count=500 --flip_concat
    python -m sparse_embed.export --model_dir=runs/sparse_mfn --format=onnx \\
        --pairs=data/lfw/pairs.txt --pairs_images=data/lfw/images

Each (format, quantize) goes to its own folder, `<output>/<format>_<quantize>`
(`_flip` appended with --flip_concat; --output defaults to <model_dir>/export):
`model.tflite` / `saved_model/` / `model.onnx` next to `export.json` (size,
input / output spec with int8 quantization parameters, parity figures, the
gate's verdict). The model takes float32 NHWC RGB in [-1, 1] at the run's
input size (`int8_full`: int8, quantized with the input's scale and
zero_point) and outputs the embedding, not L2-normalised (with --flip_concat
`concat(e(x), e(flip(x)))`). A probabilistic run's model has a second output,
`confidence` (float32 [N], the smaller of both views' with --flip_concat),
and its embedding is the distribution's mean; the gate compares both outputs.
Its confidence is a logarithm with no int8 kernel: such a run exports with
--quantize=fp32, fp16 or dynamic, and int8 / int8_full are refused.

The representative set (int8, int8_full) is the first --representative_count
images of --representative (TFRecord glob, image folder or .npy array) or of
the run's TFRecords under --data_dir (default: the data directory the run
was trained on, recorded in its run.json). The parity gate embeds the next
--held_out TFRecords (held out from the representative set) and the
verification pairs (--pairs, or the run's data.pairs under --data_dir when it
exists) with the exported and the Keras model. A model below --min_cosine
(mean cosine; default 0.999 fp32 / fp16, 0.98 dynamic / int8 / int8_full) or
losing more than --max_accuracy_drop points of verification accuracy is kept
as `model.failed.tflite` with `"passed": false` in export.json, and the
command exits with status 1 and a one-line reason.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sparse_embed.cli import comma_list, make_parser, program, user_errors_exit
from sparse_embed.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sparse_embed.export`."""
    parser = make_parser(__doc__, program(__name__))
    parser.add_argument("--model_dir", required=True, help="Directory written by sparse_embed.train.")
    parser.add_argument("--format", default="tflite",
                        help="saved_model | tflite | onnx (default: %(default)s).")
    parser.add_argument("--quantize", type=comma_list, default=["fp32"],
                        help="fp32 | fp16 | dynamic | int8 | int8_full, or several, comma-separated "
                             "(tflite; saved_model and onnx are fp32; default: fp32).")
    parser.add_argument("--representative",
                        help="Calibration images of int8 / int8_full: TFRecord glob, image folder or "
                             ".npy float32 [N, H, W, 3] in [-1, 1]; default: the run's TFRecords under "
                             "--data_dir.")
    parser.add_argument("--representative_count", type=int, default=200,
                        help="Images of the representative set (default: %(default)s).")
    parser.add_argument("--data_dir",
                        help="The run's data dir: its TFRecords (representative set, held-out images) and "
                             "data.pairs; default: the one the run was trained on (<model_dir>/run.json).")
    parser.add_argument("--pairs", help="Verification pairs of the parity gate.")
    parser.add_argument("--pairs_images", help="Image root --pairs refers to.")
    parser.add_argument("--held_out", type=int, default=200,
                        help="TFRecords after the representative set that the parity gate embeds "
                             "(default: %(default)s).")
    parser.add_argument("--flip_concat", action="store_true",
                        help="Bake the MLPerf flip-concat into the graph: [B, 2d] output.")
    parser.add_argument("--output", help="Parent of the export folders; default <model_dir>/export.")
    parser.add_argument("--min_cosine", type=float,
                        help="Lowest mean cosine to the Keras model; default 0.999 for fp32 / fp16, 0.98 "
                             "for dynamic / int8 / int8_full.")
    parser.add_argument("--max_accuracy_drop", type=float, default=0.5,
                        help="Largest verification accuracy drop, in percentage points "
                             "(default: %(default)s).")
    return parser


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """Checks the inputs, exports each mode, prints the summary and the gate's verdict.

    Args:
        argv: Arguments after the program name; None reads sys.argv.
    """
    args = build_parser().parse_args(argv)
    if args.representative_count < 1 or args.held_out < 0:
        raise ConfigError("--representative_count must be >= 1 and --held_out >= 0")
    if args.pairs and not args.pairs_images:
        raise ConfigError("--pairs needs --pairs_images (the image root it refers to)")
    from sparse_embed.config import config_from_model_dir
    from sparse_embed.data.checks import train_inputs
    from sparse_embed.data.verification import read_pairs
    from sparse_embed.run_record import default_data_dir

    config = config_from_model_dir(args.model_dir)
    # Without --pairs the run's data is the only source of images for the gate.
    data_dir = default_data_dir(args.model_dir, args.data_dir, required=not args.pairs)
    records = train_inputs(config, data_dir)[0] if data_dir else None
    pairs = None
    if args.pairs:
        pairs = read_pairs(args.pairs, args.pairs_images)
    elif data_dir and (Path(data_dir) / config.data.pairs).is_file():
        pairs = read_pairs(Path(data_dir) / config.data.pairs, Path(data_dir) / config.data.pairs_images)
    if records is None and pairs is None:
        raise ConfigError("the parity gate needs images: pass --data_dir (the run's data) or --pairs")
    # TensorFlow is imported only once the inputs are known to be usable.
    from sparse_embed.compression import converter, exporter, formats, images, parity
    from sparse_embed.inference import load_backbone

    for quantize in args.quantize:
        formats.check_format(args.format, quantize)
    exporter.check_confidence_modes(config, args.quantize)
    if args.representative and not any(converter.QUANTIZATIONS.get(q).representative
                                       for q in args.quantize):
        raise ConfigError("--representative calibrates --quantize=int8 / int8_full only")
    representative = None
    source = args.representative or records
    needs = any(converter.QUANTIZATIONS.get(q).representative for q in args.quantize)
    # A quantization-aware run needs none (its fake-quant ranges are the scales) but
    # still gets one where there is data: it calibrates any tensor without a range.
    if needs and source:
        print(f"representative set: {args.representative_count} images of {source}", flush=True)
        representative = images.load_images(source, args.representative_count,
                                            config.model.input_shape)
    backbone, config = load_backbone(args.model_dir)
    # Held-out images come after the representative ones when both are the run's records.
    start = len(representative) if representative is not None and source == records else 0
    held_out = np.zeros((0, *config.model.input_shape, 3), np.float32)
    if records and args.held_out:
        held_out = images.load_images(records, args.held_out, config.model.input_shape, start)
    data = parity.ParityData(held_out, pairs)
    output = Path(args.output or Path(args.model_dir) / "export")
    provenance = {"model_dir": str(args.model_dir), "representative": source if needs else None,
                  "held_out_from": records, "pairs": args.pairs or (
                      str(Path(data_dir) / config.data.pairs) if pairs is not None else None)}
    results = exporter.export(backbone, config, args.format, args.quantize, output, data,
                              representative, args.flip_concat, args.min_cosine,
                              args.max_accuracy_drop, provenance,
                              progress=lambda line: print(line, flush=True))
    print(exporter.format_summary(results))
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
    main()


if __name__ == "__main__":
    run()
