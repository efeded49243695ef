"""The compression results table: each demo model against its QAT, pruned, 2:4 and PQAT versions.

    make demo                                     (trains runs/demo/dense and runs/demo/sparse)
    python benchmarks/compression_table.py --demo_dir=runs/demo [--steps=300]
        [--output=results/compression.json]

For each trained demo run (`--runs`, default `dense,sparse`), fine-tunes from
its weights (`train.init_from`, `--steps` steps at `--lr`, cosine decay; PQAT at
a tenth of it) one run per compression recipe, exports every model to TFLite
through the parity gate of `sparse_embed.export`, and times the file in the
LiteRT interpreter (batch 1, XNNPACK, 1 thread). One row per (run, recipe):

    original     the float run, fp32 TFLite
    ptq_int8     the float run, post-training full-integer int8 (calibrated on its own TFRecords)
    qat_int8     8-bit quantization-aware training, int8
    prune_52     magnitude pruning to 52% zeros, polynomial schedule (OpenVINO's MobileFaceNet), fp32
    prune_2of4   2:4 structured pruning, fp32
    pqat_int8    pruning-preserving QAT of prune_52, int8: both its zeros and 8-bit weights
    qat_w6       QAT with 6-bit weights (TF-MOT's n-bit scheme, 8-bit activations), int8 file
    qat_w4       QAT with 4-bit weights, int8 file (TFLite stores them as int8 in [-7, 7])

Accuracy is the 10-fold verification accuracy of the *exported* model on
the demo's held-out identity pairs (no flip), next to the Keras accuracy of
the same weights, and the mean cosine between the two models' embeddings;
nnz and FLOPs per pair are those of the exported model's embeddings (as
`sparse_embed.sparsity.sparsity_stats_np` counts them: non-zeros per
embedding, and the expected multiply-adds of one sparse dot product);
`zeros` is the fraction of exactly-zero weights over every Conv2D and Dense
kernel of the exported model; `gzip MiB` is what the weight zeros save when the
file is compressed (TFLite stores dense tensors). Training resumes and each
run is skipped once it has its steps, so an interrupted study continues.
--output writes the table as a result file (`sparse_embed.results`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from tflite_latency import time_invoke  # noqa: E402

from sparse_embed.cli import deprecated_alias, make_parser  # noqa: E402
from sparse_embed.results import Column, write_result  # noqa: E402

REPRESENTATIVE = 200
HELD_OUT = 200
COLUMNS = (Column("run", "run"), Column("recipe", "recipe"), Column("quantize", "TFLite"),
           Column("accuracy", "accuracy", ".2%"), Column("delta_points", "Δ points", "+.2f"),
           Column("accuracy_keras", "Keras", ".2%"), Column("mean_cosine", "cosine", ".4f"),
           Column("mean_nnz", "nnz", ".1f"), Column("flops_per_pair", "FLOPs/pair", ".1f"),
           Column("weight_zeros", "zeros", ".3f"), Column("size_mib", "MiB", ".3f"),
           Column("gzip_mib", "gzip MiB", ".3f"), Column("ms_per_inference", "ms", ".2f"))


@dataclass(frozen=True)
class Recipe:
    """One row of the table: how the model is obtained and how it is exported.

    Attributes:
        name: Row name.
        quantize: Export mode of `sparse_embed.export`.
        compression: `--set` overrides of the fine-tuning run; empty: the demo run itself.
        init_from: Recipe whose run this one starts from; empty: the demo run.
        lr_factor: The recipe's peak learning rate as a fraction of `--lr`.
    """

    name: str
    quantize: str
    compression: dict[str, object] = field(default_factory=dict)
    init_from: str = ""
    lr_factor: float = 1.0


RECIPES = (
    Recipe("original", "fp32"),
    Recipe("ptq_int8", "int8"),
    Recipe("qat_int8", "int8", {"compression.type": "qat"}),
    Recipe("prune_52", "fp32", {"compression.type": "prune", "compression.target_sparsity": 0.52}),
    Recipe("prune_2of4", "fp32", {"compression.type": "prune", "compression.m_by_n": [2, 4],
                                  "compression.target_sparsity": 0.5}),
    # PQAT fine-tunes prune_52, itself fine-tuned: at --lr the dense model's fake-quantized
    # accuracy fell 0.5 points below prune_52's, at a tenth of it the weights stay near the
    # pruned optimum (TF-MOT's PQAT guide also fine-tunes at a small learning rate).
    Recipe("pqat_int8", "int8", {"compression.type": "prune_qat"}, init_from="prune_52", lr_factor=0.1),
    Recipe("qat_w6", "int8", {"compression.type": "qat", "compression.bits": 6}),
    Recipe("qat_w4", "int8", {"compression.type": "qat", "compression.bits": 4}),
)


def _overrides(values: dict[str, object]) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in values.items()]


def fine_tune_settings(recipe: Recipe, start: Path, steps: int, lr: float) -> dict[str, object]:
    """The config overrides of a recipe's fine-tuning run.

    Args:
        recipe: What to train.
        start: The run it starts from.
        steps: Fine-tuning steps.
        lr: Peak learning rate of the fine-tuning (before the recipe's factor).
    """
    settings = {
        "train.init_from": str(start), "train.steps": steps, "train.checkpoint_every": steps,
        "schedule.name": "cosine", "schedule.base_lr": lr * recipe.lr_factor, "schedule.warmup_steps": 0,
        # The regularizer at its full weight from the first step: the starting run is trained.
        "sparsity.schedule": "constant",
        **recipe.compression,
    }
    if recipe.compression.get("compression.type") == "prune":
        # The pruning schedule is a setting of pruning only (the config refuses it elsewhere).
        settings.update({"compression.end_step": int(0.6 * steps), "compression.frequency": 10})
    return settings


def fine_tune(base: Path, recipe: Recipe, runs: dict[str, Path], out: Path, data: Path,
              steps: int, lr: float) -> Path:
    """Trains (or resumes) the recipe's run from its starting run; returns its directory.

    Args:
        base: The demo run.
        recipe: What to train.
        runs: Directories of the recipes already trained for this base.
        out: Parent of the study's runs.
        data: The demo's data directory.
        steps: Fine-tuning steps.
        lr: Peak learning rate of the fine-tuning.
    """
    from sparse_embed.config import config_from_model_dir, config_to_dict, load_config
    from sparse_embed.training.trainer import train

    start = runs[recipe.init_from] if recipe.init_from else base
    model_dir = out / f"{base.name}_{recipe.name}"
    settings = fine_tune_settings(recipe, start, steps, lr)
    source = config_from_model_dir(base)
    yaml_path = out / f"{base.name}.yaml"
    if not yaml_path.is_file():
        import yaml

        out.mkdir(parents=True, exist_ok=True)
        yaml_path.write_text(yaml.safe_dump(config_to_dict(source)))
    config = load_config(str(yaml_path), _overrides(settings))
    print(f"\n== {model_dir.name}: {steps} steps from {start.name} ==", flush=True)
    train(config, data, model_dir, verbose=2)
    return model_dir


def kernel_zeros(model) -> float:
    """Fraction of exact zeros over the Conv2D and Dense kernels of a (stripped) Keras model.

    Read from the variables: a quantization-aware wrapper replaces its layer's
    `kernel` attribute by the fake-quantized tensor, the variable stays float.
    """
    zeros = total = 0
    for variable in model.weights:
        # Depthwise kernels are called `depthwise_kernel`: TF-MOT does not prune them.
        if variable.name.endswith("/kernel:0"):
            kernel = variable.numpy()
            zeros += int(np.sum(kernel == 0))
            total += kernel.size
    return zeros / max(total, 1)


def export_row(model_dir: Path, recipe: Recipe, data: Path, out: Path) -> dict:
    """Exports one run through the parity gate and measures the file."""
    from sparse_embed.compression import exporter, for_export, images, parity
    from sparse_embed.data.checks import train_inputs
    from sparse_embed.data.verification import read_pairs
    from sparse_embed.inference import load_backbone

    backbone, config = load_backbone(model_dir)
    records = train_inputs(config, data)[0]
    representative = images.load_images(records, REPRESENTATIVE, config.model.input_shape)
    held_out = images.load_images(records, HELD_OUT, config.model.input_shape, REPRESENTATIVE)
    pairs = read_pairs(data / config.data.pairs, data / config.data.pairs_images)
    # A fine-tuned run's directory is named after its recipe already.
    folder = out / "export" / (model_dir.name if recipe.compression else f"{model_dir.name}_{recipe.name}")
    (result,) = exporter.export(backbone, config, "tflite", [recipe.quantize], folder,
                                parity.ParityData(held_out, pairs), representative,
                                progress=lambda line: print(f"  {line}", flush=True))
    content = result.model_path.read_bytes()
    figures = result.record["parity"]
    image = held_out[:1]
    return {
        "recipe": recipe.name, "quantize": recipe.quantize,
        "accuracy_keras": figures["keras"]["accuracy"], "accuracy": figures["exported"]["accuracy"],
        "mean_cosine": figures["mean_cosine"],
        "mean_nnz": figures["exported"].get("mean_nnz"),
        "flops_per_pair": figures["exported"].get("flops_per_pair"),
        "weight_zeros": kernel_zeros(for_export(backbone)),
        "size_mib": len(content) / 2**20,
        "gzip_mib": len(gzip.compress(content, 9)) / 2**20,
        "ms_per_inference": time_invoke(content, image, num_threads=1, repeats=100, warmup=10),
        "gate_passed": result.passed,
    }


def format_table(rows: list[dict]) -> str:
    """One line per row; accuracy change in points against the run's `original` row."""
    head = (f"{'run':<8}{'recipe':<12}{'TFLite':>7}{'acc %':>8}{'Δ pts':>7}{'keras %':>9}{'cos':>8}"
            f"{'nnz':>8}{'FLOPs':>8}{'zeros':>7}{'MiB':>7}{'gzip':>7}{'ms':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        delta = float("nan") if r["delta_points"] is None else r["delta_points"]
        nnz = "-" if r["mean_nnz"] is None else f"{r['mean_nnz']:.1f}"
        flops = "-" if r["flops_per_pair"] is None else f"{r['flops_per_pair']:.1f}"
        lines.append(
            f"{r['run']:<8}{r['recipe']:<12}{r['quantize']:>7}{100 * r['accuracy']:>8.2f}{delta:>+7.2f}"
            f"{100 * r['accuracy_keras']:>9.2f}{r['mean_cosine']:>8.4f}{nnz:>8}{flops:>8}"
            f"{r['weight_zeros']:>7.3f}{r['size_mib']:>7.3f}{r['gzip_mib']:>7.3f}"
            f"{r['ms_per_inference']:>7.2f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python benchmarks/compression_table.py`."""
    parser = make_parser(__doc__, "python benchmarks/compression_table.py")
    parser.add_argument("--demo_dir", default="runs/demo",
                        help="What `make demo` wrote (data/, dense/, sparse/).")
    parser.add_argument("--runs", default="dense,sparse", help="Demo runs to compress.")
    parser.add_argument("--recipes", default=",".join(r.name for r in RECIPES), help="Rows to make.")
    parser.add_argument("--steps", type=int, default=300, help="Fine-tuning steps of each recipe.")
    parser.add_argument("--lr", type=float, default=0.01, help="Peak learning rate of the fine-tuning.")
    parser.add_argument("--output", default=None,
                        help="Also write the table to this result file (sparse_embed.results).")
    deprecated_alias(parser, "--json", "--output")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Fine-tunes every recipe of every run, exports, prints the table.

    Args:
        argv: Arguments after the script name; None reads sys.argv.
    """
    args = build_parser().parse_args(argv)
    demo = Path(args.demo_dir)
    data = demo / "data"
    wanted = [r for r in args.recipes.split(",") if r]
    known = {r.name: r for r in RECIPES}
    unknown = sorted(set(wanted) - set(known))
    if unknown or args.steps < 1:
        build_parser().error(f"unknown recipe(s) {unknown}; known: {', '.join(known)}"
                     if unknown else "--steps must be >= 1")
    bases = [demo / name for name in args.runs.split(",") if name]
    missing = [str(b) for b in bases if not (b / "config.yaml").is_file()] + (
        [] if (data / "tfrecords").is_dir() else [str(data / "tfrecords")])
    if missing:
        print(f"compression_table: {missing[0]} not found; run `make demo` first "
              f"(or pass --demo_dir)", file=sys.stderr)
        sys.exit(2)
    out = demo / "compression"
    rows = []
    for base in bases:
        runs: dict[str, Path] = {}
        for recipe in RECIPES:
            needed = recipe.name in wanted or any(r.init_from == recipe.name for r in RECIPES
                                                  if r.name in wanted)
            if not needed:
                continue
            runs[recipe.name] = (fine_tune(base, recipe, runs, out, data, args.steps, args.lr)
                                 if recipe.compression else base)
            if recipe.name in wanted:
                print(f"\n== export {base.name} {recipe.name} ({recipe.quantize}) ==", flush=True)
                rows.append({"run": base.name, **export_row(runs[recipe.name], recipe, data, out)})
    original = {r["run"]: r["accuracy"] for r in rows if r["recipe"] == "original"}
    for row in rows:
        row["delta_points"] = (100 * (row["accuracy"] - original[row["run"]])
                               if row["run"] in original else None)
    print("\n" + format_table(rows))
    if args.output:
        write_result(args.output, "Compression of the demo models: QAT, pruning, 2:4, PQAT, n-bit QAT",
                     {"compression": (COLUMNS, rows)},
                     notes=f"runs {args.runs} of {args.demo_dir}, {args.steps} fine-tuning steps at lr "
                           f"{args.lr} (PQAT at a tenth); accuracy of the exported file on the demo's "
                           f"held-out pairs, 10-fold, no flip; ms on 1 thread")


if __name__ == "__main__":
    main()
