"""Does predicted confidence follow the nuisances that made an image hard? `evaluate nuisance`.

    python -m sparse_embed.embed --model_dir=runs/pe/pfe --output=runs/pe/pfe_pairs.hdf5
    python -m sparse_embed.evaluate nuisance --embeddings=runs/pe/pfe_pairs.hdf5 \\
        --data_dir=runs/pe/data --output=runs/pe/pfe_nuisance.json

Probabilistic embeddings claim their confidence is low where the input is
poor. On real faces nobody knows how poor an image is; on the synthetic faces
(`sparse_embed.data.synthetic`) every image's nuisance is a pure function of
the data set's seed and the image's identity and image indices, so it can be
recovered exactly for each embedded image. Per factor (occluded or not, blur,
|yaw|, |roll|, sensor noise, lighting strength) this prints Spearman's rank
correlation between the factor and the confidence: a confidence that "falls
as the factor rises" has a negative rho. It then scores the data set's pairs
with the cosine of the means, calls a pair "same" at the most accurate
threshold, and reports how well the pair confidence (the smaller of the two
images') tells right decisions from wrong (`confidence_auroc`, PE's
definition) and the error rate among the least confident pairs against all.

This module imports NumPy, SciPy (the p-values) and h5py only.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sparse_embed.cli import examples, format_results, make_parser, user_errors_exit
from sparse_embed.data.synthetic import Nuisance, sample_nuisance
from sparse_embed.errors import DataError

# Factor name -> how bad the image is on that axis (higher = harder), from its nuisance.
FACTORS = {
    "occluded": lambda n: float(n.occluder is not None),
    "blur": lambda n: n.blur,
    "abs_yaw": lambda n: abs(n.yaw),
    "abs_roll": lambda n: abs(n.roll),
    "noise": lambda n: n.noise,
    "light_strength": lambda n: n.light_strength,
}
# The error rate is also reported among this fraction of least confident pairs.
DEFAULT_LEAST_CONFIDENT = 0.1
# `<id_NNNNN>/<k>.<ext>` at the end of an image path written by the generator.
_IMAGE_PATH = re.compile(r"id_(\d+)[/\\](\d+)\.[A-Za-z]+$")


def image_indices(path: str) -> tuple[int, int]:
    """The (identity index, image index) of a synthetic image from its path.

    Args:
        path: A path ending in `id_<identity>/<image>.jpg`, as the generator writes them.

    Raises:
        DataError: If the path does not end that way.
    """
    match = _IMAGE_PATH.search(path)
    if match is None:
        raise DataError(f"{path} is not a synthetic image (expected a path ending in "
                        f"id_<identity>/<image>.jpg, as sparse_embed.data.synthetic writes)")
    return int(match.group(1)), int(match.group(2))


def recover_nuisances(seed: int, paths: Sequence[str]) -> list[Nuisance]:
    """The nuisance that rendered each synthetic image.

    Args:
        seed: The data set's seed (`synthetic.json`).
        paths: Image paths ending in `id_<identity>/<image>.jpg`.

    Returns:
        One nuisance per path, in order.
    """
    return [sample_nuisance(seed, *image_indices(p)) for p in paths]


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # Start of each run of equal values, and the average rank over the run.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], values.size]
    ranks = np.empty(values.size, np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def spearman(x: Any, y: Any) -> tuple[float, float]:
    """Spearman's rank correlation with ties averaged, and its two-sided p-value.

    The p-value is the t approximation with n - 2 degrees of freedom (as
    `scipy.stats.spearmanr` computes it).

    Args:
        x: float [n].
        y: float [n].

    Returns:
        (rho, p); both NaN when either input is constant.

    Raises:
        ValueError: On inputs of different lengths, fewer than 3 values, or non-finite values.
    """
    from scipy import stats

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size < 3:
        raise ValueError(f"x and y must be 1-D of one length >= 3, got shapes {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("x and y must be finite")
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    norm = math.sqrt(float(np.sum(rx * rx) * np.sum(ry * ry)))
    if norm == 0:
        return float("nan"), float("nan")
    rho = float(np.clip(np.sum(rx * ry) / norm, -1.0, 1.0))
    dof = x.size - 2
    if abs(rho) == 1.0:
        return rho, 0.0
    t = rho * math.sqrt(dof / ((1.0 - rho) * (1.0 + rho)))
    return rho, float(2 * stats.t.sf(abs(t), dof))


def factor_correlations(nuisances: Sequence[Nuisance], confidence: np.ndarray) -> dict[str, dict[str, float]]:
    """Spearman's rho (and p) between each factor of `FACTORS` and the confidence.

    Args:
        nuisances: Each image's nuisance.
        confidence: float [n], each image's confidence (higher = more trusted).

    Returns:
        Factor name -> {"rho", "p", "mean_factor"}.
    """
    out = {}
    for name, factor in FACTORS.items():
        values = np.array([factor(n) for n in nuisances], np.float64)
        rho, p = spearman(values, confidence)
        out[name] = {"rho": rho, "p": p, "mean_factor": float(values.mean())}
    return out


def error_prediction(scores: np.ndarray, issame: np.ndarray, pair_confidence: np.ndarray,
                     least_confident: float = DEFAULT_LEAST_CONFIDENT) -> dict[str, float]:
    """How well the pair confidence predicts wrong decisions at the most accurate threshold.

    Args:
        scores: float [n] pair scores, higher = more similar.
        issame: bool [n].
        pair_confidence: float [n], the smaller of each pair's two image confidences.
        least_confident: The fraction of least confident pairs whose error rate is reported.

    Returns:
        `accuracy`, `threshold`, `confidence_auroc` (PE's: AUROC of confidence for
        "decided right"; 0.5 is chance), `error_rate` over all pairs and
        `error_rate_least_confident` among the `least_confident` fraction.

    Raises:
        ValueError: If `least_confident` is not in (0, 1].
    """
    from sparse_embed.metrics.uncertainty import confidence_order, verification_confidence_metrics

    if not 0 < least_confident <= 1:
        raise ValueError(f"least_confident must lie in (0, 1], got {least_confident}")
    figures = verification_confidence_metrics(scores, issame, pair_confidence)
    wrong = (scores >= figures["threshold"]) != issame
    # The documented tie rule of the confidence metrics decides which tied pairs come first.
    lowest = confidence_order(pair_confidence)[::-1][:max(1, round(least_confident * scores.size))]
    return {"accuracy": figures["max_accuracy"], "threshold": figures["threshold"],
            "confidence_auroc": figures["confidence_auroc"], "error_rate": float(wrong.mean()),
            "error_rate_least_confident": float(wrong[lowest].mean())}


def nuisance_report(embeddings_path: str | Path, data_dir: str | Path,
                    least_confident: float = DEFAULT_LEAST_CONFIDENT) -> dict[str, Any]:
    """Per-factor correlations and error prediction of one embedding file over synthetic data.

    Args:
        embeddings_path: HDF5 file written by `sparse_embed.embed` from a run with a confidence.
        data_dir: The synthetic data directory (`synthetic.json`, `pairs.txt`, `test/`).
        least_confident: See `error_prediction`.

    Returns:
        {"images", "seed", "factors": factor -> {rho, p, mean_factor}, "pairs": {...}}.

    Raises:
        DataError: If the file has no confidence, the data directory is not
            synthetic, or a pair's image is not in the file.
    """
    from sparse_embed.data.embeddings import read_hdf5
    from sparse_embed.data.verification import read_pairs

    data_dir = Path(data_dir)
    meta_path = data_dir / "synthetic.json"
    if not meta_path.is_file():
        raise DataError(f"{data_dir} has no synthetic.json; pass the directory written by "
                        f"python -m sparse_embed.data.synthetic")
    seed = int(json.loads(meta_path.read_text())["seed"])
    emb = read_hdf5(embeddings_path)
    if emb.confidence is None:
        raise DataError(f"{embeddings_path} has no confidence; embed a probabilistic run "
                        f"(model.distribution gaussian or vmf)")
    keys = [image_indices(f) for f in emb.filename]
    factors = factor_correlations([sample_nuisance(seed, *k) for k in keys], emb.confidence)

    row = {k: i for i, k in enumerate(keys)}
    pairs = read_pairs(data_dir / "pairs.txt", data_dir / "test")
    try:
        left = np.array([row[image_indices(p)] for p in pairs.left])
        right = np.array([row[image_indices(p)] for p in pairs.right])
    except KeyError as e:
        raise DataError(f"image {e.args[0]} (identity, index) of {data_dir / 'pairs.txt'} is not in "
                        f"{embeddings_path}; embed the run's pairs (embed --model_dir=RUN)") from None
    mean = emb.embedding / np.maximum(np.linalg.norm(emb.embedding, axis=1, keepdims=True), 1e-12)
    scores = np.sum(mean[left] * mean[right], axis=1)
    pair_confidence = np.minimum(emb.confidence[left], emb.confidence[right])
    return {"images": len(keys), "seed": seed, "factors": factors,
            "pairs": {"count": len(pairs), "least_confident": least_confident,
                      **error_prediction(scores, pairs.issame, pair_confidence, least_confident)}}


DESCRIPTION = ("Synthetic faces: Spearman's rho between each image's known nuisance (occlusion, "
               "blur, pose, noise, lighting) and its predicted confidence, and how well the "
               "confidence predicts verification errors.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declares the options of `evaluate nuisance` on `parser`.

    Args:
        parser: The sub-command's parser.
    """
    parser.add_argument("--embeddings", required=True,
                        help="HDF5 file written by sparse_embed.embed from a run with a confidence, "
                             "holding (at least) the images of the data's pairs.txt.")
    parser.add_argument("--data_dir", required=True,
                        help="Synthetic data directory (synthetic.json, pairs.txt, test/).")
    parser.add_argument("--least_confident", type=float, default=DEFAULT_LEAST_CONFIDENT,
                        help="Fraction of least confident pairs whose error rate is reported "
                             "(default: %(default)s).")
    parser.add_argument("--output", help="JSON file of the figures.")


def run_command(args: argparse.Namespace) -> None:
    """Runs `evaluate nuisance`: prints the two tables, writes JSON.

    Args:
        args: The options `add_arguments` declares, parsed.
    """
    from sparse_embed.fileio import atomic_path

    if not 0 < args.least_confident <= 1:
        raise DataError(f"--least_confident must lie in (0, 1], got {args.least_confident}")
    report = nuisance_report(args.embeddings, args.data_dir, args.least_confident)
    print(f"{report['images']} images; rho < 0: confidence falls as the factor rises")
    print(format_results(report["factors"]), end="")
    print(format_results({"pairs": report["pairs"]}), end="")
    if args.output:
        with atomic_path(args.output) as tmp:
            tmp.write_text(json.dumps({"embeddings": str(args.embeddings),
                                       "data_dir": str(args.data_dir), **report}, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sparse_embed.evaluate nuisance`."""
    parser = make_parser(f"{DESCRIPTION}\n\n{examples(__doc__)}",
                         "python -m sparse_embed.evaluate nuisance")
    add_arguments(parser)
    return parser


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """`python -m sparse_embed.evaluate nuisance ...`.

    Args:
        argv: Arguments after the sub-command; None reads sys.argv.
    """
    run_command(build_parser().parse_args(argv))
