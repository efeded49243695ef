"""Print the parameter count and multiply-accumulates of registered models.

    python -m sparse_embed.models mobilefacenet
    python -m sparse_embed.models mobilefacenet --embedding_size=1024 --json
    python -m sparse_embed.models --all --output=results/models.json
    python -m sparse_embed.models landnet

A landmark network (`LANDMARK_MODELS`, e.g. landnet) takes --input_size only;
its "embedding size" is its number of outputs (ten: five (x, y) points).

Unset flags keep the builder's defaults (a tiny variant's small input, say).
`--all` prints one row per full-size model (tiny variants skipped), adding
its one-thread CPU latency per image at batch 1: the median of `--repeats`
inferences after two warm-up runs, with TensorFlow's intra- and inter-op
thread pools set to one thread. `--output` also writes the table as a
result file (`sparse_embed.results`), with the command, commit and machine,
which the documentation's models table is rendered from.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from sparse_embed.cli import deprecated_alias, make_parser, program, user_errors_exit
from sparse_embed.errors import ConfigError
from sparse_embed.keras import keras, tf
from sparse_embed.models import LANDMARK_MODELS, MODELS
from sparse_embed.models.embedding import ACTIVATIONS
from sparse_embed.models.profile import count_macs, count_params, format_count, measure_latency
from sparse_embed.results import Column, write_result

# The result table of `--all --output`.
COLUMNS = (Column("model", "model"), Column("input", "input"), Column("embedding_size", "d"),
           Column("params", "parameters", ","), Column("macs", "MACs", ","),
           Column("latency_ms", "ms/image", ".1f"))


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sparse_embed.models`."""
    parser = make_parser(__doc__, program("sparse_embed.models"))
    parser.add_argument("model", nargs="?", help="A registered model name (none with --all).")
    parser.add_argument("--embedding_size", type=int, help="Embedding dimension d.")
    parser.add_argument("--final_activation", help=f"Final activation: {' | '.join(ACTIVATIONS.names())}.")
    parser.add_argument("--input_size", type=int, help="Input height (and width, unless --input_width).")
    parser.add_argument("--input_width", type=int, help="Input width; 0 means square.")
    parser.add_argument("--width", type=float, help="Channel width multiplier.")
    parser.add_argument("--se", action="store_true", default=None,
                        help="Squeeze-and-excitation blocks (backbones that have them).")
    parser.add_argument("--no_se", dest="se", action="store_false",
                        help="No squeeze-and-excitation blocks.")
    deprecated_alias(parser, "--nose", "--no_se")
    parser.add_argument("--json", action="store_true",
                        help="Print JSON (one object per model) instead of a table.")
    parser.add_argument("--all", action="store_true",
                        help="Every full-size registered model, with its CPU latency.")
    parser.add_argument("--repeats", type=int, default=10,
                        help="With --all: timed inferences per model, the median is shown "
                             "(default: %(default)s).")
    deprecated_alias(parser, "--runs", "--repeats")
    parser.add_argument("--output", help="With --all: also write the table as a result file "
                                         "(JSON, e.g. results/models.json).")
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    overrides = {
        "embedding_size": args.embedding_size,
        "final_activation": args.final_activation,
        "input_size": args.input_size,
        "input_width": args.input_width,
        "width": args.width,
        "se": args.se,
    }
    return {k: v for k, v in overrides.items() if v is not None}


def _row(name: str, model: keras.Model) -> dict:
    return {
        "model": name,
        "params": count_params(model),
        "macs": count_macs(model),
        "embedding_size": int(model.output_shape[-1]),
        "input_size": int(model.input_shape[1]),
        "input_width": int(model.input_shape[2]),
    }


def _print_one(row: dict) -> None:
    print(f"{'model':<16}{row['model']}")
    print(f"{'input':<16}{row['input_size']}x{row['input_width']}x3")
    print(f"{'embedding size':<16}{row['embedding_size']}")
    print(f"{'parameters':<16}{row['params']:>14,}  ({format_count(row['params'])})")
    print(f"{'MACs':<16}{row['macs']:>14,}  ({format_count(row['macs'])})")


def _print_all(args: argparse.Namespace) -> list[dict]:
    # Must precede TensorFlow's first op, which creates the thread pools.
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    names = [name for name in MODELS.names() if not name.endswith("_tiny")]
    rows = []
    if not args.json:
        print(f"{'model':<16}{'input':>9}{'d':>6}{'params':>14}{'MACs':>17}{'ms/image':>10}")
    for name in names:
        model = MODELS.get(name)(**_overrides(args))
        row = _row(name, model)
        row["latency_ms"] = round(1e3 * measure_latency(model, runs=args.repeats), 2)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            shape = f"{row['input_size']}x{row['input_width']}"
            print(f"{name:<16}{shape:>9}{row['embedding_size']:>6}{row['params']:>14,}"
                  f"{row['macs']:>17,}{row['latency_ms']:>10.2f}", flush=True)
        rows.append(row)
        del model
        keras.backend.clear_session()
    return rows


def _build_one(args: argparse.Namespace) -> keras.Model:
    if args.model not in LANDMARK_MODELS:
        return MODELS.get(args.model)(**_overrides(args))
    extra = sorted(set(_overrides(args)) - {"input_size"})
    if extra:
        raise ConfigError(f"{args.model} is a landmark network: it takes --input_size only, "
                          f"got --{', --'.join(extra)}")
    return LANDMARK_MODELS.get(args.model)(**_overrides(args))


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """Builds the named model (or every full-size one) and prints its size and cost.

    Args:
        argv: Arguments after the program name; None reads sys.argv.
    """
    args = build_parser().parse_args(argv)
    if args.all:
        if args.model:
            raise ConfigError(f"--all takes no model name, got {args.model}")
        if args.repeats < 1:
            raise ConfigError(f"--repeats must be >= 1, got {args.repeats}")
        rows = _print_all(args)
        if args.output:
            for row in rows:
                row["input"] = f"{row['input_size']}x{row['input_width']}"
            write_result(args.output, "Size, cost and one-thread CPU latency of every full-size model",
                         {"models": (COLUMNS, rows)},
                         notes=f"Parameters as trained (BN statistics excluded); multiply-accumulates "
                               f"of one forward pass; latency: median of {args.repeats} Keras "
                               f"inferences of one image, one CPU thread.")
            print(f"wrote {args.output}")
        return
    if args.output:
        raise ConfigError("--output needs --all")
    if not args.model:
        raise ConfigError(f"expected one model name ({', '.join(MODELS.names())}) or --all")
    model = _build_one(args)
    row = _row(args.model, model)
    if args.json:
        print(json.dumps(row))
        return
    _print_one(row)


def run() -> None:
    """Console-script entry point."""
    main()


if __name__ == "__main__":
    run()
