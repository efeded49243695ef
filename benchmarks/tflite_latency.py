"""TFLite latency: ms per inference (batch 1, XNNPACK) of the edge models in each quantization mode.

    python benchmarks/tflite_latency.py [--models=mobilefacenet,sphereface20,iresnet50]
        [--modes=fp32,fp16,dynamic,int8] [--repeats=50] [--num_threads=N] [--tiny]
        [--output=results/tflite_latency.json]

Each model is built untrained with `sparse_embed.models.build_model` at its
published input size (MobileFaceNet 112x112, SphereFace-20 112x96, IResNet-50
112x112; latency does not depend on the weights, with one exception: the
int8 modes rewrite each PReLU by its slopes, one LEAKY_RELU when a layer's
slopes are all equal, as they are at initialisation, and LEAKY_RELU, SUB,
MUL and ADD when they differ per channel, as after training; so the PReLU
slopes are drawn per channel in [0.05, 0.6] first), converted by
`sparse_embed.compression.converter.convert` (int8 calibrated on random images
in [-1, 1]) and timed on `sparse_embed.edge.runtime` (the `ai_edge_litert`
interpreter, the runtime of the edge devices), with its default XNNPACK
delegate on 1 thread and on --num_threads (default: every core). Figures are
the median of --repeats invocations after warm-up invocations. The last
column is the 1-thread time relative to fp32 of the same model.

Below the table: the MLPerf edge face protocol estimate for SphereFace-20, 600
LFW pairs x 4 inferences (each image and its mirror image) = 2400 inferences
at the measured all-thread time, against the 271 s of inference the MLPerf
README reports on its Intel NUC (same protocol, different hardware), and
MobileFaceNet's 1-thread time against the 10 ms goal. --output writes both
tables (`latency`, `mlperf`) as a result file (`sparse_embed.results`).
--tiny uses each family's tiny variant (for tests; the figures then say
nothing about the models).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparse_embed.cli import deprecated_alias, make_parser  # noqa: E402
from sparse_embed.config import ModelConfig  # noqa: E402
from sparse_embed.results import Column, write_result  # noqa: E402

# name -> (published configuration, tiny variant)
MODELS = {
    "mobilefacenet": (ModelConfig(name="mobilefacenet", embedding_size=128, input_size=112),
                      ModelConfig(name="mobilefacenet_tiny", embedding_size=64, input_size=32)),
    "sphereface20": (ModelConfig(name="sphereface20", embedding_size=512, input_size=112, input_width=96),
                     ModelConfig(name="sphereface20_tiny", embedding_size=128, input_size=28,
                                 input_width=24)),
    "iresnet50": (ModelConfig(name="iresnet50", embedding_size=512, input_size=112),
                  ModelConfig(name="iresnet_tiny", embedding_size=128, input_size=32)),
}
MODES = ("fp32", "fp16", "dynamic", "int8")
# MLPerf edge face benchmark (SphereFace-20 TFLite on an Intel NUC): inference of 600 pairs.
MLPERF_PAIRS = 600
MLPERF_INFERENCES_PER_PAIR = 4
MLPERF_INFERENCE_S = 271.0
MOBILEFACENET_GOAL_MS = 10.0
CALIBRATION_IMAGES = 8
MLPERF_COLUMNS = (Column("model", "model"), Column("mode", "mode"), Column("threads", "threads"),
                  Column("inferences", "inferences"), Column("ms_all_threads", "ms each", ".2f"),
                  Column("seconds", "seconds", ".1f"), Column("mlperf_nuc_s", "MLPerf NUC s", ".0f"))
# Per-channel PReLU slopes of the timed models (initialised at 0.25): see the module docstring.
PRELU_SLOPES = (0.05, 0.6)


def time_invoke(content: bytes, image: np.ndarray, num_threads: int, repeats: int, warmup: int) -> float:
    """Median ms of one batch-1 invocation of a TFLite model.

    Args:
        content: The `.tflite` flatbuffer.
        image: float32 [1, H, W, 3] in [-1, 1].
        num_threads: Interpreter threads.
        repeats: Timed invocations.
        warmup: Untimed invocations first (XNNPACK packs weights at the first).
    """
    from sparse_embed.edge.runtime import TFLiteModel

    model = TFLiteModel.from_content(content, num_threads=num_threads)
    model(image)
    for _ in range(warmup):
        model.interpreter.invoke()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.interpreter.invoke()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def measure(name: str, config: ModelConfig, modes: list[str], threads: int, repeats: int,
            warmup: int) -> list[dict]:
    """One row per mode: size, ms on 1 thread and on `threads`, ratio of the 1-thread ms to fp32."""
    from sparse_embed.compression.converter import convert
    from sparse_embed.keras import keras
    from sparse_embed.models import build_model

    keras.utils.set_random_seed(0)
    model = build_model(config)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.PReLU):
            shape = layer.get_weights()[0].shape
            layer.set_weights([rng.uniform(*PRELU_SLOPES, shape).astype(np.float32)])
    shape = (*config.input_shape, 3)
    calibration = rng.uniform(-1, 1, (CALIBRATION_IMAGES, *shape)).astype(np.float32)
    image = rng.uniform(-1, 1, (1, *shape)).astype(np.float32)
    rows = []
    for mode in modes:
        print(f"{config.name} {mode}: converting", file=sys.stderr, flush=True)
        content = convert(model, mode, calibration if mode.startswith("int8") else None)
        rows.append({
            "model": config.name, "input": f"{shape[0]}x{shape[1]}", "mode": mode,
            "size_mib": len(content) / 2**20,
            "ms_1_thread": time_invoke(content, image, 1, repeats, warmup),
            "threads": threads,
            "ms_all_threads": time_invoke(content, image, threads, repeats, warmup),
        })
    fp32 = next((r["ms_1_thread"] for r in rows if r["mode"] == "fp32"), None)
    for row in rows:
        row["ratio_vs_fp32"] = round(row["ms_1_thread"] / fp32, 4) if fp32 else None
    return rows


def format_table(rows: list[dict]) -> str:
    """The benchmark table, one row per model and mode."""
    threads = rows[0]["threads"] if rows else 0
    head = (f"{'model':<20}{'input':>8}{'mode':>9}{'MiB':>9}{'ms 1 thr':>10}"
            f"{f'ms {threads} thr':>10}{'vs fp32':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = "-" if r["ratio_vs_fp32"] is None else f"{r['ratio_vs_fp32']:.2f}"
        lines.append(f"{r['model']:<20}{r['input']:>8}{r['mode']:>9}{r['size_mib']:>9.2f}"
                     f"{r['ms_1_thread']:>10.2f}{r['ms_all_threads']:>10.2f}{ratio:>9}")
    return "\n".join(lines)


def goals(rows: list[dict], tiny: bool) -> tuple[list[str], list[dict]]:
    """The MLPerf protocol estimate and the MobileFaceNet goal, as lines, and the estimate's rows."""
    lines, estimates = [], []
    note = " (tiny variants: not comparable)" if tiny else ""
    inferences = MLPERF_PAIRS * MLPERF_INFERENCES_PER_PAIR
    for r in rows:
        if r["model"].startswith("sphereface20"):
            seconds = inferences * r["ms_all_threads"] / 1e3
            estimates.append({"model": r["model"], "mode": r["mode"], "threads": r["threads"],
                              "inferences": inferences, "ms_all_threads": r["ms_all_threads"],
                              "seconds": seconds, "mlperf_nuc_s": MLPERF_INFERENCE_S})
            lines.append(f"MLPerf 600-pair protocol, {r['model']} {r['mode']} on {r['threads']} threads: "
                         f"{inferences} x {r['ms_all_threads']:.2f} ms = {seconds:.1f} s vs "
                         f"{MLPERF_INFERENCE_S:g} s on the MLPerf NUC ({MLPERF_INFERENCE_S / seconds:.1f}x; "
                         f"different hardware){note}")
        if r["model"].startswith("mobilefacenet"):
            lines.append(f"MobileFaceNet {r['mode']} on 1 thread: {r['ms_1_thread']:.2f} ms "
                         f"(goal <= {MOBILEFACENET_GOAL_MS:g} ms){note}")
    return lines, estimates


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python benchmarks/tflite_latency.py`."""
    parser = make_parser(__doc__, "python benchmarks/tflite_latency.py")
    parser.add_argument("--models", default=",".join(MODELS), help=f"Subset of {','.join(MODELS)}.")
    parser.add_argument("--modes", default=",".join(MODES), help=f"Subset of {','.join(MODES)}.")
    parser.add_argument("--repeats", type=int, default=50, help="Timed invocations per figure.")
    parser.add_argument("--warmup", type=int, default=5, help="Untimed invocations first.")
    parser.add_argument("--num_threads", dest="threads", type=int, default=os.cpu_count() or 1,
                        help="Threads of the multi-thread column (default: every core).")
    parser.add_argument("--tiny", action="store_true", help="Tiny variants (tests).")
    parser.add_argument("--output", default=None,
                        help="Also write the tables to this result file (sparse_embed.results).")
    deprecated_alias(parser, "--threads", "--num_threads")
    deprecated_alias(parser, "--json", "--output")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parses the flags, measures every model and mode, prints the table.

    Args:
        argv: Arguments after the script name; None reads sys.argv.
    """
    args = build_parser().parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(models) - set(MODELS)) + sorted(set(modes) - set(MODES))
    if unknown or args.repeats < 1 or args.threads < 1:
        build_parser().error(f"unknown model or mode {unknown}, or --repeats / --num_threads below 1"
                     if unknown else "--repeats and --num_threads must be >= 1")
    rows = []
    for name in models:
        rows += measure(name, MODELS[name][1 if args.tiny else 0], modes, args.threads, args.repeats,
                        args.warmup)
    print(format_table(rows))
    lines, estimates = goals(rows, args.tiny)
    print("\n".join(lines))
    if args.output:
        variants = "tiny variants (the figures say nothing about the models)" if args.tiny else "untrained"
        columns = (Column("model", "model"), Column("input", "input"), Column("mode", "mode"),
                   Column("size_mib", "MiB", ".2f"), Column("ms_1_thread", "ms, 1 thread", ".2f"),
                   Column("ms_all_threads", f"ms, {args.threads} threads", ".2f"),
                   Column("ratio_vs_fp32", "1 thread vs fp32", ".2f"))
        write_result(args.output, "TFLite latency, batch 1, LiteRT interpreter with XNNPACK",
                     {"latency": (columns, rows), "mlperf": (MLPERF_COLUMNS, estimates)},
                     notes=f"{variants} weights, PReLU slopes drawn per channel; median of "
                           f"{args.repeats} invocations after {args.warmup} warm-up ones")


if __name__ == "__main__":
    main()
