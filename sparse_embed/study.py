"""Studies that train a grid of models and compare them: the paper's FLOPs-versus-accuracy trade-off,
and probabilistic embeddings on the synthetic faces.

    python -m sparse_embed.study flops_tradeoff --output=runs/study       (what `make study` runs)
    # a quicker, coarser grid with fewer distractors
    python -m sparse_embed.study flops_tradeoff --output=runs/study_quick --steps=200 \\
        --weights_flops=15,50 --weights_l1=0.1,0.6 --distractor_identities=200 \\
        --results=results/study_quick.json
    python -m sparse_embed.study pe_confidence --output=runs/pe --data_dir=runs/pe/data \\
        --methods=arcface,dul_cls,pfe,scf,dul_reg --seeds=3 --results=results/pe_synthetic.json

`flops_tradeoff` is the central experiment of Paria et al. (ICLR 2020) on the
synthetic identities: models that differ only in the sparsity regularizer
(FLOPs or L1) and its weight, plus the dense baseline, each trained from the
packaged `synthetic/sparse_flops` / `synthetic/dense` configs. Every model
embeds the held-out identities (the probes, whose verification pairs also give
the accuracy) and a distractor set of further synthetic identities (disjoint
from training and probes), and is measured for mean nnz, analytic FLOPs per
pair and R_sub (`sparse_embed.sparsity`), postings touched per query and
search ms/query (`SparseIndex` on the distractor search), and identification
Recall@1 without and with re-ranking by the dense baseline's embeddings of the
same images (the original protocol: sparse candidates above `--score_threshold`,
the best `--rerank_topk` re-scored densely).

Each model is a run directory under `--output`; one whose `study.json` matches
the current settings is skipped, an unfinished one resumes from its
checkpoints. The study ends with a table, `<out>/flops_tradeoff.json` and two
PNGs: Recall@1 against FLOPs per pair, and the sorted per-dimension non-zero
probability p_j of the FLOPs and L1 models closest in mean nnz. It also writes
a result file (`--results`, by default `results/study.json`; see
`sparse_embed.results`) with the command, commit and machine, holding the
models' table and one table for each of the paper's two claims (`claims`):
(a) R_sub of each FLOPs model beside the L1 model closest in mean nnz, and
(b) Recall@1 of each FLOPs model beside the L1 curve's at the same FLOPs per
pair.

`pe_confidence` trains methods of "Probabilistic Embeddings Revisited" from
their packaged `synthetic/pe_*` configs at a small scale (`PE_DATA`), each
with several seeds (`experiment seeds`; a stage 2 starts from the first
ArcFace seed), tabulates accuracy, confidence AUROC and AURCC (mean and
standard deviation over seeds), and asks of each method with a confidence
whether it falls as the image's known nuisances rise (`evaluate nuisance`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sparse_embed.cli import add_command, deprecated_alias, make_parser, program, user_errors_exit
from sparse_embed.errors import ConfigError, DataError
from sparse_embed.fileio import atomic_path
from sparse_embed.registry import Registry
from sparse_embed.results import Column, write_result

# Study name -> its command line (`python -m sparse_embed.study NAME [flags]`): a function that
# declares the study's flags on its sub-command's parser, and one that runs it from the parsed flags.


@dataclass(frozen=True)
class StudyCommand:
    """A study's command line.

    Attributes:
        add_flags: Declares the study's flags on its parser.
        run: Runs the study from the parsed flags.
    """

    add_flags: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


STUDIES: Registry[StudyCommand] = Registry("study")

# The dense baseline and the sparse models start from the demo's two configs;
# a sparse model overrides only the regularizer and its weight.
DENSE_CONFIG = "synthetic/dense"
SPARSE_CONFIG = "synthetic/sparse_flops"
DENSE = "none"
# Size of the data set generated when --data_dir has none: the demo's.
DEMO_DATA = {"num_identities": 500, "images_per_identity": 20, "num_test_identities": 100}
RESULT_FILE = "study.json"
TABLE_FILE = "flops_tradeoff.json"
TRADEOFF_PLOT = "flops_tradeoff.png"
DIMENSION_PLOT = "dimension_probability.png"


@dataclass(frozen=True)
class GridModel:
    """One model of the study grid.

    Attributes:
        regularizer: `flops`, `l1` or `none` (the dense baseline).
        weight: sparsity.weight (0 for the dense baseline).
    """

    regularizer: str
    weight: float

    @property
    def name(self) -> str:
        """The run directory's name, e.g. `flops_w15`, `l1_w0.3`, `dense`."""
        return "dense" if self.regularizer == DENSE else f"{self.regularizer}_w{self.weight:g}"

    @property
    def label(self) -> str:
        """How progress lines and plots name it."""
        return "dense" if self.regularizer == DENSE else f"{self.regularizer} w={self.weight:g}"


@dataclass(frozen=True)
class StudySettings:
    """What the numbers of a finished model depend on besides its training.

    Attributes:
        distractor_identities: Synthetic identities of the distractor set.
        distractor_images: Images per distractor identity.
        threshold: Sparse candidates must score strictly above it.
        rerank_topk: Sparse candidates re-scored with the dense embeddings.
    """

    distractor_identities: int = 600
    distractor_images: int = 5
    threshold: float = 0.25
    rerank_topk: int = 1000


