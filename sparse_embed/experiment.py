"""Experiment statistics: K-fold cross-validation by identity, several seeds, hyper-parameter search.

    python -m sparse_embed.experiment cval --config=smoke --data_dir=data/synth \\
        --output=runs/cval --folds=4
    python -m sparse_embed.experiment seeds --config=smoke --data_dir=data/synth \\
        --output=runs/seeds --seeds=3
    python -m sparse_embed.experiment hopt --config=my_search.yaml --data_dir=data/synth \\
        --output=runs/hopt --trials=20 --cval=3
    python -m sparse_embed.train --config=runs/hopt/best.yaml --data_dir=data/synth \\
        --model_dir=runs/best

Every command trains with the trainer of `python -m sparse_embed.train`, one
run directory per fold, seed or trial under --output, and measures each run
with the in-training verification (`eval.sets`) at its last step. Each prints
one line per run and ends with a table of the mean and the standard deviation
(n - 1 in the denominator) of every metric over the runs; the same numbers are
in <output>/summary.json. Re-running a command resumes it: a finished run
(its result.json) is not trained again, an interrupted one resumes from its
latest checkpoint.

cval splits the identities of the training TFRecords into K folds with
--seed (no identity in two folds). Fold k trains on the other folds'
identities (<output>/data/fold-k: their records, relabelled) and is verified on
LFW-style pairs drawn among its own identities' images (eval.nfolds pair
folds of up to 300 same and 300 different pairs; set `heldout`).

hopt searches the ranges a YAML declares under `_hopt` keys, in any section:

    head: {name: arcface, params: {scale: 16.0, _hopt: {scale: {min: 1, max: 64, log: true}}}}
    schedule: {base_lr: 0.05, _hopt: {base_lr: {min: 1.0e-3, max: 0.5, log: true}}}
    optimizer: {_hopt: {name: {values: [sgd, adam]}}}

`min`/`max` (with `log`, and `step` for a grid) search an integer for an
integer key and a real number otherwise; `values` lists the choices. The
search is Optuna's TPE sampler with median pruning on the searched metric
(--metric, default eval.keep_best's or accuracy, of the first eval set; with
--cval, the held-out folds' mean, pruned fold by fold). A run evaluated during
training (eval.every_steps) is trained from one evaluation to the next and
reports each to the pruner, unless its learning rate or compression depends on
the run's length (cosine, pruning), which is then trained in one go. The
study is <output>/study.db (SQLite): a killed search resumes, counting the
trials it finished and rerunning the one it was in. A trial whose loss becomes
non-finite fails and does not count. <output>/best.yaml is the best trial's
complete config. A `--set` on a searched key fixes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from sparse_embed.cli import (
    add_command,
    deprecated_alias,
    format_results,
    make_parser,
    program,
    user_errors_exit,
)
from sparse_embed.config import (
    BEST_METRICS,
    Config,
    config_to_dict,
    load_config,
    search_space,
)
from sparse_embed.errors import ConfigError, DataError, TrainingError
from sparse_embed.fileio import atomic_path

RESULT_FILE = "result.json"
SUMMARY_FILE = "summary.json"
STUDY_FILE = "study.db"
BEST_FILE = "best.yaml"
SPLIT_FILE = "folds.json"
# The cval protocol's verification set, as named in the metrics (`heldout/accuracy`).
HELDOUT = "heldout"
# Same (and as many different) pairs per pair fold of a held-out fold, as LFW's View 2.
HELDOUT_PAIRS_PER_FOLD = 300
# The declaration keys of a `_hopt` range.
HOPT_FIELDS = ("min", "max", "log", "step", "values")

Metrics = dict[str, dict[str, float]]


# --- identities, folds and held-out pairs -----------------------------------------------------


def split_identities(names: Sequence[str], folds: int, seed: int) -> list[tuple[str, ...]]:
    """Splits identities into `folds` disjoint groups of nearly equal size.

    Args:
        names: The identities (each once).
        folds: Number of folds K, from 2 to len(names).
        seed: Seed of the split; the same names, K and seed give the same folds.

    Returns:
        K sorted tuples of names; each name is in exactly one.

    Raises:
        ConfigError: If K is below 2 or above the number of identities.
    """
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {folds}")
    if folds > len(names):
        raise ConfigError(f"--folds={folds} is larger than the number of identities "
                          f"({len(names)}); use --folds <= {len(names)}")
    order = np.random.default_rng(seed).permutation(len(names))
    return [tuple(sorted(names[i] for i in part)) for part in np.array_split(order, folds)]


def heldout_pairs(images: dict[str, int], nfolds: int, pairs_per_fold: int,
                  seed: int) -> tuple[list[tuple[str, int, int]], list[tuple[str, int, str, int]], int]:
    """Draws distinct verification pairs among some identities' images, uniformly.

    Args:
        images: Identity -> its number of images (image k of identity n is `n k`).
        nfolds: Requested pair folds (fewer when the pairs cannot fill them).
        pairs_per_fold: Requested same (and as many different) pairs per fold.
        seed: Seed of the draw.

    Returns:
        (same pairs, different pairs, folds): equally many of each kind, a
        multiple of the folds, each fold's pairs sorted.

    Raises:
        DataError: If no same pair (no identity with 2 images) or no different
            pair (fewer than 2 identities) can be made.
    """
    names = sorted(images)
    counts = np.array([images[n] for n in names], dtype=np.int64)
    same_per_identity = counts * (counts - 1) // 2
    total_same = int(same_per_identity.sum())
    total_different = int((counts.sum() ** 2 - (counts ** 2).sum()) // 2)
    if not total_same or not total_different:
        raise DataError(f"{len(names)} held-out identities with {int(counts.sum())} images make no "
                        f"{'same' if not total_same else 'different'} pair; verification needs 2 "
                        f"identities and one with 2 images: use fewer --folds")
    nfolds = max(1, min(nfolds, total_same, total_different))
    per_fold = min(pairs_per_fold, total_same // nfolds, total_different // nfolds)
    rng = np.random.default_rng(seed)
    # Rejection sampling of distinct pairs: an identity in proportion to its
    # same pairs, then two of its images; two images of the whole set for a
    # different pair. Both are uniform over the pairs of their kind.
    same: set[tuple[str, int, int]] = set()
    while len(same) < nfolds * per_fold:
        i = rng.choice(len(names), p=same_per_identity / total_same)
        k1, k2 = sorted(int(k) for k in rng.choice(counts[i], 2, replace=False))
        same.add((names[i], k1, k2))
    owner = np.repeat(np.arange(len(names)), counts)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    different: set[tuple[str, int, str, int]] = set()
    while len(different) < nfolds * per_fold:
        a, b = sorted(int(x) for x in rng.integers(len(owner), size=2))
        if owner[a] == owner[b]:
            continue
        different.add((names[owner[a]], a - int(first[owner[a]]),
                       names[owner[b]], b - int(first[owner[b]])))
    # Sorted, then shuffled with the seed, so the folds do not depend on set order.
    same_pairs = sorted(same)
    different_pairs = sorted(different)
    same_pairs = [same_pairs[i] for i in rng.permutation(len(same_pairs))]
    different_pairs = [different_pairs[i] for i in rng.permutation(len(different_pairs))]
    ordered_same, ordered_different = [], []
    for f in range(nfolds):
        ordered_same += sorted(same_pairs[f * per_fold:(f + 1) * per_fold])
        ordered_different += sorted(different_pairs[f * per_fold:(f + 1) * per_fold])
    return ordered_same, ordered_different, nfolds


def _identity_count(config: Config, data_dir: Path) -> int:
    """Identities of the run's label map, read without TensorFlow."""
    from sparse_embed.data.checks import train_inputs

    _, label_map = train_inputs(config, data_dir)
    return sum(1 for line in label_map.read_text().splitlines() if line)


