"""Train an embedding model.

    python -m sparse_embed.train --config=face/sparse_mobilefacenet_flops \
        --data_dir=/data/ms1m --model_dir=runs/sparse_mfn --set sparsity.weight=100
    horovodrun -np 8 python -m sparse_embed.train --config=... (one process per GPU)

Re-running the same command after an interruption resumes from the latest
checkpoint in --model_dir, with the same or a different number of processes.

    python -m sparse_embed.train --config=smoke --data_dir=data/synth \
        --model_dir=runs/smoke_qat --init_from=runs/smoke --set compression.type=qat

starts from a trained run's weights (a new optimizer, step 0) and compresses it.
"""

from __future__ import annotations

import sys

from absl import app, flags

from sparse_embed.cli import user_errors_exit
from sparse_embed.errors import ConfigError
from sparse_embed.training.launch import process_rank

_CONFIG = flags.DEFINE_string("config", "smoke", "Packaged config name or YAML path.")
_SET = flags.DEFINE_multi_string("set", [], "Override, key.path=value (repeatable).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Directory the config's data paths are relative to.")
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Output directory (checkpoints, logs, config).")
_INIT_FROM = flags.DEFINE_string(
    "init_from", None, "A trained run's model_dir to start from (sets train.init_from), e.g. "
    "to compress it with --set compression.type=qat.")


@user_errors_exit
def main(argv: list[str]) -> None:
    """Loads the config, trains, prints a summary."""
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _DATA_DIR.value or not _MODEL_DIR.value:
        raise ConfigError("--data_dir and --model_dir are required")
    from sparse_embed.config import load_config
    from sparse_embed.data.checks import train_inputs

    overrides = list(_SET.value)
    if _INIT_FROM.value:
        overrides.append(f"train.init_from={_INIT_FROM.value}")
    config = load_config(_CONFIG.value, overrides)
    train_inputs(config, _DATA_DIR.value)
    # TensorFlow is imported only once the inputs are known to be usable.
    from sparse_embed.training.trainer import train

    # A progress bar on a terminal; in a log file or under horovodrun (whose
    # output is a pipe), one line every train.log_every steps.
    result = train(config, _DATA_DIR.value, _MODEL_DIR.value,
                   verbose=1 if sys.stdout.isatty() else 2)
    if process_rank() != 0:
        return
    print(f"\nstep {result.step} (resumed from {result.resumed_from}), {result.samples} examples, "
          f"{result.num_workers} worker(s), model_dir {_MODEL_DIR.value}")
    if result.images_per_second:
        print(f"  {'images/s':<16} {result.images_per_second:.4g}")
    for name, value in result.metrics.items():
        print(f"  {name:<16} {value:.4g}")


def run() -> None:
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