def grid(weights_flops: Sequence[float], weights_l1: Sequence[float]) -> list[GridModel]:
    """The dense baseline first (the others re-rank with it), then FLOPs and L1 models by weight.

    Args:
        weights_flops: Weights of the FLOPs-regularized models.
        weights_l1: Weights of the L1-regularized models.

    Raises:
        ConfigError: If a weight is negative, not finite or repeated.
    """
    models = [GridModel(DENSE, 0.0)]
    for regularizer, weights in (("flops", weights_flops), ("l1", weights_l1)):
        if len(set(weights)) != len(weights):
            raise ConfigError(f"--weights_{regularizer} repeats a weight: {list(weights)}")
        for w in sorted(weights):
            if not math.isfinite(w) or w < 0:
                raise ConfigError(f"--weights_{regularizer} must be finite numbers >= 0, got {w}")
            models.append(GridModel(regularizer, float(w)))
    return models


def model_config(model: GridModel, steps: int, overrides: Sequence[str] = ()) -> Any:
    """The config of one grid model: the packaged config, its regularizer, `steps` and `overrides`.

    The regularizer's quadratic warm-up keeps the packaged proportion of the
    run (half of it), so a shorter study sparsifies as the demo does.

    Args:
        model: The grid model.
        steps: Training steps.
        overrides: Further `key.path=value` overrides, applied to every model.

    Returns:
        The resolved `Config`.
    """
    from sparse_embed.config import load_config

    if steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
    schedule = [f"train.steps={steps}"]
    if model.regularizer == DENSE:
        return load_config(DENSE_CONFIG, [*schedule, *overrides])
    return load_config(SPARSE_CONFIG, [
        *schedule, f"sparsity.type={model.regularizer}", f"sparsity.weight={model.weight!r}",
        f"sparsity.warmup_steps={steps // 2}", *overrides])


def prepare_data(data_dir: Path) -> dict[str, Any]:
    """Generates the demo's synthetic data set and TFRecords in `data_dir` unless they are there.

    Args:
        data_dir: The data directory (train/, test/, pairs.txt, tfrecords/).

    Returns:
        Its synthetic.json parameters.
    """
    meta = data_dir / "synthetic.json"
    if not meta.is_file():
        from sparse_embed.data.synthetic import generate

        generate(data_dir, DEMO_DATA["num_identities"], DEMO_DATA["images_per_identity"],
                 DEMO_DATA["num_test_identities"], seed=0, workers=2)
    if not (data_dir / "tfrecords" / "labels.txt").is_file():
        from sparse_embed.data.tfrecord import build_tfrecords

        build_tfrecords(data_dir / "train", data_dir / "tfrecords", name="train", num_shards=8,
                        num_workers=2, seed=0)
    try:
        return json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{meta} is not a synthetic.json ({e}); point --data_dir at a synthetic "
                        f"data set") from e


def prepare_distractors(data: dict[str, Any], out: Path, identities: int, images: int) -> Path:
    """Renders the distractor images: identities after the data set's training and test ones.

    Identity indices continue after the data set's (`num_identities +
    num_test_identities` on), with its seed and image size, so no distractor
    is a training identity or a probe. Reused when already rendered.

    Args:
        data: The data set's synthetic.json parameters.
        out: Study output directory; the images go to `out/distractors/id_NNNNN/K.jpg`.
        identities: Distractor identities.
        images: Images per distractor identity.

    Returns:
        The distractor image folder.
    """
    from sparse_embed.data.synthetic import encode_jpeg, identity_name, render_image

    if identities < 1 or images < 1:
        raise ConfigError(f"--distractor_identities and --distractor_images must be at least 1, "
                          f"got {identities} and {images}")
    first = int(data["num_identities"]) + int(data["num_test_identities"])
    wanted = {"seed": data["seed"], "image_size": data["image_size"], "first_identity": first,
              "identities": identities, "images_per_identity": images}
    folder = out / "distractors"
    meta = folder / "distractors.json"
    if meta.is_file() and json.loads(meta.read_text()) == wanted:
        return folder
    with atomic_path(folder) as tmp:
        for i in range(first, first + identities):
            (tmp / identity_name(i)).mkdir(parents=True)
            for k in range(images):
                pixels = render_image(data["seed"], i, k, data["image_size"])
                (tmp / identity_name(i) / f"{k}.jpg").write_bytes(encode_jpeg(pixels))
        (tmp / "distractors.json").write_text(json.dumps(wanted, indent=2) + "\n")
    return folder


def image_list(root: Path) -> tuple[list[str], list[int]]:
    """The images of a folder-per-identity tree, labelled by global identity index (`id_00042` -> 42).

    Probes and distractors then never share a label.

    Args:
        root: Folder with one `id_NNNNN` sub-folder per identity.
    """
    from sparse_embed.data import image_folder

    paths, labels, names = image_folder(root)
    try:
        index = [int(name.removeprefix("id_")) for name in names]
    except ValueError as e:
        raise DataError(f"{root} holds a folder not named id_NNNNN ({e}); point --data_dir at a "
                        f"synthetic data set") from e
    return paths, [index[label] for label in labels]