def _records(pattern: str) -> Any:
    """The parsed examples of the TFRecords matching `pattern`, in a fixed order (numpy dicts)."""
    from sparse_embed.data.tfrecord import parse_example
    from sparse_embed.keras import tf

    files = sorted(glob.glob(pattern))
    return tf.data.TFRecordDataset(files).map(parse_example).as_numpy_iterator()


def _identity_of(example: dict[str, Any], class_names: Sequence[str]) -> str:
    text = example["image/class/text"].decode()
    return text or class_names[int(example["image/class/label"])]


def _write_fold_data(pattern: str, class_names: Sequence[str], train_names: Sequence[str],
                     heldout: dict[str, int], nfolds: int, seed: int, out: Path) -> None:
    """Writes one fold's data directory atomically: the training identities' records
    (relabelled 0..n-1, as many shards as the source), the held-out images and their pairs."""
    from sparse_embed.data.tfrecord import LABEL_MAP, make_example, shard_path, write_label_map
    from sparse_embed.data.verification import write_pairs
    from sparse_embed.keras import tf

    labels = {name: i for i, name in enumerate(train_names)}
    num_shards = len(glob.glob(pattern))
    same, different, pair_folds = heldout_pairs(heldout, nfolds, HELDOUT_PAIRS_PER_FOLD, seed)
    seen: dict[str, int] = dict.fromkeys(heldout, 0)
    with atomic_path(out) as tmp:
        records = tmp / "tfrecords"
        records.mkdir(parents=True)
        writers = [tf.io.TFRecordWriter(str(shard_path(records, "train", i, num_shards)))
                   for i in range(num_shards)]
        written = 0
        try:
            for example in _records(pattern):
                name = _identity_of(example, class_names)
                if name in labels:
                    writers[written % num_shards].write(make_example(
                        example["image/encoded"], labels[name], name,
                        example["image/filename"].decode(), int(example["image/height"]),
                        int(example["image/width"])))
                    written += 1
                elif name in seen:
                    folder = tmp / HELDOUT / name
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / f"{seen[name]}.jpg").write_bytes(example["image/encoded"])
                    seen[name] += 1
        finally:
            for writer in writers:
                writer.close()
        write_label_map(records / LABEL_MAP, train_names)
        write_pairs(tmp / "pairs.txt", same, different, pair_folds)


@dataclass(frozen=True)
class FoldSplit:
    """The cval split of a data set.

    Attributes:
        folds: The identities of each fold.
        images: Identity -> its number of training images.
    """

    folds: list[tuple[str, ...]]
    images: dict[str, int]


