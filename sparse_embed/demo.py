"""The end-to-end demo: synthetic identities -> TFRecords -> dense vs sparse training -> table.

    python -m sparse_embed.demo --output=runs/demo        (what `make demo` runs)

Trains two models that differ only in the sparsity setting (packaged configs
`synthetic/dense` and `synthetic/sparse_flops`), evaluates them and an
untrained network on the held-out identities' pairs, prints one table,
writes it to `<output>/results.json` and their ROC curves to `<output>/roc.png`;
`--results=results/demo.json` (what `make demo` passes) also records the table and
the time of each stage as a result file, which the README's table is rendered from.
Each stage is skipped when its output is already there, and training resumes
from its checkpoints, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from sparse_embed.cli import deprecated_alias, make_parser, program, user_errors_exit

RUNS = {"dense": "synthetic/dense", "sparse": "synthetic/sparse_flops"}
RESULT_KEYS = ("accuracy", "accuracy_std", "auc", "embedding_size", "mean_nnz",
               "flops_per_pair", "r_sub", "search_ms_per_query")


def prepare_data(out: Path, identities: int, images: int, test_identities: int) -> Path:
    """Generates the synthetic dataset and its TFRecords unless they already exist.

    Args:
        out: Demo output directory.
        identities: Training identities.
        images: Images per identity.
        test_identities: Held-out identities.

    Returns:
        The data directory (train/, test/, pairs.txt, tfrecords/).
    """
    from sparse_embed.data.synthetic import generate
    from sparse_embed.data.tfrecord import build_tfrecords

    data = out / "data"
    wanted = {"num_identities": identities, "images_per_identity": images,
              "num_test_identities": test_identities}
    meta = data / "synthetic.json"
    current = json.loads(meta.read_text()) if meta.is_file() else {}
    if any(current.get(k) != v for k, v in wanted.items()):
        generate(data, identities, images, test_identities, seed=0, workers=2)
    if not (data / "tfrecords" / "labels.txt").is_file():
        build_tfrecords(data / "train", data / "tfrecords", name="train", num_shards=8,
                        num_workers=2, seed=0)
    return data


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sparse_embed.demo`."""
    parser = make_parser(__doc__, program(__name__))
    parser.add_argument("--output", default="runs/demo",
                        help="Output directory: data, runs, results.json (default: %(default)s).")
    deprecated_alias(parser, "--out", "--output")
    parser.add_argument("--identities", type=int, default=500,
                        help="Training identities to generate (default: %(default)s).")
    parser.add_argument("--images_per_identity", type=int, default=20,
                        help="Images per identity (default: %(default)s).")
    deprecated_alias(parser, "--images", "--images_per_identity")
    parser.add_argument("--test_identities", type=int, default=100,
                        help="Held-out identities for the pairs (default: %(default)s).")
    parser.add_argument("--results", default=None, metavar="JSON",
                        help="Also write the table and the stage times as a result file "
                             "(sparse_embed.results), e.g. results/demo.json.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Config override for both runs, key.path=value (repeatable).")
    return parser


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """Runs every stage and prints the results table.

    Args:
        argv: Arguments after the program name; None reads sys.argv.
    """
    args = build_parser().parse_args(argv)
    from sparse_embed.config import load_config

    # Both configs with the overrides first: a mistyped --set is one line, before any data is made
    # (and before TensorFlow is imported).
    configs = {name: load_config(config_name, args.set) for name, config_name in RUNS.items()}
    from sparse_embed.cli import format_results
    from sparse_embed.data.verification import read_pairs
    from sparse_embed.fileio import atomic_path
    from sparse_embed.inference import evaluate_verification, load_backbone
    from sparse_embed.plots import plot_roc
    from sparse_embed.training.trainer import train

    out = Path(args.output)
    timings = {}
    start = time.perf_counter()
    data = prepare_data(out, args.identities, args.images_per_identity, args.test_identities)
    timings["data"] = time.perf_counter() - start

    results, scores = {}, {}
    for name, config_name in RUNS.items():
        config = configs[name]
        pairs = read_pairs(data / config.data.pairs, data / config.data.pairs_images)
        print(f"\n== training {name} ({config_name}) ==")
        start = time.perf_counter()
        train(config, data, out / name, verbose=2)
        timings[f"train {name}"] = time.perf_counter() - start
        if name == "dense":
            backbone, _ = load_backbone(out / name, untrained=True)
            results["untrained"], scores["untrained"] = evaluate_verification(backbone, config, pairs)
        backbone, _ = load_backbone(out / name)
        results[name], scores[name] = evaluate_verification(backbone, config, pairs)

    table = {run: {k: r[k] for k in RESULT_KEYS} for run, r in results.items()}
    print("\n" + format_results(table))
    print("\n" + "  ".join(f"{stage}: {secs:.0f}s" for stage, secs in timings.items()))
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps({k: table[k] for k in RUNS}, indent=2))
    plot_roc({run: (s, pairs.issame) for run, s in scores.items()}, out / "roc.png",
             title="Held-out synthetic identities")
    print(f"wrote {out / 'results.json'} and {out / 'roc.png'}")
    if args.results:
        write_demo_result(args.results, table, timings, args)
        print(f"wrote {args.results}")


def write_demo_result(path: str, table: dict[str, dict[str, float]], timings: dict[str, float],
                      args: argparse.Namespace) -> None:
    """Records the demo's table and stage times as a result file.

    Args:
        path: The JSON file to write.
        table: Run name -> its RESULT_KEYS.
        timings: Stage -> seconds (a stage whose output already existed takes about 0).
        args: The parsed command line (the sizes go into the notes).
    """
    from sparse_embed.results import Column, write_result

    formats = {"accuracy": ".4f", "accuracy_std": ".4f", "auc": ".4f", "mean_nnz": ".1f",
               "flops_per_pair": ".1f", "r_sub": ".3f", "search_ms_per_query": ".4f"}
    columns = [Column("run", "run")] + [Column(k, k, formats.get(k, "")) for k in RESULT_KEYS]
    rows = [{"run": run, **values} for run, values in table.items()]
    stages = [{"stage": stage, "seconds": secs} for stage, secs in timings.items()]
    stages.append({"stage": "total", "seconds": sum(timings.values())})
    notes = (f"{args.identities} training + {args.test_identities} held-out synthetic identities x "
             f"{args.images_per_identity} images; accuracy is the 10-fold LFW-protocol accuracy on the "
             f"held-out pairs; search_ms_per_query an exact top-10 search over the evaluation embeddings "
             f"on one thread. Stage times count only stages that ran (existing outputs are reused).")
    write_result(path, "The demo: dense vs sparse (FLOPs) MobileFaceNet-tiny on synthetic identities",
                 {"demo": (columns, rows),
                  "stages": ([Column("stage", "stage"), Column("seconds", "seconds", ".0f")], stages)},
                 notes=notes)


def run() -> None:
    """Console-script entry point."""
    main()


if __name__ == "__main__":
    run()
