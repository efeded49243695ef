"""Print the parameter count and multiply-accumulates of registered models.

    python -m sparse_embed.models mobilefacenet
    python -m sparse_embed.models mobilefacenet --embedding_size=1024 --json
    python -m sparse_embed.models --all

Unset flags keep the builder's defaults (a tiny variant's small input, say).
`--all` prints one row per full-size model (tiny variants skipped), adding
its one-thread CPU latency per image at batch 1: the median of `--runs`
inferences after two warm-up runs, with TensorFlow's intra- and inter-op
thread pools set to one thread.
"""

from __future__ import annotations

import json

from absl import app, flags

from sparse_embed.cli import user_errors_exit
from sparse_embed.keras import keras, tf
from sparse_embed.models import MODELS
from sparse_embed.models.embedding import ACTIVATIONS
from sparse_embed.models.profile import count_macs, count_params, format_count, measure_latency

_EMBEDDING_SIZE = flags.DEFINE_integer("embedding_size", None, "Embedding dimension d.")
_FINAL_ACTIVATION = flags.DEFINE_string("final_activation", None,
                                        f"Final activation: {' | '.join(ACTIVATIONS.names())}.")
_INPUT_SIZE = flags.DEFINE_integer("input_size", None, "Input height (and width, unless --input_width).")
_INPUT_WIDTH = flags.DEFINE_integer("input_width", None, "Input width; 0 means square.")
_WIDTH = flags.DEFINE_float("width", None, "Channel width multiplier.")
_SE = flags.DEFINE_boolean("se", None, "Squeeze-and-excitation blocks (backbones that have them).")
_JSON = flags.DEFINE_boolean("json", False, "Print JSON (one object per model) instead of a table.")
_ALL = flags.DEFINE_boolean("all", False, "Every full-size registered model, with its CPU latency.")
_RUNS = flags.DEFINE_integer("runs", 10, "With --all: timed inferences per model (the median is shown).",
                             lower_bound=1)


def _overrides() -> dict:
    overrides = {
        "embedding_size": _EMBEDDING_SIZE.value,
        "final_activation": _FINAL_ACTIVATION.value,
        "input_size": _INPUT_SIZE.value,
        "input_width": _INPUT_WIDTH.value,
        "width": _WIDTH.value,
        "se": _SE.value,
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


def _print_all(runs: int, as_json: bool) -> None:
    # Must precede TensorFlow's first op, which creates the thread pools.
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    names = [name for name in MODELS.names() if not name.endswith("_tiny")]
    if not as_json:
        print(f"{'model':<16}{'input':>9}{'d':>6}{'params':>14}{'MACs':>17}{'ms/image':>10}")
    for name in names:
        model = MODELS.get(name)(**_overrides())
        row = _row(name, model)
        row["latency_ms"] = round(1e3 * measure_latency(model, runs=runs), 2)
        if as_json:
            print(json.dumps(row), flush=True)
        else:
            shape = f"{row['input_size']}x{row['input_width']}"
            print(f"{name:<16}{shape:>9}{row['embedding_size']:>6}{row['params']:>14,}"
                  f"{row['macs']:>17,}{row['latency_ms']:>10.2f}", flush=True)
        del model
        keras.backend.clear_session()


@user_errors_exit
def main(argv: list[str]) -> None:
    """Builds the named model (or every full-size one) and prints its size and cost."""
    if _ALL.value:
        if len(argv) != 1:
            raise app.UsageError(f"--all takes no model name, got {' '.join(argv[1:])}")
        _print_all(_RUNS.value, _JSON.value)
        return
    if len(argv) != 2:
        raise app.UsageError(f"expected one model name ({', '.join(MODELS.names())}) or --all, "
                             f"got {len(argv) - 1} arguments")
    name = argv[1]
    model = MODELS.get(name)(**_overrides())
    row = _row(name, model)
    if _JSON.value:
        print(json.dumps(row))
        return
    _print_one(row)


if __name__ == "__main__":
    app.run(main)