def embed_images(backbone: Any, config: Any, paths: Sequence[str], labels: Sequence[int]) -> Any:
    """Embeds image files with the run's eval settings (batch size, flip mode).

    Args:
        backbone: images -> embeddings.
        config: The run config.
        paths: Image files.
        labels: One label per file.

    Returns:
        `Embeddings`, in the order of `paths`.

    Raises:
        DataError: If an image does not decode.
    """
    from sparse_embed.data.pipeline import files_dataset, missing_paths
    from sparse_embed.inference import embed_dataset

    dataset = files_dataset(paths, labels, config.eval.batch_size, config.model.input_shape)
    embedded = embed_dataset(backbone, dataset, config.eval.flip, total=len(paths))
    unreadable = missing_paths(paths, embedded.filename)
    if unreadable:
        raise DataError(f"{len(unreadable)} image(s) do not decode, first: {unreadable[0]}; "
                        f"delete the folder to render it again")
    return embedded


def measure_model(config: Any, probes: Any, distractors: Any, dense_probes: Any,
                  dense_distractors: Any, settings: StudySettings) -> dict[str, Any]:
    """Sparsity and identification figures of one model's embeddings.

    Args:
        config: The model's run config (its zero threshold).
        probes: `Embeddings` of the held-out identities' images.
        distractors: `Embeddings` of the distractor images.
        dense_probes: The dense baseline's `Embeddings` of the same probe images.
        dense_distractors: The dense baseline's `Embeddings` of the same distractor images.
        settings: Threshold and re-ranking depth.

    Returns:
        mean_nnz, flops_per_pair, r_sub, p_j (over probes and distractors together),
        recall@1, recall@1_rerank, postings_per_query, candidates_per_query and
        search_ms_per_query (of the sparse search over every distractor).
    """
    from sparse_embed.metrics.identification import evaluate_identification
    from sparse_embed.metrics.sparsity import sparsity_profile

    zero_threshold = config.sparsity.zero_threshold
    profile = sparsity_profile(np.concatenate([probes.embedding, distractors.embedding]),
                               zero_threshold)
    stats = profile.stats()
    n = len(distractors.embedding)
    result = evaluate_identification(
        probes, distractors, dense_probes=dense_probes, dense_distractors=dense_distractors,
        threshold=settings.threshold, rerank_topk=settings.rerank_topk, ranks=(1,),
        distractor_counts=(n,), zero_threshold=zero_threshold, num_threads=1, seed=0)
    rows = {row["method"]: row for row in result["rows"] if row["distractors"] == n}
    sparse, rerank = rows["sparse"], rows["sparse+rerank"]
    return {
        "mean_nnz": stats["nnz"],
        "flops_per_pair": stats["flops"],
        "r_sub": stats["r_sub"],
        "postings_per_query": float(sparse["postings_per_query"]),
        "candidates_per_query": float(sparse["candidates_per_query"]),
        "recall@1": float(sparse["recall@1"]),
        "recall@1_rerank": float(rerank["recall@1"]),
        "search_ms_per_query": float(sparse["ms_per_query"]),
        "p_j": profile.nonzero_fraction.tolist(),
    }


def _changed_key(saved: Any, wanted: Any) -> str | None:
    """The first dotted config key whose value differs between two configs, or None."""
    from sparse_embed.config import config_to_dict

    def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        items: dict[str, Any] = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                items.update(flat(value, f"{prefix}{key}."))
            else:
                items[prefix + key] = value
        return items

    a, b = flat(config_to_dict(saved)), flat(config_to_dict(wanted))
    return next((f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in sorted(a.keys() | b.keys())
                 if a.get(k) != b.get(k)), None)


def _check_run(run_dir: Path, config: Any) -> None:
    """Refuses to resume a run dir that was trained with another config."""
    from sparse_embed.config import config_from_model_dir

    if not (run_dir / "config.yaml").is_file():
        return
    changed = _changed_key(config_from_model_dir(run_dir), config)
    if changed is not None:
        raise ConfigError(f"{run_dir} was trained with another config ({changed}); pass another "
                          f"--output or remove {run_dir}")