def _cval_split(config: Config, data_dir: Path, folds: int, seed: int, output: Path,
                flag: str = "--folds") -> FoldSplit:
    """Splits the identities (checked against the label map before TensorFlow loads)
    and records the split in <output>/folds.json; a different split recorded there is an error."""
    from sparse_embed.data.checks import train_inputs

    if folds < 2:
        raise ConfigError(f"{flag} must be at least 2, got {folds}")
    identities = _identity_count(config, data_dir)
    if folds > identities:
        raise ConfigError(f"{flag}={folds} is larger than the number of identities in "
                          f"{data_dir / config.data.label_map} ({identities}); use "
                          f"{flag} <= {identities}")
    recorded = output / SPLIT_FILE
    previous = json.loads(recorded.read_text()) if recorded.is_file() else None
    if previous is not None and (previous["folds"], previous["seed"]) != (folds, seed):
        raise ConfigError(f"{output} holds a cval split of {previous['folds']} folds with seed "
                          f"{previous['seed']}; resume with those, or pass a new --output")
    pattern, label_map = train_inputs(config, data_dir)
    class_names = label_map.read_text().splitlines()
    images: dict[str, int] = {}
    for example in _records(pattern):
        name = _identity_of(example, class_names)
        images[name] = images.get(name, 0) + 1
    if folds > len(images):
        raise ConfigError(f"{flag}={folds} is larger than the number of identities in "
                          f"{pattern} ({len(images)}); use {flag} <= {len(images)}")
    split = FoldSplit(split_identities(sorted(images), folds, seed), images)
    for k, fold in enumerate(split.folds):
        # Checked for every fold before any is written.
        heldout_pairs({n: images[n] for n in fold}, 1, 1, seed + k)
    if previous is None:
        with atomic_path(recorded) as tmp:
            tmp.write_text(json.dumps({"folds": folds, "seed": seed,
                                       "identities": [list(f) for f in split.folds]}, indent=1))
    return split


def _fold_data(config: Config, data_dir: Path, split: FoldSplit, k: int, seed: int,
               output: Path) -> Path:
    """The data directory of fold k under <output>/data, written on first use."""
    from sparse_embed.data.checks import train_inputs

    out = output / "data" / f"fold-{k}"
    if not out.is_dir():
        pattern, label_map = train_inputs(config, data_dir)
        train_names = sorted(n for j, fold in enumerate(split.folds) if j != k for n in fold)
        _write_fold_data(pattern, label_map.read_text().splitlines(), train_names,
                         {n: split.images[n] for n in split.folds[k]}, config.eval.nfolds,
                         seed + k, out)
    return out


# The overrides that make a run train on a fold's data and verify on its held-out pairs.
_CVAL_OVERRIDES = ("data.train_files=tfrecords/train-*", "data.label_map=tfrecords/labels.txt",
                   f"eval.sets=[{{name: {HELDOUT}, pairs: pairs.txt, images: {HELDOUT}}}]",
                   "eval.keep_best=''")


# --- one run --------------------------------------------------------------------------------


def eval_metrics(model_dir: str | os.PathLike) -> dict[int, Metrics]:
    """The in-training verification results a run logged, by step.

    Args:
        model_dir: A run directory (its `logs/train` TensorBoard events).

    Returns:
        Step -> set -> metric -> value, from the `eval/<set>/<metric>` scalars.
    """
    from sparse_embed.keras import tf

    results: dict[int, Metrics] = {}
    for path in sorted((Path(model_dir) / "logs" / "train").glob("events.out.tfevents.*")):
        # Event files are TFRecord files of `Event` protos.
        for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
            event = tf.compat.v1.Event.FromString(record)
            for value in event.summary.value:
                parts = value.tag.split("/", 2)
                if len(parts) == 3 and parts[0] == "eval":
                    results.setdefault(event.step, {}).setdefault(parts[1], {})[parts[2]] = \
                        float(tf.make_ndarray(value.tensor))
    return dict(sorted(results.items()))


def _measured(config: Config) -> Config:
    """The config with an evaluation at the last step at least (the run's metrics)."""
    if config.eval.every_steps:
        return config
    return dataclasses.replace(config, eval=dataclasses.replace(
        config.eval, every_steps=config.train.steps))


def _segments(config: Config, stepwise: bool) -> list[int]:
    """The steps to train to one after another: each evaluation's, where training in parts
    is the same as in one go (the learning rate and compression do not depend on the length)."""
    steps, every = config.train.steps, config.eval.every_steps
    if not stepwise or config.schedule.name == "cosine" or config.compression.type != "none":
        return [steps]
    return [*range(every, steps, every), steps]


def _read_result(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, content: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(content, indent=2) + "\n")


