"""Peak memory of a training step for a huge class count: ArcFace against Partial FC sample rates.

    python benchmarks/partial_fc_memory.py [--classes=400000] [--dim=128] [--batch_size=128] [--steps=5]
        [--sample_rates=1.0,0.5,0.1] [--repeats=3] [--output=results/partial_fc_memory.json]

Each measurement runs in a fresh process: a one-layer backbone on random
112-d inputs, the head, SGD with momentum, `--steps` training steps inside
`tf.function`; the figure is the process's peak resident memory (ru_maxrss)
minus its resident memory once TensorFlow is imported and the head built,
i.e. what the steps themselves add (logits, their gradient, the class-centre
gradient). The allocator makes it vary from one process to the next, so each
row is measured `--repeats` times and shown as the lowest and highest figure
in whole MiB, with the ratio of the medians to ArcFace's.
The class centres and their momentum (2 x classes x dim x 4 bytes) are
allocated before that baseline and are the same in every row; sharding over
N workers divides them by N, which is not measured here (one process).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparse_embed.cli import deprecated_alias, make_parser  # noqa: E402
from sparse_embed.results import Column, write_result  # noqa: E402

# Partial FC's sample rates measured by default, each against ArcFace (the first row).
SAMPLE_RATES = "1.0,0.5,0.1"
COLUMNS = (Column("head", "head"), Column("sample_rate", "sample rate"),
           Column("step_mib_min", "step peak MiB, lowest", ".0f"),
           Column("step_mib_max", "highest", ".0f"),
           Column("vs_arcface", "median vs arcface", ".2f"),
           Column("first_loss", "first loss", ".1f"))


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(head_kind: str, sample_rate: float, classes: int, dim: int, batch: int,
            steps: int) -> dict:
    """One measurement, in this process (called by the child processes)."""
    import numpy as np

    from sparse_embed.heads.margin import ArcFaceHead
    from sparse_embed.heads.partial_fc import ShardedMarginHead
    from sparse_embed.keras import keras, tf
    from sparse_embed.strategy import SingleProcess

    arcface = ArcFaceHead(classes, scale=64.0, margin=0.5)
    head = arcface if head_kind == "arcface" else ShardedMarginHead(
        arcface, SingleProcess(), sample_rate=sample_rate)
    head.build((None, dim))
    backbone = keras.layers.Dense(dim)
    backbone.build((None, 112))
    variables = backbone.trainable_variables + head.trainable_variables
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    optimizer.build(variables)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch, 112)), tf.float32)
    y = tf.constant(rng.integers(0, classes, batch), tf.int32)

    @tf.function
    def step() -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = head.loss_and_accuracy(backbone(x), y, training=True)[0]
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return loss

    baseline = _rss_mib()
    losses = [float(step()) for _ in range(steps)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"head": head_kind, "sample_rate": sample_rate, "classes": classes, "dim": dim,
            "batch": batch, "step_peak_mib": peak - baseline, "first_loss": losses[0],
            "last_loss": losses[-1]}


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python benchmarks/partial_fc_memory.py`."""
    parser = make_parser(__doc__, "python benchmarks/partial_fc_memory.py")
    parser.add_argument("--classes", type=int, default=400_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch_size", dest="batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sample_rates", default=SAMPLE_RATES,
                        help="Partial FC sample rates to measure (comma-separated, each in (0, 1]); "
                             "ArcFace is always the first row.")
    parser.add_argument("--repeats", type=int, default=3,
                        help="Fresh processes per row (the figure varies between processes).")
    parser.add_argument("--output", default=None,
                        help="Also write the table to this result file (sparse_embed.results).")
    parser.add_argument("--child", nargs=2, metavar=("HEAD", "RATE"), help=argparse.SUPPRESS)
    deprecated_alias(parser, "--batch", "--batch_size")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the benchmark and prints its table.

    Args:
        argv: Arguments after the script name; None reads sys.argv.
    """
    args = build_parser().parse_args(argv)
    if args.child:
        row = measure(args.child[0], float(args.child[1]), args.classes, args.dim, args.batch,
                      args.steps)
        print(json.dumps(row))
        return

    if args.repeats < 1:
        build_parser().error("--repeats must be >= 1")
    rows = []
    for head, rate in [("arcface", 1.0)] + [("partial_fc", r) for r in _rates(args.sample_rates)]:
        runs = []
        for repeat in range(args.repeats):
            print(f"{head} sample_rate={rate} ({repeat + 1}/{args.repeats}) ...", file=sys.stderr,
                  flush=True)
            runs.append(_child(head, rate, args))
        peaks = [run["step_peak_mib"] for run in runs]
        rows.append({"head": head, "sample_rate": rate, "step_mib_min": min(peaks),
                     "step_mib_max": max(peaks), "step_mib_median": statistics.median(peaks),
                     "first_loss": runs[0]["first_loss"], "last_loss": runs[0]["last_loss"]})
    for row in rows:
        row["vs_arcface"] = row["step_mib_median"] / rows[0]["step_mib_median"]
    centres = 2 * args.classes * args.dim * 4 / 2**20
    title = (f"{args.classes} classes x {args.dim}-d, batch {args.batch}, {args.steps} steps; "
             f"class centres + momentum: {centres:.0f} MiB in every row")
    print(title)
    header = (f"{'head':<12} {'sample_rate':>11} {'step MiB lowest':>15} {'highest':>8}"
              f" {'first loss':>10} {'vs arcface':>10}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['head']:<12} {row['sample_rate']:>11} {row['step_mib_min']:>15.0f} "
              f"{row['step_mib_max']:>8.0f} {row['first_loss']:>10.1f} {row['vs_arcface']:>9.2f}x")
    if args.output:
        write_result(args.output, f"Partial FC: memory a training step adds, {title}",
                     {"memory": (COLUMNS, rows)},
                     notes=f"CPU, one process; {args.repeats} fresh processes per row, lowest and "
                           f"highest peak; vs arcface compares the medians")


def _rates(text: str) -> list[float]:
    """The sample rates of `--sample_rates`; a value that is not a number in (0, 1] is a usage error."""
    try:
        rates = [float(r) for r in text.split(",")]
    except ValueError:
        rates = []
    if not rates or not all(0.0 < r <= 1.0 for r in rates):
        build_parser().error(f"--sample_rates takes comma-separated numbers in (0, 1], got {text!r}")
    return rates


def _child(head: str, rate: float, args: argparse.Namespace) -> dict:
    """One measurement in a fresh process."""
    proc = subprocess.run(
        [sys.executable, __file__, f"--classes={args.classes}", f"--dim={args.dim}",
         f"--batch_size={args.batch}", f"--steps={args.steps}", "--child", head, str(rate)],
        capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