def _finished(run_dir: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The saved result of a run measured with `settings`, or None."""
    path = run_dir / RESULT_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved if saved.get("settings") == settings else None


def matched_pair(rows: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The FLOPs and L1 rows whose mean nnz are closest (relative difference), or None.

    Args:
        rows: Result rows with `regularizer` and `mean_nnz`.
    """
    candidates = [(f, l1) for f in rows if f["regularizer"] == "flops"
                  for l1 in rows if l1["regularizer"] == "l1"]
    if not candidates:
        return None
    # Ratio, not difference: nnz 10 against 20 is as far apart as 100 against 200.
    return min(candidates, key=lambda pair: abs(math.log(max(pair[0]["mean_nnz"], 1e-9)
                                                         / max(pair[1]["mean_nnz"], 1e-9))))


TABLE_COLUMNS = (("mean_nnz", "nnz", ".1f"), ("flops_per_pair", "FLOPs/pair", ".3g"),
                 ("postings_per_query", "postings/q", ".4g"), ("r_sub", "R_sub", ".3f"),
                 ("accuracy", "accuracy", ".4f"), ("recall@1", "R@1", ".4f"),
                 ("recall@1_rerank", "R@1 rerank", ".4f"), ("search_ms_per_query", "ms/query", ".3f"))


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The study's summary table, one model per line.

    Args:
        rows: Result rows (`model` and the `TABLE_COLUMNS` keys).
    """
    first = max(5, *(len(r["model"]) for r in rows))
    widths = [max(10, len(title)) for _, title, _ in TABLE_COLUMNS]
    head = f"{'model':<{first}}" + "".join(
        f"  {title:>{w}}" for (_, title, _), w in zip(TABLE_COLUMNS, widths, strict=True))
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<{first}}" + "".join(
            f"  {r[key]:>{w}{fmt}}" for (key, _, fmt), w in zip(TABLE_COLUMNS, widths, strict=True)))
    return "\n".join(lines) + "\n"


def _nearest_l1(row: dict[str, Any], l1_rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    # Ratio, as matched_pair: the L1 model closest in mean nnz.
    return min(l1_rows, key=lambda l1: abs(math.log(max(row["mean_nnz"], 1e-9)
                                                    / max(l1["mean_nnz"], 1e-9))))


def _l1_curve_at(flops: float, l1_rows: Sequence[dict[str, Any]], key: str) -> float | None:
    """The L1 models' `key` at `flops` FLOPs per pair: linear in log FLOPs between the two L1
    models around it; None outside the L1 models' range."""
    points = sorted((r["flops_per_pair"], r[key]) for r in l1_rows if r["flops_per_pair"] > 0)
    if flops <= 0 or not points or not points[0][0] <= flops <= points[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= flops <= x1:
            if x1 == x0:
                return max(y0, y1)
            t = (math.log(flops) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return points[0][1]  # a single L1 model, at exactly its FLOPs


def claims(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The figures behind the paper's two claims, one row per FLOPs model.

    (a) "R_sub of the FLOPs models is close to 1 and well below L1's": `r_sub`
    pairs each FLOPs model with the L1 model closest in mean nnz (by ratio)
    and gives both R_sub and both busiest dimensions (`max_p_j`, when the rows
    carry it). (b) "FLOPs models dominate L1 ones on the Recall-vs-FLOPs
    curve": `curve` gives each FLOPs model's Recall@1 (and re-ranked) beside the
    L1 curve's at the same FLOPs per pair (linear in log FLOPs between the two
    L1 models around it; None outside their range), and the difference.

    Args:
        rows: Result rows with `model`, `regularizer`, `mean_nnz`, `flops_per_pair`,
            `r_sub`, `recall@1` and `recall@1_rerank`.

    Returns:
        {"r_sub": [...], "curve": [...]}; both empty without FLOPs and L1 models.
    """
    flops_rows = [r for r in rows if r["regularizer"] == "flops"]
    l1_rows = [r for r in rows if r["regularizer"] == "l1"]
    if not flops_rows or not l1_rows:
        return {"r_sub": [], "curve": []}
    r_sub, curve = [], []
    for row in flops_rows:
        l1 = _nearest_l1(row, l1_rows)
        r_sub.append({"flops": row["model"], "flops_nnz": row["mean_nnz"], "flops_r_sub": row["r_sub"],
                      "flops_max_p_j": row.get("max_p_j"), "l1": l1["model"], "l1_nnz": l1["mean_nnz"],
                      "l1_r_sub": l1["r_sub"], "l1_max_p_j": l1.get("max_p_j")})
        entry = {"flops": row["model"], "flops_per_pair": row["flops_per_pair"]}
        for key, name in (("recall@1", "recall@1"), ("recall@1_rerank", "rerank")):
            l1_value = _l1_curve_at(row["flops_per_pair"], l1_rows, key)
            entry[name] = row[key]
            entry[f"l1_{name}"] = l1_value
            entry[f"{name}_minus_l1"] = None if l1_value is None else row[key] - l1_value
        curve.append(entry)
    return {"r_sub": r_sub, "curve": curve}


MODEL_COLUMNS = (Column("model", "model"),) + tuple(
    Column(key, title, fmt) for key, title, fmt in TABLE_COLUMNS)
R_SUB_COLUMNS = (Column("flops", "FLOPs model"), Column("flops_nnz", "nnz", ".1f"),
                 Column("flops_r_sub", "R_sub", ".3f"), Column("flops_max_p_j", "max p_j", ".3f"),
                 Column("l1", "L1 model, nearest nnz"), Column("l1_nnz", "nnz", ".1f"),
                 Column("l1_r_sub", "R_sub", ".3f"), Column("l1_max_p_j", "max p_j", ".3f"))
CURVE_COLUMNS = (Column("flops", "FLOPs model"), Column("flops_per_pair", "FLOPs/pair", ".3g"),
                 Column("recall@1", "R@1", ".4f"), Column("l1_recall@1", "L1 R@1 there", ".4f"),
                 Column("recall@1_minus_l1", "difference", "+.4f"),
                 Column("rerank", "R@1 rerank", ".4f"), Column("l1_rerank", "L1 there", ".4f"),
                 Column("rerank_minus_l1", "difference", "+.4f"))


def write_study_result(document: dict[str, Any], path: str | Path, command: str | None = None) -> Path:
    """Writes the study's result file: the models' table and the two claims' tables.

    Args:
        document: What `flops_tradeoff` returns.
        path: The JSON file, e.g. `results/study.json`.
        command: The command to record; None records the running one.

    Returns:
        The path written.
    """
    settings = document["settings"]
    found = claims(document["models"])
    notes = (f"{len(document['models'])} models trained {settings['steps']} steps each on the synthetic "
             f"identities of {settings['data_dir']}; {settings['probes']} probe images, "
             f"{settings['distractors']} distractors; sparse candidates above "
             f"{settings['threshold']}, the best {settings['rerank_topk']} re-ranked with the dense "
             f"baseline's embeddings. ms/query: one thread. L1 there: the L1 models' curve at the "
             f"same FLOPs per pair, linear in log FLOPs; - outside their range.")
    return write_result(path, "FLOPs-versus-accuracy study: FLOPs and L1 regularizers against a dense "
                              "baseline", {"models": (MODEL_COLUMNS, document["models"]),
                                           "r_sub": (R_SUB_COLUMNS, found["r_sub"]),
                                           "curve": (CURVE_COLUMNS, found["curve"])},
                        command=command, notes=notes)


def flops_tradeoff(data_dir: str | Path, out: str | Path, weights_flops: Sequence[float],
                   weights_l1: Sequence[float], steps: int, settings: StudySettings | None = None,
                   overrides: Sequence[str] = (), verbose: int = 0,
                   results: str | Path | None = None) -> dict[str, Any]:
    """Trains and measures the grid, writes `<out>/flops_tradeoff.json` and the two plots.

    Args:
        data_dir: Synthetic data set with TFRecords (generated at the demo's size if missing).
        out: Output directory: one run dir per model, the distractor images, JSON, PNGs.
        weights_flops: Weights of the FLOPs-regularized models.
        weights_l1: Weights of the L1-regularized models.
        steps: Training steps of every model.
        settings: Distractor set, threshold and re-ranking depth; None: the defaults.
        overrides: `key.path=value` config overrides applied to every model.
        verbose: Training output: 0 silent, 1 progress bar, 2 a line every log_every steps.
        results: Also write the result file (`write_study_result`) there; None: not.

    Returns:
        The JSON document: `settings`, `models` (one row per model, with
        `max_p_j`, the busiest dimension's non-zero fraction), `matched_nnz`
        (the FLOPs and L1 models of the p_j plot).
    """
    from sparse_embed.data.embeddings import read_hdf5, write_hdf5
    from sparse_embed.data.verification import read_pairs
    from sparse_embed.inference import evaluate_verification, load_backbone
    from sparse_embed.plots import plot_dimension_probability, plot_flops_tradeoff
    from sparse_embed.training.trainer import train

    settings = settings or StudySettings()
    data_dir, out = Path(data_dir), Path(out)
    models = grid(weights_flops, weights_l1)
    configs = {m: model_config(m, steps, overrides) for m in models}
    data = prepare_data(data_dir)
    distractor_dir = prepare_distractors(data, out, settings.distractor_identities,
                                         settings.distractor_images)
    probe_list, distractor_list = image_list(data_dir / "test"), image_list(distractor_dir)
    # What a saved result depends on beyond its run's config (checked by _check_run).
    measured_with = {"data_dir": str(data_dir), "probes": len(probe_list[0]),
                     "distractors": len(distractor_list[0]), "threshold": settings.threshold,
                     "rerank_topk": settings.rerank_topk}
    pairs = None
    dense: tuple[Any, Any] | None = None
    rows: list[dict[str, Any]] = []
    p_j: dict[str, np.ndarray] = {}
    for position, model in enumerate(models, 1):
        run_dir, config = out / model.name, configs[model]
        prefix = f"[{position}/{len(models)}] {model.label}:"
        _check_run(run_dir, config)
        result = _finished(run_dir, measured_with)
        if result is not None:
            print(f"{prefix} skipped, finished in {run_dir}", flush=True)
        else:
            start = time.perf_counter()
            trained = train(config, data_dir, run_dir, verbose=verbose)
            train_seconds = time.perf_counter() - start
            backbone, _ = load_backbone(run_dir)
            probes = embed_images(backbone, config, *probe_list)
            distractors = embed_images(backbone, config, *distractor_list)
            write_hdf5(run_dir / "probes.hdf5", probes)
            write_hdf5(run_dir / "distractors.hdf5", distractors)
            if dense is None:
                # The dense baseline comes first, so its files exist from here on.
                dense = (read_hdf5(out / models[0].name / "probes.hdf5"),
                         read_hdf5(out / models[0].name / "distractors.hdf5"))
            if pairs is None:
                pairs = read_pairs(data_dir / config.data.pairs, data_dir / config.data.pairs_images)
            verification, _ = evaluate_verification(backbone, config, pairs)
            result = {
                "settings": measured_with,
                "row": {"model": model.name, "regularizer": model.regularizer,
                        "weight": model.weight, "steps": trained.step,
                        "embedding_size": int(probes.embedding.shape[1]),
                        "accuracy": float(verification["accuracy"]),
                        **measure_model(config, probes, distractors, *dense, settings)},
            }
            with atomic_path(run_dir / RESULT_FILE) as tmp:
                tmp.write_text(json.dumps(result, indent=1))
            row = result["row"]
            print(f"{prefix} trained {trained.step - trained.resumed_from} steps in "
                  f"{train_seconds:.0f} s, nnz {row['mean_nnz']:.1f}, FLOPs/pair "
                  f"{row['flops_per_pair']:.3g}, R_sub {row['r_sub']:.3f}, accuracy "
                  f"{row['accuracy']:.4f}, R@1 {row['recall@1']:.4f} (re-ranked "
                  f"{row['recall@1_rerank']:.4f}), {run_dir}", flush=True)
        row = dict(result["row"])
        p_j[model.name] = np.asarray(row.pop("p_j"))
        row["max_p_j"] = float(p_j[model.name].max(initial=0.0))
        rows.append(row)

    matched = matched_pair(rows)
    document: dict[str, Any] = {"settings": {**measured_with, "steps": steps}, "models": rows,
                                "matched_nnz": None}
    plot_flops_tradeoff(rows, out / TRADEOFF_PLOT,
                        title=f"Synthetic identities, {measured_with['distractors']} distractors")
    if matched is not None:
        flops_row, l1_row = matched
        document["matched_nnz"] = {"flops": flops_row["model"], "l1": l1_row["model"]}
        plot_dimension_probability(
            {f"FLOPs w={flops_row['weight']:g} (nnz {flops_row['mean_nnz']:.1f}, R_sub "
             f"{flops_row['r_sub']:.2f})": p_j[flops_row["model"]],
             f"L1 w={l1_row['weight']:g} (nnz {l1_row['mean_nnz']:.1f}, R_sub "
             f"{l1_row['r_sub']:.2f})": p_j[l1_row["model"]]},
            out / DIMENSION_PLOT, title="Non-zero probability per dimension at matched mean nnz")
    with atomic_path(out / TABLE_FILE) as tmp:
        tmp.write_text(json.dumps(document, indent=2))
    print("\n" + format_table(rows))
    written = [str(out / name) for name in
               [TABLE_FILE, TRADEOFF_PLOT] + ([DIMENSION_PLOT] if matched is not None else [])]
    if results is not None:
        written.append(str(write_study_result(document, results)))
    print("wrote " + ", ".join(written))
    return document


def _weights(values: Sequence[str], flag: str) -> list[float]:
    try:
        return [float(v) for v in values]
    except ValueError as e:
        raise ConfigError(f"--{flag} must be a comma-separated list of numbers, got "
                          f"{','.join(values)}") from e


def _flops_tradeoff_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="runs/study",
                        help="Output directory: one run dir per model, JSON, PNGs.")
    deprecated_alias(parser, "--out", "--output")
    parser.add_argument("--data_dir", default="runs/demo/data",
                        help="Synthetic data set with TFRecords (the demo's); generated there at the "
                             "demo's size if missing.")
    parser.add_argument("--steps", type=int, default=500, help="Training steps of every model.")
    parser.add_argument("--weights_flops", default="5,15,30,50,150",
                        help="sparsity.weight of the FLOPs-regularized models (comma list).")
    parser.add_argument("--weights_l1", default="0.01,0.03,0.1,0.3,0.6,1",
                        help="sparsity.weight of the L1-regularized models (comma list).")
    parser.add_argument("--distractor_identities", type=int, default=StudySettings.distractor_identities,
                        help="Synthetic identities of the distractor set (after the training and test ones).")
    parser.add_argument("--distractor_images", type=int, default=StudySettings.distractor_images,
                        help="Images per distractor identity.")
    parser.add_argument("--score_threshold", type=float, default=StudySettings.threshold,
                        help="Sparse candidates must score above it (the original --threshold).")
    deprecated_alias(parser, "--threshold", "--score_threshold")
    parser.add_argument("--rerank_topk", type=int, default=StudySettings.rerank_topk,
                        help="Sparse candidates re-scored with the dense embeddings.")
    parser.add_argument("--set", action="append", default=[],
                        help="Config override for every model, key.path=value (repeatable).")
    parser.add_argument("--results", default="results/study.json",
                        help="Result file with the command, commit and machine (sparse_embed.results); "
                             "empty: none (default: %(default)s).")


def _run_flops_tradeoff(args: argparse.Namespace) -> None:
    settings = StudySettings(args.distractor_identities, args.distractor_images, args.score_threshold,
                             args.rerank_topk)
    flops_tradeoff(args.data_dir, args.output, _weights(args.weights_flops.split(","), "weights_flops"),
                   _weights(args.weights_l1.split(","), "weights_l1"), args.steps, settings, args.set,
                   verbose=1 if sys.stdout.isatty() else 2, results=args.results or None)


STUDIES.register("flops_tradeoff")(StudyCommand(_flops_tradeoff_flags, _run_flops_tradeoff))


# --- pe_confidence: probabilistic embeddings on the synthetic faces --------------------------------

# Method -> (packaged config, whether it is a stage 2 that starts from the first ArcFace seed).
PE_METHODS = {"arcface": ("synthetic/pe_arcface", False), "dul_cls": ("synthetic/pe_dul_cls", False),
              "hib": ("synthetic/pe_hib", False), "vmf_loss": ("synthetic/pe_vmf_loss", False),
              "pfe": ("synthetic/pe_pfe", True), "scf": ("synthetic/pe_scf", True),
              "dul_reg": ("synthetic/pe_dul_reg", True)}
PE_STAGE1 = "arcface"
# The data set generated when --data_dir has none: small enough that a method's three seeds train
# in minutes on 2 CPU cores.
PE_DATA = {"num_identities": 150, "images_per_identity": 16, "num_test_identities": 60,
           "image_size": 64, "pairs_folds": 10, "pairs_per_fold": 100}
PE_SEEDS_COLUMNS = (Column("method", "method"), Column("n", "seeds"),
                    Column("accuracy", "accuracy", ".4f"), Column("accuracy_std", "± std", ".4f"),
                    Column("confidence_auroc", "confidence AUROC", ".3f"),
                    Column("confidence_auroc_std", "± std", ".3f"),
                    Column("confidence_aurcc", "AURCC", ".4f"),
                    Column("confidence_aurcc_std", "± std", ".4f"))
PE_NUISANCE_COLUMNS = (Column("method", "method"), Column("occluded", "occluded ρ", "+.3f"),
                       Column("blur", "blur ρ", "+.3f"), Column("abs_yaw", "abs yaw ρ", "+.3f"),
                       Column("abs_roll", "abs roll ρ", "+.3f"), Column("noise", "noise ρ", "+.3f"),
                       Column("light_strength", "lighting ρ", "+.3f"),
                       Column("confidence_auroc", "error AUROC", ".3f"),
                       Column("error_rate", "error rate", ".3f"),
                       Column("error_rate_least_confident", "error, least confident 10%", ".3f"))


def prepare_pe_data(data_dir: Path) -> None:
    """Generates the pe_confidence data set and its TFRecords unless `data_dir` has them.

    Args:
        data_dir: Where the synthetic data set lives (or is written).
    """
    from sparse_embed.data.synthetic import generate
    from sparse_embed.data.tfrecord import build_tfrecords

    if not (data_dir / "synthetic.json").is_file():
        generate(data_dir, PE_DATA["num_identities"], PE_DATA["images_per_identity"],
                 PE_DATA["num_test_identities"], seed=0, image_size=PE_DATA["image_size"], workers=1,
                 pairs_folds=PE_DATA["pairs_folds"], pairs_per_fold=PE_DATA["pairs_per_fold"])
    if not (data_dir / "tfrecords" / "labels.txt").is_file():
        build_tfrecords(data_dir / "train", data_dir / "tfrecords", name="train", num_shards=4,
                        num_workers=1, seed=0)


def pe_overrides(method: str, out: Path, steps: int, stage2_steps: int, batch_size: int) -> list[str]:
    """The `--set` overrides that shrink a method's packaged config to the study's scale.

    Args:
        method: A key of `PE_METHODS`.
        out: The study's output directory (stage 2 starts from `out/arcface/seed-<first>`).
        steps: Steps of a method trained from scratch.
        stage2_steps: Steps of a stage 2.
        batch_size: Images per batch.

    Returns:
        The overrides, in the order the `experiment seeds` command line takes them.
    """
    from sparse_embed.config import load_config

    config_name, stage2 = PE_METHODS[method]
    n = stage2_steps if stage2 else steps
    overrides = [f"train.steps={n}", f"train.batch_size={batch_size}", f"train.checkpoint_every={n}",
                 f"schedule.warmup_steps={n // 10}"]
    if stage2:
        first = load_config(PE_METHODS[PE_STAGE1][0]).train.seed
        overrides.append(f"train.init_from={out / PE_STAGE1 / f'seed-{first}'}")
    data = load_config(config_name).data
    if data.sampler == "p_k":
        # P x K batches must still add up to the batch size.
        overrides.append(f"data.classes_per_batch={batch_size // data.samples_per_class}")
    return overrides


def pe_confidence(data_dir: str | Path, out: str | Path, methods: Sequence[str], seeds: int, steps: int,
                  stage2_steps: int, batch_size: int, results: str | None) -> dict[str, Any]:
    """Trains each method with several seeds, then asks whether its confidence follows the nuisances.

    Every method runs as `python -m sparse_embed.experiment seeds` would (one run directory per
    seed under `out/<method>/`, resumable); a stage-2 method starts every seed from the first
    ArcFace seed. The first seed of each method with a confidence embeds the pairs' images and is
    measured by `evaluate nuisance` (`sparse_embed.metrics.nuisance`).

    Args:
        data_dir: The synthetic data set (generated at `PE_DATA`'s size when missing).
        out: Output directory.
        methods: Keys of `PE_METHODS`; a stage 2 needs `arcface` among them.
        seeds: Seeds per method.
        steps: Steps of a method trained from scratch.
        stage2_steps: Steps of a stage 2.
        batch_size: Images per batch.
        results: Result file to write (`sparse_embed.results`); None for none.

    Returns:
        {"seeds": rows of the seeds table, "nuisance": rows of the nuisance table}.

    Raises:
        ConfigError: On an unknown method, or a stage 2 without arcface.
    """
    from sparse_embed import embed
    from sparse_embed.experiment import several_seeds
    from sparse_embed.metrics.nuisance import nuisance_report

    unknown = [m for m in methods if m not in PE_METHODS]
    if unknown:
        raise ConfigError(f"unknown method {unknown[0]}; choose from {', '.join(PE_METHODS)}")
    if any(PE_METHODS[m][1] for m in methods) and PE_STAGE1 not in methods:
        raise ConfigError(f"a stage-2 method needs {PE_STAGE1} (its stage 1) in --methods")
    data_dir, out = Path(data_dir), Path(out)
    prepare_pe_data(data_dir)
    # Stage 1 first, whatever order the methods were given in.
    order = sorted(methods, key=lambda m: PE_METHODS[m][1])
    seed_rows, nuisance_rows = [], []
    for method in order:
        config_name = PE_METHODS[method][0]
        print(f"{method}: {seeds} seeds of {config_name}", flush=True)
        summary = several_seeds(config_name, pe_overrides(method, out, steps, stage2_steps, batch_size),
                                data_dir, out / method, seeds)
        mean, std = summary["mean"]["lfw"], summary["std"]["lfw"]
        row = {"method": method, "n": summary["n"]["lfw"]["accuracy"]}
        for key in ("accuracy", "confidence_auroc", "confidence_aurcc"):
            row[key], row[f"{key}_std"] = mean.get(key), std.get(key)
        seed_rows.append(row)
        if "confidence_auroc" not in mean:
            continue
        run_dir = out / method / f"seed-{summary['seeds'][0]}"
        pairs = run_dir / "pairs.hdf5"
        if not pairs.is_file():
            embed.main([f"--model_dir={run_dir}", f"--output={pairs}", f"--data_dir={data_dir}"])
        report = nuisance_report(pairs, data_dir)
        nuisance_rows.append({"method": method,
                              **{name: f["rho"] for name, f in report["factors"].items()},
                              **{k: report["pairs"][k] for k in
                                 ("confidence_auroc", "error_rate", "error_rate_least_confident")}})
    print(format_rows(seed_rows, PE_SEEDS_COLUMNS), end="")
    print(format_rows(nuisance_rows, PE_NUISANCE_COLUMNS), end="")
    if results:
        notes = (f"Synthetic faces: {PE_DATA['num_identities']} training identities x "
                 f"{PE_DATA['images_per_identity']} images at {PE_DATA['image_size']} px, "
                 f"{PE_DATA['num_test_identities']} held-out identities, "
                 f"{PE_DATA['pairs_folds'] * PE_DATA['pairs_per_fold'] * 2} held-out pairs; "
                 f"MobileFaceNet-tiny, batch {batch_size}, {steps} steps from scratch, "
                 f"{stage2_steps} for a stage 2 (from the first ArcFace seed, mean frozen: its "
                 f"accuracy differs from that seed's only through the scorer). Accuracy: 10-fold; "
                 f"confidence AUROC / AURCC: of the pair "
                 f"confidence (the smaller of the two) for a right decision, PE's definitions. "
                 f"Nuisance table: the first seed; rho is Spearman's between the image's factor and "
                 f"its confidence over the pairs' images (negative: confidence falls as the "
                 f"factor rises); error AUROC with cosine of the means at the most accurate threshold.")
        write_result(results, "Probabilistic embeddings on the synthetic faces: accuracy, confidence, "
                              "nuisances", {"seeds": (PE_SEEDS_COLUMNS, seed_rows),
                                            "nuisance": (PE_NUISANCE_COLUMNS, nuisance_rows)},
                     notes=notes)
    return {"seeds": seed_rows, "nuisance": nuisance_rows}


def format_rows(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """Rows as a plain-text table with the columns' labels and formats.

    Args:
        rows: One dict per row, keyed by column key.
        columns: What to show.
    """
    def cell(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec) if spec else str(value)

    table = [[c.label for c in columns]] + [[cell(r.get(c.key), c.format) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "".join("  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)) + "\n"
                   for line in table)


def _pe_confidence_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="runs/pe", help="Output directory: one folder per method.")
    parser.add_argument("--data_dir", default="runs/pe/data",
                        help="Synthetic data set with TFRecords; generated there if missing.")
    parser.add_argument("--methods", default="arcface,dul_cls,pfe,scf",
                        help=f"Comma list of {', '.join(PE_METHODS)} (default: %(default)s).")
    parser.add_argument("--seeds", type=int, default=3, help="Seeds per method.")
    parser.add_argument("--steps", type=int, default=300, help="Steps of a method trained from scratch.")
    parser.add_argument("--stage2_steps", type=int, default=150, help="Steps of a stage 2.")
    parser.add_argument("--batch_size", type=int, default=64, help="Images per batch.")
    parser.add_argument("--results", default="results/pe_synthetic.json",
                        help="Result file with the command, commit and machine (sparse_embed.results); "
                             "empty: none (default: %(default)s).")


def _run_pe_confidence(args: argparse.Namespace) -> None:
    pe_confidence(args.data_dir, args.output, args.methods.split(","), args.seeds, args.steps,
                  args.stage2_steps, args.batch_size, args.results or None)


STUDIES.register("pe_confidence")(StudyCommand(_pe_confidence_flags, _run_pe_confidence))


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sparse_embed.study`: one sub-command per registered study."""
    parser = make_parser(__doc__, program(__name__))
    studies = parser.add_subparsers(dest="study", required=True, title="studies")
    for name in STUDIES.names():
        STUDIES.get(name).add_flags(add_command(studies, name, None, prog=f"{parser.prog} {name}"))
    return parser


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """Runs the study named on the command line.

    Args:
        argv: Arguments after the program name; None reads sys.argv.
    """
    args = build_parser().parse_args(argv)
    STUDIES.get(args.study).run(args)


def run() -> None:
    """Console-script entry point."""
    main()


if __name__ == "__main__":
    run()