class _NoRetracingWarning(logging.Filter):
    """Drops TensorFlow's "triggered tf.function retracing" warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


def train_and_measure(config: Config, data_dir: str | os.PathLike, run_dir: str | os.PathLike,
                      on_evaluation: Callable[[int, Metrics], None] | None = None) -> dict[str, Any]:
    """Trains (or resumes) one run and returns its last step's verification results.

    The run's result is written to `run_dir/result.json`; a run that has one
    is not trained again.

    Args:
        config: The run config; with `eval.every_steps` 0 it is evaluated at its last step.
        data_dir: The run's data directory.
        run_dir: The run's model directory.
        on_evaluation: Called with (step, results) after each evaluation but
            the last, as training reaches it (see `_segments`); it may raise
            to stop the run (a pruned trial).

    Returns:
        `{"metrics": set -> metric -> value, "step": ..., "seconds": ...}`.

    Raises:
        TrainingError: If the run has no evaluation at its last step.
    """
    run_dir = Path(run_dir)
    done = _read_result(run_dir)
    if done is not None:
        return done
    from sparse_embed.keras import tf
    from sparse_embed.training.trainer import train

    config = _measured(config)
    start = time.perf_counter()
    boundaries = _segments(config, on_evaluation is not None)
    # Every run (and part of one) builds its own model in this process, so Keras traces
    # new functions each time: expected here, and not worth the warning it prints.
    quiet = _NoRetracingWarning()
    tf.get_logger().addFilter(quiet)
    try:
        for boundary in boundaries:
            part = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=boundary))
            train(part, data_dir, run_dir, verbose=0)
            if on_evaluation is not None and boundary != config.train.steps:
                results = eval_metrics(run_dir).get(boundary)
                if results:
                    on_evaluation(boundary, results)
    finally:
        tf.get_logger().removeFilter(quiet)
    results = eval_metrics(run_dir).get(config.train.steps)
    if not results:
        raise TrainingError(f"{run_dir} has no verification results at step {config.train.steps} "
                            f"(killed between its last checkpoint and evaluation?); remove "
                            f"{run_dir} and run the command again")
    result = {"metrics": results, "step": config.train.steps,
              "seconds": round(time.perf_counter() - start, 2)}
    _write_json(run_dir / RESULT_FILE, result)
    return result


# --- statistics -----------------------------------------------------------------------------


def summarize(runs: dict[str, Metrics]) -> dict[str, Metrics]:
    """Mean, standard deviation (n - 1 in the denominator; 0 for one run) and count of every metric.

    Args:
        runs: Run name -> set -> metric -> value.

    Returns:
        `{"mean": set -> metric -> value, "std": ..., "n": ...}`, over the runs that have the metric.
    """
    values: dict[str, dict[str, list[float]]] = {}
    for metrics in runs.values():
        for set_name, by_metric in metrics.items():
            for metric, value in by_metric.items():
                values.setdefault(set_name, {}).setdefault(metric, []).append(value)
    out: dict[str, Metrics] = {"mean": {}, "std": {}, "n": {}}
    for set_name, by_metric in values.items():
        for metric, vals in by_metric.items():
            array = np.asarray(vals, dtype=np.float64)
            out["mean"].setdefault(set_name, {})[metric] = float(array.mean())
            out["std"].setdefault(set_name, {})[metric] = \
                float(array.std(ddof=1)) if len(array) > 1 else 0.0
            out["n"].setdefault(set_name, {})[metric] = len(array)
    return out


def summary_table(summary: dict[str, Metrics]) -> str:
    """The summary as a table: one row per `<set>/<metric>`, columns mean, std, n."""
    rows = {f"{s}/{m}": {"mean": v, "std": summary["std"][s][m], "n": summary["n"][s][m]}
            for s, by_metric in summary["mean"].items() for m, v in by_metric.items()}
    return format_results(rows)


def _headline(metrics: Metrics) -> str:
    """The first set's accuracy, for a run's progress line."""
    set_name, metric = next(iter(metrics)), "accuracy"
    value = metrics[set_name].get(metric)
    return f"{set_name}/{metric} {value:.4g}" if value is not None else ""


def _run_many(names: Sequence[str], run: Callable[[str], tuple[dict[str, Any], bool]],
              label: str) -> dict[str, Metrics]:
    """Runs each named run, printing one line per run; returns name -> its metrics."""
    runs: dict[str, Metrics] = {}
    for i, name in enumerate(names):
        result, before = run(name)
        runs[name] = result["metrics"]
        when = "finished before" if before else f"{result['seconds']:.1f} s"
        print(f"{label} {i + 1}/{len(names)} {name}: {_headline(result['metrics'])} "
              f"(step {result['step']}, {when})", flush=True)
    return runs


def _finish(output: Path, summary: dict[str, Any]) -> dict[str, Any]:
    _write_json(output / SUMMARY_FILE, summary)
    print(summary_table(summary), end="")
    print(f"summary: {output / SUMMARY_FILE}")
    return summary


def cross_validate(config_name: str, overrides: Sequence[str], data_dir: str | os.PathLike,
                   output: str | os.PathLike, folds: int, seed: int = 0) -> dict[str, Any]:
    """K-fold cross-validation by identity: one run per fold under `output` (`fold-k`).

    Args:
        config_name: Packaged config name or YAML path.
        overrides: `key.path=value` overrides.
        data_dir: Directory of the training TFRecords (the config's `data.*` paths).
        output: The experiment directory.
        folds: K.
        seed: Seed of the split and of the held-out pairs.

    Returns:
        The summary written to `output/summary.json`.

    Raises:
        ConfigError: On a bad config, K below 2 or above the number of identities.
        DataError: If the data are missing, or a fold cannot make verification pairs.
    """
    data_dir, output = Path(data_dir), Path(output)
    base = load_config(config_name, overrides)
    config = load_config(config_name, [*overrides, *_CVAL_OVERRIDES])
    split = _cval_split(base, data_dir, folds, seed, output)

    def run(name: str) -> tuple[dict[str, Any], bool]:
        k = int(name.rpartition("-")[2])
        before = _read_result(output / name)
        if before is not None:
            return before, True
        fold_data = _fold_data(base, data_dir, split, k, seed, output)
        return train_and_measure(config, fold_data, output / name), False

    runs = _run_many([f"fold-{k}" for k in range(folds)], run, "fold")
    return _finish(output, {"command": "cval", "config": config_name, "overrides": list(overrides),
                            "data_dir": str(data_dir), "folds": folds, "seed": seed,
                            "protocol": _PROTOCOL, "runs": runs, **summarize(runs)})


_PROTOCOL = (f"identity folds; each fold trains on the others' identities and is verified on "
             f"pairs among its own ({HELDOUT}: eval.nfolds pair folds of up to "
             f"{HELDOUT_PAIRS_PER_FOLD} same and {HELDOUT_PAIRS_PER_FOLD} different pairs)")


def several_seeds(config_name: str, overrides: Sequence[str], data_dir: str | os.PathLike,
                  output: str | os.PathLike, seeds: int) -> dict[str, Any]:
    """Trains the config with `seeds` seeds (train.seed, train.seed + 1, ...), one run each.

    Args:
        config_name: Packaged config name or YAML path.
        overrides: `key.path=value` overrides.
        data_dir: The runs' data directory.
        output: The experiment directory (`seed-<s>` runs under it).
        seeds: Number of runs.

    Returns:
        The summary written to `output/summary.json`.

    Raises:
        ConfigError: On a bad config, or fewer than 1 seed.
        DataError: If the data or the config's eval sets are missing.
    """
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    data_dir, output = Path(data_dir), Path(output)
    base = load_config(config_name, overrides)
    from sparse_embed.data.checks import train_inputs

    train_inputs(base, data_dir)
    first = base.train.seed
    names = {f"seed-{first + i}": first + i for i in range(seeds)}

    def run(name: str) -> tuple[dict[str, Any], bool]:
        before = _read_result(output / name)
        if before is not None:
            return before, True
        config = dataclasses.replace(base, train=dataclasses.replace(base.train, seed=names[name]))
        return train_and_measure(config, data_dir, output / name), False

    runs = _run_many(list(names), run, "seed")
    return _finish(output, {"command": "seeds", "config": config_name, "overrides": list(overrides),
                            "data_dir": str(data_dir), "seeds": [first + i for i in range(seeds)],
                            "runs": runs, **summarize(runs)})


# --- hyper-parameter search -------------------------------------------------------------------


@dataclass(frozen=True)
class SearchRange:
    """One searched config key, from its `_hopt` declaration.

    Attributes:
        key: Dotted config key, e.g. `head.params.scale`.
        kind: `int`, `float` or `choice`.
        low: Smallest value (`int`, `float`).
        high: Largest value (`int`, `float`).
        log: Search on a log scale.
        step: Grid step (`int`, `float`); None: any value.
        values: The choices (`choice`).
    """

    key: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    values: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """This key's value for an Optuna trial."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.values))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step or 1))
        return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)


