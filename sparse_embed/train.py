"""Train an embedding model.

    python -m sparse_embed.train --config=face/sparse_mobilefacenet_flops \\
        --data_dir=/data/ms1m --model_dir=runs/sparse_mfn --set sparsity.weight=100
    horovodrun -np 8 python -m sparse_embed.train --config=... (one process per GPU)

Re-running the same command after an interruption resumes from the latest
checkpoint in --model_dir, with the same or a different number of processes.

    python -m sparse_embed.train --config=smoke --data_dir=data/synth \\
        --model_dir=runs/smoke_qat --init_from=runs/smoke --set compression.type=qat

starts from a trained run's weights (a new optimizer, step 0) and compresses it.
The second stage of a probabilistic method (PFE, DUL-reg, SCF) starts the same
way from a deterministic run:

    python -m sparse_embed.train --config=synthetic/pe_pfe --data_dir=runs/demo/data \\
        --model_dir=runs/pe/pfe --init_from=runs/pe/arcface
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sparse_embed.cli import make_parser, program, user_errors_exit
from sparse_embed.launch import process_rank


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sparse_embed.train`."""
    parser = make_parser(__doc__, program(__name__))
    parser.add_argument("--config", default="smoke", help="Packaged config name or YAML path "
                        "(default: %(default)s).")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Override, key.path=value (repeatable).")
    parser.add_argument("--data_dir", required=True,
                        help="Directory the config's data paths are relative to.")
    parser.add_argument("--model_dir", required=True,
                        help="Output directory (checkpoints, logs, config).")
    parser.add_argument("--init_from", default=None,
                        help="A trained run's model_dir to start from (sets train.init_from), e.g. "
                             "to compress it with --set compression.type=qat, or the deterministic "
                             "run a two-stage probabilistic method (pfe, dul_reg, scf) trains on.")
    return parser


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """Loads the config, trains, prints a summary.

    Args:
        argv: Arguments after the program name; None reads sys.argv.
    """
    args = build_parser().parse_args(argv)
    from sparse_embed.config import load_config
    from sparse_embed.data.checks import train_inputs

    overrides = list(args.set)
    if args.init_from:
        overrides.append(f"train.init_from={args.init_from}")
    config = load_config(args.config, overrides)
    train_inputs(config, args.data_dir)
    # TensorFlow is imported only once the inputs are known to be usable.
    from sparse_embed.training.trainer import train

    # A progress bar on a terminal; in a log file or under horovodrun (whose
    # output is a pipe), one line every train.log_every steps.
    result = train(config, args.data_dir, args.model_dir,
                   verbose=1 if sys.stdout.isatty() else 2)
    if process_rank() != 0:
        return
    print(f"\nstep {result.step} (resumed from {result.resumed_from}), {result.samples} examples, "
          f"{result.num_workers} worker(s), model_dir {args.model_dir}")
    if result.images_per_second:
        print(f"  {'images/s':<16} {result.images_per_second:.4g}")
    for name, value in result.metrics.items():
        print(f"  {name:<16} {value:.4g}")


def run() -> None:
    """Console-script entry point."""
    main()


if __name__ == "__main__":
    run()
