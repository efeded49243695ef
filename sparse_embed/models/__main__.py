"""Print the parameter count and multiply-accumulates of a registered model.

    python -m sparse_embed.models mobilefacenet
    python -m sparse_embed.models mobilefacenet --embedding_size=1024 --json

Unset flags keep the builder's defaults (a tiny variant's small input, say).
"""

from __future__ import annotations

import json

from absl import app, flags

from sparse_embed.cli import user_errors_exit
from sparse_embed.models import MODELS
from sparse_embed.models.embedding import ACTIVATIONS
from sparse_embed.models.profile import count_macs, count_params, format_count

_EMBEDDING_SIZE = flags.DEFINE_integer("embedding_size", None, "Embedding dimension d.")
_FINAL_ACTIVATION = flags.DEFINE_string("final_activation", None,
                                        f"Final activation: {' | '.join(ACTIVATIONS.names())}.")
_INPUT_SIZE = flags.DEFINE_integer("input_size", None, "Square input resolution.")
_WIDTH = flags.DEFINE_float("width", None, "Channel width multiplier.")
_JSON = flags.DEFINE_boolean("json", False, "Print one JSON object instead of a table.")


@user_errors_exit
def main(argv: list[str]) -> None:
    """Builds the named model and prints its size and cost."""
    if len(argv) != 2:
        raise app.UsageError(f"expected one model name ({', '.join(MODELS.names())}), "
                             f"got {len(argv) - 1} arguments")
    name = argv[1]
    builder = MODELS.get(name)
    overrides = {
        "embedding_size": _EMBEDDING_SIZE.value,
        "final_activation": _FINAL_ACTIVATION.value,
        "input_size": _INPUT_SIZE.value,
        "width": _WIDTH.value,
    }
    model = builder(**{k: v for k, v in overrides.items() if v is not None})
    row = {
        "model": name,
        "params": count_params(model),
        "macs": count_macs(model),
        "embedding_size": int(model.output_shape[-1]),
        "input_size": int(model.input_shape[1]),
    }
    if _JSON.value:
        print(json.dumps(row))
        return
    print(f"{'model':<16}{name}")
    print(f"{'input':<16}{row['input_size']}x{row['input_size']}x3")
    print(f"{'embedding size':<16}{row['embedding_size']}")
    print(f"{'parameters':<16}{row['params']:>14,}  ({format_count(row['params'])})")
    print(f"{'MACs':<16}{row['macs']:>14,}  ({format_count(row['macs'])})")


if __name__ == "__main__":
    app.run(main)