def _override(key: str, value: Any) -> str:
    # JSON is YAML: the override parses back to the same value.
    return f"{key}={json.dumps(value)}"


def _value_at(config: Config, key: str) -> Any:
    node: Any = config_to_dict(config)
    for part in key.split("."):
        node = node[part]
    return node


def parse_search_space(config_name: str, overrides: Sequence[str] = ()) -> list[SearchRange]:
    """Reads and checks the `_hopt` declarations of a config.

    Each range's ends (or each choice) must be a valid value of its key: the
    config is built with it, so an unknown key, a wrong type or a value out of
    the key's range is the loader's one-line error.

    Args:
        config_name: Packaged config name or YAML path.
        overrides: The experiment's `--set` overrides; a key they set is not searched.

    Returns:
        The searched keys, in the file's order.

    Raises:
        ConfigError: On an unknown declaration key, a missing or reversed range,
            a log range that is not positive, empty choices, or a value the key cannot take.
    """
    fixed = {item.partition("=")[0].strip() for item in overrides}
    base = load_config(config_name, overrides)
    ranges = []
    for key, spec in search_space(config_name).items():
        where = f"_hopt range of {key!r} in {config_name}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where} must be a mapping such as {{min: 1, max: 64, log: true}} "
                              f"or {{values: [a, b]}}; got {spec!r}")
        unknown = sorted(set(spec) - set(HOPT_FIELDS))
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r} in the {where}; a range takes "
                              f"{', '.join(HOPT_FIELDS)}")
        try:
            current = _value_at(base, key)
        except (KeyError, TypeError):
            # The loader names the closest valid key.
            load_config(config_name, [*overrides, f"{key}=0"])
            raise ConfigError(f"{where}: {key} is not a config key") from None
        if "values" in spec:
            values = spec["values"]
            if set(spec) != {"values"}:
                raise ConfigError(f"{where} has both values and {sorted(set(spec) - {'values'})[0]}; "
                                  f"give either values or min/max")
            if not isinstance(values, list) or not values or any(
                    isinstance(v, (list, dict)) for v in values):
                raise ConfigError(f"{where}: values must be a non-empty list of plain values, "
                                  f"got {values!r}")
            for value in values:
                load_config(config_name, [*overrides, _override(key, value)])
            found = SearchRange(key, "choice", values=tuple(values))
        else:
            if "min" not in spec or "max" not in spec:
                raise ConfigError(f"{where} needs min and max (or values)")
            low, high = spec["min"], spec["max"]
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in (low, high)):
                raise ConfigError(f"{where}: min and max must be numbers, got {low!r}, {high!r}")
            if low > high:
                raise ConfigError(f"{where}: min {low} is larger than max {high}")
            log = spec.get("log", False)
            if not isinstance(log, bool):
                raise ConfigError(f"{where}: log must be true or false, got {log!r}")
            if log and low <= 0:
                raise ConfigError(f"{where}: a log range needs min > 0, got {low}")
            step = spec.get("step")
            if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float))
                                     or step <= 0 or log):
                raise ConfigError(f"{where}: step must be a positive number, without log; got "
                                  f"{step!r}")
            kind = "int" if isinstance(current, int) and not isinstance(current, bool) else "float"
            if kind == "float" and not isinstance(current, float):
                raise ConfigError(f"{where}: {key} is {type(current).__name__}, which a min/max "
                                  f"range cannot search; use values: [...]")
            for end in (low, high):
                load_config(config_name, [*overrides, _override(key, end)])
            found = SearchRange(key, kind, float(low), float(high), log,
                                None if step is None else float(step))
        if key not in fixed:
            ranges.append(found)
    return ranges


