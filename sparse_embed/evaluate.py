"""Evaluate a trained model: verification pairs (the default), identification, retrieval, sparsity.

    python -m sparse_embed.evaluate --model_dir=runs/sparse_mfn \\
        --pairs=data/lfw/pairs.txt --pairs_images=data/lfw/images
    python -m sparse_embed.evaluate --model_dir=runs/sparse_mfn --bin=data/faces_emore/lfw.bin
    # the pairs of the run's own data (data.pairs under the data_dir it was trained on)
    python -m sparse_embed.evaluate --model_dir=runs/sparse_mfn
    # LFW View 1: threshold chosen on pairsDevTrain, accuracy measured on pairsDevTest.
    python -m sparse_embed.evaluate --model_dir=runs/sparse_mfn \\
        --pairs=data/lfw/pairsDevTest.txt --threshold_pairs=data/lfw/pairsDevTrain.txt \\
        --pairs_images=data/lfw/images

Prints accuracy (k-fold mean and std, or View 1's single fold), the threshold,
ROC AUC, EER, TAR@FAR where the pairs allow, sparsity statistics and search
time, with a note under the table saying how the threshold was chosen; writes
them to `<model_dir>/eval.json` (or --output) and the ROC curve beside it
(`eval.roc.png`). Pairs are scored with the run's test-time scorer (cosine;
MLS for PFE, SCF and SPE; HIB's own, with its trained weights). A run with a
confidence adds confidence_auroc, confidence_aupr and confidence_aurcc (pair
confidence: the smaller of its two images') and the risk-coverage curve
(`eval.risk.png`).

The other protocols work on HDF5 embedding files written by
`sparse_embed.embed` (no TensorFlow import) and are sub-commands, each with
its own `--help`:

    python -m sparse_embed.evaluate identification --probes=facescrub_RUN.hdf5 \\
        --distractors=megaface_RUN.hdf5 --score_threshold=0.25 --rerank_topk=1000
    python -m sparse_embed.evaluate retrieval --embeddings=test.hdf5
    python -m sparse_embed.evaluate sparsity --embeddings=test.hdf5
    python -m sparse_embed.evaluate nuisance --embeddings=pairs.hdf5 --data_dir=data/synth
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Sequence
from pathlib import Path

from sparse_embed.cli import add_command, examples, format_results, make_parser, program, user_errors_exit
from sparse_embed.errors import ConfigError
from sparse_embed.registry import Registry

# Sub-command -> module with `DESCRIPTION`, `add_arguments(parser)` and `run_command(args)`.
SUBCOMMANDS: Registry[str] = Registry("evaluate sub-command")
SUBCOMMANDS.register("identification")("sparse_embed.metrics.identification")
SUBCOMMANDS.register("retrieval")("sparse_embed.metrics.retrieval")
SUBCOMMANDS.register("sparsity")("sparse_embed.metrics.sparsity")
SUBCOMMANDS.register("nuisance")("sparse_embed.metrics.nuisance")
# The pairs protocol, also reachable by name: `evaluate verification --model_dir=...`.
VERIFICATION = "verification"


def _verification_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model_dir", help="Directory written by sparse_embed.train (required).")
    parser.add_argument("--pairs", help="Pairs file; default: the run's data_dir/data.pairs.")
    parser.add_argument("--pairs_images", help="Image root the pairs refer to.")
    parser.add_argument("--bin", help="InsightFace verification pack (lfw.bin, cfp_fp.bin, ...).")
    parser.add_argument("--data_dir", help="Resolve data.pairs / data.pairs_images here; default: the data "
                                           "directory the run was trained on (<model_dir>/run.json).")
    parser.add_argument("--output", help="JSON results file; default: <model_dir>/eval.json.")
    parser.add_argument(
        "--threshold_pairs",
        help="Pairs file that chooses the accuracy threshold (LFW View 1: pairsDevTrain.txt, with "
             "--pairs=pairsDevTest.txt); its images are under --pairs_images (or --data_dir's). "
             "Default: the threshold comes from the other folds, or, with a single fold, from the "
             "fold itself (labelled as such).")
    parser.add_argument("--untrained", action="store_true",
                        help="Evaluate the random initialisation (baseline).")


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sparse_embed.evaluate`: verification options and sub-commands."""
    parser = make_parser(__doc__, program(__name__))
    _verification_arguments(parser)
    commands = parser.add_subparsers(dest="command", title="sub-commands",
                                     metavar="{" + ",".join([VERIFICATION, *SUBCOMMANDS.names()]) + "}")
    _verification_arguments(add_command(
        commands, VERIFICATION, "Verification pairs (the default without a sub-command).",
        prog=f"{parser.prog} {VERIFICATION}"))
    for name in SUBCOMMANDS.names():
        module = importlib.import_module(SUBCOMMANDS.get(name))
        doc = f"{module.DESCRIPTION}\n\n{examples(module.__doc__)}"
        module.add_arguments(add_command(commands, name, doc, prog=f"{parser.prog} {name}"))
    return parser


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """Runs a sub-command, or embeds the pairs' images, scores them and prints / writes the results.

    Args:
        argv: Arguments after the program name; None reads sys.argv.
    """
    args = build_parser().parse_args(argv)
    if args.command not in (None, VERIFICATION):
        importlib.import_module(SUBCOMMANDS.get(args.command)).run_command(args)
        return
    _verification(args)


