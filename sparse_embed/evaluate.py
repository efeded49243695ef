"""Evaluate a trained model: verification pairs (the default), identification, retrieval, sparsity.

    python -m sparse_embed.evaluate --model_dir=runs/sparse_mfn \
        --pairs=data/lfw/pairs.txt --pairs_images=data/lfw/images
    python -m sparse_embed.evaluate --model_dir=runs/sparse_mfn --bin=data/faces_emore/lfw.bin
    # LFW View 1: threshold chosen on pairsDevTrain, accuracy measured on pairsDevTest.
    python -m sparse_embed.evaluate --model_dir=runs/sparse_mfn \
        --pairs=data/lfw/pairsDevTest.txt --threshold_pairs=data/lfw/pairsDevTrain.txt \
        --pairs_images=data/lfw/images

Prints accuracy (k-fold mean and std, or View 1's single fold), the threshold,
ROC AUC, EER, TAR@FAR where the pairs allow, sparsity statistics and search
time, with a note under the table saying how the threshold was chosen; writes
them to `<model_dir>/eval.json` (or --output) and the ROC curve beside it
(`eval.roc.png`).

The other protocols work on HDF5 embedding files written by
`sparse_embed.embed` (no TensorFlow import) and are sub-commands, each with
its own `--help`:

    python -m sparse_embed.evaluate identification --probes=facescrub_RUN.hdf5 \
        --distractors=megaface_RUN.hdf5 --threshold=0.25 --rerank_topk=1000
    python -m sparse_embed.evaluate retrieval --embeddings=test.hdf5
    python -m sparse_embed.evaluate sparsity --embeddings=test.hdf5
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from absl import app, flags

from sparse_embed.cli import format_results, user_errors_exit
from sparse_embed.errors import ConfigError
from sparse_embed.registry import Registry

# Sub-command -> module whose `main(argv)` runs it (imported only when chosen).
SUBCOMMANDS: Registry[str] = Registry("evaluate sub-command")
SUBCOMMANDS.register("identification")("sparse_embed.metrics.identification")
SUBCOMMANDS.register("retrieval")("sparse_embed.metrics.retrieval")
SUBCOMMANDS.register("sparsity")("sparse_embed.metrics.sparsity")
# The pairs protocol, also reachable by name: `evaluate verification --model_dir=...`.
VERIFICATION = "verification"

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Directory written by sparse_embed.train.")
_PAIRS = flags.DEFINE_string("pairs", None, "Pairs file; default: the run's data_dir/data.pairs.")
_PAIRS_IMAGES = flags.DEFINE_string("pairs_images", None, "Image root the pairs refer to.")
_BIN = flags.DEFINE_string("bin", None, "InsightFace verification pack (lfw.bin, cfp_fp.bin, ...).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Resolve data.pairs / data.pairs_images here.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON results file; default: <model_dir>/eval.json.")
_THRESHOLD_PAIRS = flags.DEFINE_string(
    "threshold_pairs", None,
    "Pairs file that chooses the accuracy threshold (LFW View 1: pairsDevTrain.txt, with "
    "--pairs=pairsDevTest.txt); its images are under --pairs_images (or --data_dir's). "
    "Default: the threshold comes from the other folds, or, with a single fold, from the fold "
    "itself (labelled as such).")
_UNTRAINED = flags.DEFINE_bool("untrained", False, "Evaluate the random initialisation (baseline).")


@user_errors_exit
def main(argv: list[str]) -> None:
    """Embeds the pairs' images, scores them and prints / writes the results."""
    if len(argv) > 1:  # a mistyped sub-command: name the valid ones
        SUBCOMMANDS.get(argv[1])
    if not _MODEL_DIR.value:
        raise ConfigError("--model_dir is required")
    from sparse_embed.config import config_from_model_dir
    from sparse_embed.data.verification import read_bin, read_pairs
    from sparse_embed.fileio import atomic_path

    config = config_from_model_dir(_MODEL_DIR.value)
    if _BIN.value and (_PAIRS.value or _DATA_DIR.value):
        raise ConfigError("pass either --bin or --pairs/--data_dir, not both")
    pack = pairs = threshold_pairs = None
    images = _PAIRS_IMAGES.value
    if _BIN.value:
        pack = read_bin(_BIN.value, nfolds=config.eval.nfolds)
    else:
        if _PAIRS.value:
            pairs_path = _PAIRS.value
        elif _DATA_DIR.value:
            pairs_path = Path(_DATA_DIR.value) / config.data.pairs
            images = Path(_DATA_DIR.value) / config.data.pairs_images
        else:
            raise ConfigError("pass --bin, --pairs and --pairs_images, or --data_dir")
        if not images:
            raise ConfigError("--pairs needs --pairs_images (the image root it refers to)")
        pairs = read_pairs(pairs_path, images)
    if _THRESHOLD_PAIRS.value:
        if not images:
            raise ConfigError("--threshold_pairs needs --pairs_images (the image root it refers to)")
        threshold_pairs = read_pairs(_THRESHOLD_PAIRS.value, images)
    # TensorFlow is imported only once the inputs are known to be usable.
    from sparse_embed.inference import evaluate_bin, evaluate_verification, load_backbone

    backbone, config = load_backbone(_MODEL_DIR.value, untrained=_UNTRAINED.value)
    from sparse_embed.plots import plot_roc

    if pack is not None:
        results, scores = evaluate_bin(backbone, config, pack, name=Path(_BIN.value).name,
                                       threshold_pairs=threshold_pairs)
        issame = pack.issame
    else:
        results, scores = evaluate_verification(backbone, config, pairs, threshold_pairs)
        issame = pairs.issame
    name = Path(_MODEL_DIR.value).name
    print(format_results({name: results}))
    output = Path(_OUTPUT.value or Path(_MODEL_DIR.value) / "eval.json")
    with atomic_path(output) as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    plot_roc({name: (scores, issame)}, output.with_suffix(".roc.png"))


def run() -> None:
    """Console-script entry point: a sub-command's `main`, or the verification flags."""
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command in SUBCOMMANDS:
        importlib.import_module(SUBCOMMANDS.get(command)).main(sys.argv[2:])
        return
    if command == VERIFICATION:
        del sys.argv[1]
    app.run(main)


if __name__ == "__main__":
    run()