def _pick(result: dict[str, Any], set_name: str, metric: str, run_dir: Path) -> float:
    """The searched metric of a run's result."""
    value = result["metrics"].get(set_name, {}).get(metric)
    if value is None:
        measured = ", ".join(f"{s}/{m}" for s, by in result["metrics"].items() for m in by)
        raise ConfigError(f"{run_dir} measured no {set_name}/{metric} (it measured {measured}); "
                          f"choose another --metric")
    return float(value)


def _objective(config: Config, metric: str | None) -> tuple[str, str, str]:
    """(set, metric, `max` | `min`) of the search: --metric, else eval.keep_best's, else accuracy."""
    if not config.eval.sets:
        raise ConfigError("hopt measures trials with the in-training verification; eval.sets "
                          "is empty")
    name = metric or config.eval.best_metric or "accuracy"
    direction = BEST_METRICS.get(name)
    set_name = config.eval.best_set or config.eval.sets[0].name
    return set_name, name, direction


def search(config_name: str, overrides: Sequence[str], data_dir: str | os.PathLike,
           output: str | os.PathLike, trials: int, cval: int = 0, metric: str | None = None,
           seed: int = 0) -> dict[str, Any]:
    """Optuna search over the config's `_hopt` ranges; the best config to `output/best.yaml`.

    Args:
        config_name: Packaged config name or YAML path with `_hopt` ranges.
        overrides: `key.path=value` overrides (a searched key they set is fixed).
        data_dir: The runs' data directory.
        output: The experiment directory: study.db, `trial-NNNN` runs, best.yaml, summary.json.
        trials: Finished (completed or pruned) trials to reach, counting earlier ones.
        cval: With K >= 2, each trial is a K-fold cross-validation (its held-out
            mean is the trial's value); 0: one run measured on `eval.sets`.
        metric: A `BEST_METRICS` name; None: eval.keep_best's metric, else accuracy.
        seed: Seed of the sampler (offset by the trials already in the study) and of the cval split.

    Returns:
        The summary written to `output/summary.json`.

    Raises:
        ConfigError: On a bad config or `_hopt` range, no range, --trials below 1,
            --cval above the number of identities, or a study of another metric in `output`.
        DataError: If the data are missing.
    """
    if trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    if cval == 1 or cval < 0:
        raise ConfigError(f"--cval must be 0 (off) or at least 2, got {cval}")
    data_dir, output = Path(data_dir), Path(output)
    space = parse_search_space(config_name, overrides)
    if not space:
        raise ConfigError(f"{config_name} declares no search range (a _hopt mapping in a section, "
                          f"e.g. schedule: {{_hopt: {{base_lr: {{min: 0.001, max: 0.5, log: true}}}}}})")
    base = load_config(config_name, overrides)
    from sparse_embed.data.checks import train_inputs

    train_inputs(base, data_dir)
    if cval:
        objective_key = (HELDOUT, metric or "accuracy", BEST_METRICS.get(metric or "accuracy"))
        split = _cval_split(base, data_dir, cval, seed, output, "--cval")
    else:
        objective_key = _objective(base, metric)
    set_name, metric_name, direction = objective_key
    tag = f"{set_name}/{metric_name}"

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    output.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{output / STUDY_FILE}")
    study = optuna.create_study(
        study_name="hopt", storage=storage, load_if_exists=True,
        direction="maximize" if direction == "max" else "minimize")
    if study.user_attrs.get("metric", tag) != tag:
        raise ConfigError(f"{output / STUDY_FILE} searches {study.user_attrs['metric']}, not {tag}; "
                          f"resume with that metric or pass a new --output")
    study.set_user_attr("metric", tag)
    state = optuna.trial.TrialState
    study_id = storage.get_study_id_from_name("hopt")
    # A trial left running by a killed search is run again from its checkpoints.
    for stale in study.get_trials(deepcopy=False, states=(state.RUNNING,)):
        storage.set_trial_state_values(
            storage.get_trial_id_from_study_id_trial_number(study_id, stale.number), state.FAIL)
        study.enqueue_trial(stale.params, user_attrs={"run_dir": stale.user_attrs.get("run_dir", "")})
    finished = len(study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED)))
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    study.pruner = optuna.pruners.MedianPruner()
    print(f"hopt: {finished} of {trials} trials finished before; {max(trials - finished, 0)} to run; "
          f"{'maximizing' if direction == 'max' else 'minimizing'} {tag}", flush=True)

    distributions = {r.key: r for r in space}
    failed = 0
    while finished < trials:
        trial = study.ask()
        params = {key: r.suggest(trial) for key, r in distributions.items()}
        run_name = trial.user_attrs.get("run_dir") or f"trial-{trial.number:04d}"
        trial.set_user_attr("run_dir", run_name)
        trial_overrides = [*overrides, *(_override(k, v) for k, v in params.items())]
        start = time.perf_counter()

        def report(step: int, results: Metrics, trial: Any = trial) -> None:
            value = results.get(set_name, {}).get(metric_name)
            if value is None:
                return
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{tag} {value:.4g} at step {step}")

        try:
            if cval:
                fold_values = []
                config = load_config(config_name, [*trial_overrides, *_CVAL_OVERRIDES])
                for k in range(cval):
                    fold_data = _fold_data(base, data_dir, split, k, seed, output)
                    result = train_and_measure(config, fold_data, output / run_name / f"fold-{k}")
                    fold_values.append(_pick(result, set_name, metric_name, output / run_name))
                    if k + 1 < cval:
                        report(k, {set_name: {metric_name: float(np.mean(fold_values))}})
                value = float(np.mean(fold_values))
            else:
                config = load_config(config_name, trial_overrides)
                result = train_and_measure(config, data_dir, output / run_name, report)
                value = _pick(result, set_name, metric_name, output / run_name)
        except optuna.TrialPruned as pruned:
            study.tell(trial, state=state.PRUNED)
            finished += 1
            print(f"trial {trial.number} ({run_name}): pruned, {pruned} below the median "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
            continue
        except TrainingError as error:
            # A diverging trial (its loss became non-finite) is a result of the search, not
            # the end of it; it does not count towards --trials.
            study.tell(trial, state=state.FAIL)
            failed += 1
            print(f"trial {trial.number} ({run_name}): failed, {error}", flush=True)
            if failed > trials:
                raise TrainingError(f"{failed} trials failed, the last with: {error}") from error
            continue
        except Exception:
            study.tell(trial, state=state.FAIL)
            raise
        # An interruption (Ctrl-C) leaves the trial running in the study: the next search
        # runs it again from its checkpoints, as after a kill.
        if not math.isfinite(value):
            study.tell(trial, state=state.FAIL)
            raise TrainingError(f"trial {trial.number} measured {tag} = {value}")
        study.tell(trial, value)
        finished += 1
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in params.items())
        print(f"trial {trial.number} ({run_name}): {tag} {value:.4g} with {shown} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)

    return _finish_search(study, config_name, overrides, data_dir, output, tag, cval, seed,
                          [r.key for r in space])


def _finish_search(study: Any, config_name: str, overrides: Sequence[str], data_dir: Path,
                   output: Path, tag: str, cval: int, seed: int, keys: list[str]) -> dict[str, Any]:
    """Writes best.yaml and summary.json, prints the trials' table."""
    import optuna

    state = optuna.trial.TrialState
    done = study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED))
    complete = [t for t in done if t.state == state.COMPLETE]
    if not complete:
        raise TrainingError(f"every trial in {output / STUDY_FILE} was pruned; run more --trials")
    best = study.best_trial
    config = load_config(config_name, [*overrides, *(_override(k, v) for k, v in best.params.items())])
    command = (f"python -m sparse_embed.experiment hopt --config={config_name} "
               f"--data_dir={data_dir} --output={output}")
    header = (f"# The best of {len(done)} trials of\n#   {command}\n"
              f"# trial {best.number}: {tag} = {best.value:.6g}. Train it with\n"
              f"#   python -m sparse_embed.train --config={output / BEST_FILE} "
              f"--data_dir={data_dir} --model_dir=runs/best\n")
    with atomic_path(output / BEST_FILE) as tmp:
        tmp.write_text(header + yaml.safe_dump(config_to_dict(config), sort_keys=False))
    rows: dict[str, dict[str, float | str]] = {}
    for t in done:
        row: dict[str, float | str] = {k: t.params[k] for k in keys if k in t.params}
        if t.state == state.COMPLETE:
            row[tag] = t.value
        else:
            row["state"] = "pruned"
        rows[t.user_attrs.get("run_dir", f"trial-{t.number:04d}")] = row
    summary = {
        "command": "hopt", "config": config_name, "overrides": list(overrides),
        "data_dir": str(data_dir), "metric": tag, "direction": study.direction.name.lower(),
        "cval": cval, "seed": seed,
        "best": {"trial": best.number, "run_dir": best.user_attrs.get("run_dir"),
                 "value": best.value, "params": best.params, "config": str(output / BEST_FILE)},
        "trials": [{"number": t.number, "run_dir": t.user_attrs.get("run_dir"),
                    "state": t.state.name.lower(), "value": t.value, "params": t.params}
                   for t in done],
    }
    _write_json(output / SUMMARY_FILE, summary)
    print(format_results(rows), end="")
    print(f"best: trial {best.number}, {tag} {best.value:.4g} -> {output / BEST_FILE}")
    return summary


