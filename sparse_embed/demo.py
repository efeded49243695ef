"""The end-to-end demo: synthetic identities -> TFRecords -> dense vs sparse training -> table.

    python -m sparse_embed.demo --out=runs/demo        (what `make demo` runs)

Trains two models that differ only in the sparsity setting (packaged configs
`synthetic/dense` and `synthetic/sparse_flops`), evaluates them and an
untrained network on the held-out identities' pairs, prints one table,
writes it to `<out>/results.json` and their ROC curves to `<out>/roc.png`.
Each stage is skipped when its output is already there, and training resumes
from its checkpoints, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from absl import app, flags

from sparse_embed.cli import user_errors_exit

_OUT = flags.DEFINE_string("out", "runs/demo", "Output directory (data, runs, results.json).")
_IDENTITIES = flags.DEFINE_integer("identities", 500, "Training identities to generate.")
_IMAGES = flags.DEFINE_integer("images", 20, "Images per identity.")
_TEST_IDENTITIES = flags.DEFINE_integer("test_identities", 100, "Held-out identities for the pairs.")
_SET = flags.DEFINE_multi_string("set", [], "Config override for both runs, key.path=value.")

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


@user_errors_exit
def main(argv: list[str]) -> None:
    """Runs every stage and prints the results table."""
    del argv
    from sparse_embed.cli import format_results
    from sparse_embed.config import load_config
    from sparse_embed.data.verification import read_pairs
    from sparse_embed.fileio import atomic_path
    from sparse_embed.inference import evaluate_verification, load_backbone
    from sparse_embed.plots import plot_roc
    from sparse_embed.training.trainer import train

    out = Path(_OUT.value)
    timings = {}
    start = time.perf_counter()
    data = prepare_data(out, _IDENTITIES.value, _IMAGES.value, _TEST_IDENTITIES.value)
    timings["data"] = time.perf_counter() - start

    results, scores = {}, {}
    for name, config_name in RUNS.items():
        config = load_config(config_name, _SET.value)
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


if __name__ == "__main__":
    app.run(main)
