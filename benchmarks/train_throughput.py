"""Training throughput: the input pipeline alone, 1 process, 2 Horovod processes; one table.

    python benchmarks/train_throughput.py [--steps=12] [--models=mobilefacenet,demo] [--json]
        [--batch_size=N] [--output=results/train_throughput.json]

Generates a small synthetic identity dataset (112x112 JPEG TFRecords), then for
each model measures images/s of

- the input pipeline alone (read, decode, augment, batch; no model);
- the real training step in 1 process (`python -m sparse_embed.train`);
- the same under `horovodrun -np 2` with the same per-process batch
  (`distributed.scale_lr=true`: weak scaling, as one scales out to more GPUs);
- with a GPU, the 1-process step under `train.mixed_precision=true`.

Training figures are what `sparse_embed.train` reports: examples per second of
all processes together after the first (traced) step. The last column is the
ratio to the 1-process row of the same model. On a 2-core CPU two processes
share the cores, so the 2-process row shows the overhead of Horovod, not a speed-up.
--output writes the table as a result file (`sparse_embed.results`).
The 2-process rows launch `$HOROVODRUN` if it is set (as the run_scripts do),
else the `horovodrun` next to this Python.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparse_embed.cli import make_parser  # noqa: E402
from sparse_embed.results import Column, write_result  # noqa: E402

# name -> (packaged config, overrides, per-process batch)
MODELS = {
    "mobilefacenet": ("face/dense_mobilefacenet", ["model.input_size=112"], 32),
    "demo": ("synthetic/dense", [], 128),
}
COLUMNS = (Column("model", "model"), Column("setup", "setup"), Column("processes", "processes"),
           Column("batch_per_process", "batch per process"), Column("images_per_s", "images/s", ".1f"),
           Column("vs_1_process", "vs 1 process", ".2f"))
_RATE = re.compile(r"images/s\s+([0-9.eE+-]+)")


def make_data(root: Path) -> Path:
    """64 identities x 8 synthetic 112x112 faces, as 4 TFRecord shards."""
    from sparse_embed.data.synthetic import generate
    from sparse_embed.data.tfrecord import build_tfrecords

    generate(root, 64, 8, 2, seed=0, image_size=112, workers=2, pairs_folds=1, pairs_per_fold=2)
    build_tfrecords(root / "train", root / "tfrecords", name="train", num_shards=4,
                    num_workers=2, seed=0)
    return root


def pipeline_rate(data: Path, config_name: str, overrides: list[str], batch: int,
                  steps: int) -> float:
    """Images/s of the training input pipeline alone."""
    from sparse_embed.config import load_config
    from sparse_embed.data.pipeline import train_dataset

    config = load_config(config_name, overrides)
    dataset = train_dataset(str(data / config.data.train_files), batch, config.model.input_size,
                            augment=config.data.augment, shuffle_buffer=config.data.shuffle_buffer)
    iterator = iter(dataset)
    next(iterator)
    start = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    return steps * batch / (time.perf_counter() - start)


def train_rate(data: Path, model_dir: Path, config_name: str, overrides: list[str],
               processes: int, steps: int) -> float:
    """Images/s that `sparse_embed.train` reports, in 1 process or under horovodrun."""
    command = [sys.executable, "-m", "sparse_embed.train", f"--config={config_name}",
               f"--data_dir={data}", f"--model_dir={model_dir}"]
    for item in [*overrides, f"train.steps={steps}", f"train.checkpoint_every={steps}",
                 f"train.log_every={steps}"]:
        command += ["--set", item]
    if processes > 1:
        launcher = os.environ.get("HOROVODRUN") or Path(sys.executable).with_name("horovodrun")
        command = [str(launcher), "-np", str(processes), "-H", f"localhost:{processes}",
                   "--gloo", *command]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    match = _RATE.search(proc.stdout)
    if proc.returncode != 0 or not match:
        raise SystemExit(f"training failed ({' '.join(command[:6])} ...):\n{proc.stderr[-2000:]}")
    return float(match.group(1))


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python benchmarks/train_throughput.py`."""
    parser = make_parser(__doc__, "python benchmarks/train_throughput.py")
    parser.add_argument("--steps", type=int, default=12, help="Training steps per measurement.")
    parser.add_argument("--models", default="mobilefacenet,demo",
                        help=f"Comma-separated, from {', '.join(MODELS)}.")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="Per-process batch for every model (default: each model's own, "
                             f"{', '.join(f'{k} {v[2]}' for k, v in MODELS.items())}).")
    parser.add_argument("--json", action="store_true", help="Also print one JSON line per row.")
    parser.add_argument("--output", default=None,
                        help="Also write the table to this result file (sparse_embed.results).")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the benchmark and prints its table.

    Args:
        argv: Arguments after the script name; None reads sys.argv.
    """
    args = build_parser().parse_args(argv)

    from sparse_embed.keras import tf

    gpu = bool(tf.config.list_physical_devices("GPU"))
    work = Path(tempfile.mkdtemp(prefix="train_throughput_"))
    rows = []
    try:
        data = make_data(work / "data")
        for name in args.models.split(","):
            config_name, overrides, batch = MODELS[name]
            batch = args.batch_size or batch
            overrides = [*overrides, f"train.batch_size={batch}", "distributed.scale_lr=true"]
            setups = [("input pipeline", None, 1), ("train step", [], 1),
                      ("train step, horovod", [], 2)]
            if gpu:
                setups.append(("train step, mixed fp16", ["train.mixed_precision=true"], 1))
            measured = []
            for label, extra, processes in setups:
                print(f"{name}: {label} x{processes} ...", file=sys.stderr, flush=True)
                if extra is None:
                    rate = pipeline_rate(data, config_name, overrides, batch, args.steps * 2)
                else:
                    run_dir = work / f"{name}-{len(measured)}"
                    rate = train_rate(data, run_dir, config_name, [*overrides, *extra],
                                      processes, args.steps)
                measured.append({"model": name, "setup": label, "processes": processes,
                                 "batch_per_process": batch, "images_per_s": rate})
            single = measured[1]["images_per_s"]
            rows += [{**row, "vs_1_process": row["images_per_s"] / single} for row in measured]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    device = "GPU" if gpu else "CPU"
    header = (f"{'model':<14} {'setup':<24} {'procs':>5} {'batch/proc':>10} {'images/s':>9}"
              f" {'vs 1 process':>12}")
    print(f"training throughput on {device}, {args.steps} steps per measurement")
    print(header)
    print("-" * len(header))
    for row in rows:
        ratio = f"{row['vs_1_process']:.2f}x"
        print(f"{row['model']:<14} {row['setup']:<24} {row['processes']:>5} "
              f"{row['batch_per_process']:>10} {row['images_per_s']:>9.1f} {ratio:>12}")
    if args.json:
        for row in rows:
            print(json.dumps(row))
    if args.output:
        write_result(args.output, f"Training throughput on {device}", {"throughput": (COLUMNS, rows)},
                     notes=f"{args.steps} training steps per measurement after the first (traced) one, "
                           f"{2 * args.steps} batches for the input pipeline; synthetic 112x112 JPEG "
                           f"TFRecords (64 identities x 8 images)")


if __name__ == "__main__":
    main()