def write_search_result(summary: dict[str, Any], path: str | os.PathLike) -> Path:
    """Records a finished search's trials as a result file (`sparse_embed.results`).

    Args:
        summary: What `search` returns.
        path: The JSON file, e.g. `results/pe_hopt.json`.

    Returns:
        The path written.
    """
    from sparse_embed.results import Column, write_result

    keys = list(dict.fromkeys(k for t in summary["trials"] for k in t["params"]))
    metric = summary["metric"]
    columns = [Column("trial", "trial"), *(Column(k, k, ".4g") for k in keys),
               Column("value", metric, ".4f"), Column("state", "state")]
    rows = [{"trial": t["number"], **t["params"], "value": t["value"], "state": t["state"]}
            for t in summary["trials"]]
    best = summary["best"]
    notes = (f"Optuna TPE with median pruning over the _hopt ranges of {summary['config']}"
             f"{' with ' + ' '.join(summary['overrides']) if summary['overrides'] else ''}; "
             f"{metric} ({summary['direction']}) of each trial; a pruned trial stopped at an "
             f"in-training evaluation below the median. Best: trial {best['trial']}, {metric} "
             f"{best['value']:.4f}.")
    return write_result(path, f"Hyper-parameter search of {summary['config']}",
                        {"trials": (columns, rows)}, notes=notes)