def _verification(args: argparse.Namespace) -> None:
    if not args.model_dir:
        raise ConfigError("--model_dir is required")
    from sparse_embed.config import config_from_model_dir
    from sparse_embed.data.verification import read_bin, read_pairs
    from sparse_embed.fileio import atomic_path, native_stderr_to_file
    from sparse_embed.run_record import default_data_dir

    config = config_from_model_dir(args.model_dir)
    if args.bin and (args.pairs or args.data_dir):
        raise ConfigError("pass either --bin or --pairs/--data_dir, not both")
    pack = pairs = threshold_pairs = None
    images = args.pairs_images
    if args.bin:
        pack = read_bin(args.bin, nfolds=config.eval.nfolds)
    else:
        data_dir = None if args.pairs else default_data_dir(args.model_dir, args.data_dir, required=True)
        if args.pairs:
            pairs_path = args.pairs
        elif data_dir:
            pairs_path = Path(data_dir) / config.data.pairs
            images = Path(data_dir) / config.data.pairs_images
        else:
            raise ConfigError("pass --bin, --pairs and --pairs_images, or --data_dir (this run directory "
                              "records none)")
        if not images:
            raise ConfigError("--pairs needs --pairs_images (the image root it refers to)")
        pairs = read_pairs(pairs_path, images)
    if args.threshold_pairs:
        if not images:
            raise ConfigError("--threshold_pairs needs --pairs_images (the image root it refers to)")
        threshold_pairs = read_pairs(args.threshold_pairs, images)
    # TensorFlow is imported only once the inputs are known to be usable.
    from sparse_embed.inference import (
        load_backbone,
        risk_coverage_errors,
        scoring_for,
        verify_bin,
        verify_pairs,
    )

    backbone, config = load_backbone(args.model_dir, untrained=args.untrained)
    scoring = scoring_for(backbone, config, None if args.untrained else args.model_dir)
    from sparse_embed.plots import plot_risk_coverage, plot_roc

    # libjpeg's own report of a corrupt JPEG stays off the terminal: the error names the file.
    with native_stderr_to_file(replay_on_error=False, keep_python=True):
        if pack is not None:
            verified = verify_bin(backbone, config, pack, name=Path(args.bin).name,
                                  threshold_pairs=threshold_pairs, scoring=scoring)
        else:
            verified = verify_pairs(backbone, config, pairs, threshold_pairs, scoring)
    name = Path(args.model_dir).name
    print(format_results({name: verified.results}))
    output = Path(args.output or Path(args.model_dir) / "eval.json")
    with atomic_path(output) as tmp:
        tmp.write_text(json.dumps(verified.results, indent=2))
    plot_roc({name: (verified.scores, verified.issame)}, output.with_suffix(".roc.png"))
    if verified.confidence is not None:
        plot_risk_coverage({name: risk_coverage_errors(verified.scores, verified.issame,
                                                       verified.confidence)},
                           output.with_suffix(".risk.png"))


def run() -> None:
    """Console-script entry point."""
    main()


if __name__ == "__main__":
    run()