# --- command line -----------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="Packaged config name or YAML path.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Override, key.path=value (repeatable).")
    parser.add_argument("--data_dir", required=True,
                        help="Directory the config's data paths are relative to.")
    parser.add_argument("--output", required=True,
                        help="Experiment directory: one run directory per fold, seed or trial, "
                             "summary.json.")
    # `--out` is the project's retired spelling of --output; scripts that use it still work.
    deprecated_alias(parser, "--out", "--output")


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sparse_embed.experiment`."""
    parser = make_parser(__doc__, program(__name__))
    commands = parser.add_subparsers(dest="command", required=True)
    cval = add_command(commands, "cval", "K-fold cross-validation by identity: a run per fold, "
                       "verified on pairs of its held-out identities.")
    _common(cval)
    cval.add_argument("--folds", type=int, required=True, help="Number of identity folds K.")
    cval.add_argument("--seed", type=int, default=0, help="Seed of the split and the held-out "
                      "pairs (default: %(default)s).")
    seeds = add_command(commands, "seeds", "The same config trained with several seeds "
                        "(train.seed, train.seed + 1, ...).")
    _common(seeds)
    seeds.add_argument("--seeds", type=int, required=True, help="Number of runs.")
    hopt = add_command(commands, "hopt", "Optuna search (TPE, median pruning) over the config's "
                       "_hopt ranges; the best config to <output>/best.yaml.")
    _common(hopt)
    hopt.add_argument("--trials", type=int, required=True,
                      help="Finished trials to reach, counting those of an earlier, killed search.")
    hopt.add_argument("--cval", type=int, default=0, metavar="K",
                      help="Measure each trial by K-fold cross-validation (default: one run, "
                           "measured on eval.sets).")
    hopt.add_argument("--metric", default=None,
                      help="Metric to optimise (accuracy, auc, eer, tar@far=1e-3, ...); default: "
                           "eval.keep_best's, else accuracy.")
    hopt.add_argument("--seed", type=int, default=0,
                      help="Seed of the sampler and of the cval split (default: %(default)s).")
    hopt.add_argument("--results", default=None,
                      help="Also record the trials as a result file (sparse_embed.results), e.g. "
                           "results/pe_hopt.json.")
    return parser


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs one experiment command and prints its table.

    Args:
        argv: Arguments after the program name; None reads sys.argv.

    Returns:
        The summary written to <output>/summary.json.
    """
    args = build_parser().parse_args(argv)
    if args.command == "cval":
        return cross_validate(args.config, args.set, args.data_dir, args.output, args.folds,
                              args.seed)
    if args.command == "seeds":
        return several_seeds(args.config, args.set, args.data_dir, args.output, args.seeds)
    summary = search(args.config, args.set, args.data_dir, args.output, args.trials, args.cval,
                     args.metric, args.seed)
    if args.results:
        write_search_result(summary, args.results)
    return summary


def run() -> None:
    """Console-script entry point."""
    main()


if __name__ == "__main__":
    run()
