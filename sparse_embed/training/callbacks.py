"""Keras callbacks of the trainer: checkpoints, TensorBoard scalars, non-finite loss guard,
verification during training."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from absl import logging

from sparse_embed import compression
from sparse_embed.config import BEST_METRICS, Config, EvalSetConfig, save_config
from sparse_embed.data.pipeline import bytes_dataset, missing_paths
from sparse_embed.data.verification import read_bin, read_pairs, unique_images
from sparse_embed.errors import ConfigError, DataError, TrainingError
from sparse_embed.fileio import atomic_path
from sparse_embed.inference import (
    PairScoring,
    build_backbone,
    pair_results,
    save_backbone,
)
from sparse_embed.keras import keras, tf
from sparse_embed.run_record import RUN_FILE


class _StepCallback(keras.callbacks.Callback):
    """Base of callbacks that act on the optimizer's global step, which survives resumes.

    Args:
        optimizer: The optimizer whose `iterations` is the global step.
    """

    def __init__(self, optimizer: keras.optimizers.Optimizer) -> None:
        super().__init__()
        self.optimizer = optimizer

    @property
    def step(self) -> int:
        """The number of optimizer steps taken so far."""
        return int(self.optimizer.iterations.numpy())


class StopOnNonFiniteLoss(_StepCallback):
    """Stops training with a `TrainingError` naming the step where the loss became NaN/inf."""

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            raise TrainingError(
                f"loss became {loss} at step {self.step}; lower schedule.base_lr or "
                f"sparsity.weight, or set optimizer.clipnorm"
            )


class CheckpointEvery(_StepCallback):
    """Saves a checkpoint every `every` global steps and at the end of training.

    Args:
        manager: Owns the checkpoint directory and how many checkpoints are kept.
        optimizer: The optimizer whose `iterations` is the global step.
        every: Steps between checkpoints.
    """

    def __init__(self, manager: tf.train.CheckpointManager,
                 optimizer: keras.optimizers.Optimizer, every: int) -> None:
        super().__init__(optimizer)
        self.manager = manager
        self.every = every
        self._saved_step = -1

    def _save(self) -> None:
        step = self.step
        if step != self._saved_step:
            self.manager.save(checkpoint_number=step)
            self._saved_step = step

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.step % self.every == 0:
            self._save()

    def on_train_end(self, logs: dict | None = None) -> None:
        self._save()


class SummaryScalars(_StepCallback):
    """Writes every training metric as a TensorBoard scalar `train/<name>`.

    A metric whose name already has a section (`compress/weight_sparsity`)
    keeps it.

    Args:
        logdir: TensorBoard log directory.
        optimizer: The optimizer whose `iterations` is the global step.
        every: Steps between writes.
    """

    def __init__(self, logdir: str, optimizer: keras.optimizers.Optimizer, every: int) -> None:
        super().__init__(optimizer)
        self.writer = tf.summary.create_file_writer(logdir)
        self.every = every

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        step = self.step
        if step % self.every:
            return
        with self.writer.as_default(step=step):
            for name, value in (logs or {}).items():
                tf.summary.scalar(name if "/" in name else f"train/{name}", float(value))
        self.writer.flush()

    def on_train_end(self, logs: dict | None = None) -> None:
        self.writer.close()


class ProgressLog(_StepCallback):
    """Prints one line of metrics every `every` steps: progress that reads well in log files.

    Args:
        optimizer: The optimizer whose `iterations` is the global step.
        total_steps: The run's final step.
        every: Steps between lines.
        keys: Metrics to print, in order.
    """

    def __init__(self, optimizer: keras.optimizers.Optimizer, total_steps: int, every: int,
                 keys: tuple[str, ...] = ("loss", "accuracy", "nnz", "flops", "lr",
                                          "compress/weight_sparsity")) -> None:
        super().__init__(optimizer)
        self.total_steps = total_steps
        self.every = every
        self.keys = keys
        self._last: tuple[int, float] | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._last = (self.step, time.perf_counter())

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        step = self.step
        if step % self.every and step != self.total_steps:
            return
        now = time.perf_counter()
        last_step, last_time = self._last
        rate = (step - last_step) / max(now - last_time, 1e-9)
        self._last = (step, now)
        logs = logs or {}
        values = "  ".join(f"{k} {float(logs[k]):.4g}" for k in self.keys if k in logs)
        print(f"step {step}/{self.total_steps}  {values}  ({rate:.2f} steps/s)", flush=True)


class Throughput(keras.callbacks.Callback):
    """Measures steady-state steps per second: from the end of the first step to the end of the last.

    The first step includes tracing the training function, so it is left out.
    """

    def __init__(self) -> None:
        super().__init__()
        self._first: float | None = None
        self._last: float | None = None
        self._steps = 0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        now = time.perf_counter()
        if self._first is None:
            self._first = now
        else:
            self._steps += 1
        self._last = now

    @property
    def steps_per_second(self) -> float:
        """Steps per second after the first step; 0 with fewer than two steps."""
        if self._steps == 0:
            return 0.0
        return self._steps / max(self._last - self._first, 1e-9)


BEST_DIR = "best"
BEST_JSON = "best.json"
# What one line per set shows, in order (all results go to TensorBoard).
_PRINTED = ("accuracy", "threshold", "auc", "eer", "tar@far=1e-3", "mean_nnz", "flops_per_pair")


@dataclass(frozen=True, eq=False)
class EvalSet:
    """A verification set held in memory for evaluation during training.

    Attributes:
        name: The set's name (`eval.sets[i].name`).
        images: Encoded images (JPEG, PNG), read from disk once.
        names: One name per image: its path, or `<pack>#<i>` for a `.bin` pack.
        left: int [P], the first image of each pair.
        right: int [P], the second image of each pair.
        issame: bool [P], True where both images show one identity.
        fold: int [P], the fold of each pair.
    """

    name: str
    images: tuple[bytes, ...]
    names: tuple[str, ...]
    left: np.ndarray
    right: np.ndarray
    issame: np.ndarray
    fold: np.ndarray


def _read_set(item: EvalSetConfig, config: Config, data_dir: Path) -> EvalSet:
    if item.bin:
        path = data_dir / item.bin
        pack = read_bin(path, nfolds=config.eval.nfolds)
        names = tuple(f"{path.name}#{i}" for i in range(len(pack.images)))
        left = np.arange(0, len(names), 2)
        return EvalSet(item.name, pack.images, names, left, left + 1, pack.issame, pack.fold)
    pairs = read_pairs(data_dir / (item.pairs or config.data.pairs),
                       data_dir / (item.images or config.data.pairs_images))
    paths, left, right = unique_images(pairs)
    return EvalSet(item.name, tuple(Path(p).read_bytes() for p in paths), paths, left, right,
                   pairs.issame, pairs.fold)


def _check_far(config: Config, evaluation: EvalSet) -> None:
    """Checks that a `tar@far=f` chosen by `eval.keep_best` is measured on its set.

    `verification_metrics` reports TAR at FAR f only with at least one false
    accept allowed, i.e. f x (different pairs) >= 1.
    """
    metric = config.eval.best_metric
    if evaluation.name != config.eval.best_set or not metric.startswith("tar@far="):
        return
    far = float(metric.partition("=")[2])
    different = int(np.sum(~evaluation.issame))
    if math.floor(far * different + 1e-9) < 1:
        raise ConfigError(
            f"eval.keep_best={config.eval.keep_best}: set {evaluation.name!r} has {different} "
            f"different pairs, and TAR at FAR={far:g} needs at least {math.ceil(1 / far)}; choose "
            f"another metric or a larger set")


def read_eval_sets(config: Config, data_dir: str | os.PathLike) -> tuple[EvalSet, ...]:
    """Reads every set of `eval.sets` into memory and checks that all its images decode.

    Paths are relative to `data_dir`, like `data.pairs`. The images stay
    encoded (a tenth of their decoded size) and are decoded again at each
    evaluation, so the disk is read once.

    Args:
        config: The run config (`eval`, `data.pairs`, `data.pairs_images`, `model.input_shape`).
        data_dir: The run's data directory.

    Returns:
        The sets, in the order of `eval.sets`.

    Raises:
        DataError: If a set's file or images are missing or do not decode (the
            message names the set and the file).
        ConfigError: If `eval.keep_best` chooses a TAR@FAR the set is too small to measure.
    """
    sets = []
    for item in config.eval.sets:
        try:
            evaluation = _read_set(item, config, Path(data_dir))
            decoded = bytes_dataset(evaluation.images, evaluation.names, config.eval.batch_size,
                                    config.model.input_shape)
            produced = [n.decode() for _, _, batch in decoded for n in batch.numpy()]
            unreadable = missing_paths(evaluation.names, produced)
            if unreadable:
                raise DataError(f"{len(unreadable)} image(s) do not decode, first: {unreadable[0]}; "
                                f"replace or re-align them")
        except DataError as e:
            raise DataError(f"eval.sets {item.name!r}: {e}") from e
        _check_far(config, evaluation)
        sets.append(evaluation)
    return tuple(sets)


def _tag_name(key: str) -> str:
    """A result key as a tag: `tar@far=0.001` -> `tar@far=1e-3`; other keys unchanged."""
    if not key.startswith("tar@far="):
        return key
    mantissa, exponent = f"{float(key.partition('=')[2]):e}".split("e")
    return f"tar@far={float(mantissa):g}e{int(exponent)}"


def read_best(model_dir: str | os.PathLike) -> dict | None:
    """The contents of `model_dir/best/best.json`, or None when no best was kept.

    Args:
        model_dir: A training output directory.

    Raises:
        DataError: If best.json is there but not the JSON the trainer writes.
    """
    path = Path(model_dir) / BEST_DIR / BEST_JSON
    if not path.is_file():
        return None
    try:
        best = json.loads(path.read_text())
        float(best["value"]), int(best["step"]), str(best["metric"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is not a best.json written by sparse_embed.train ({e}); delete "
                        f"{path.parent} to start keeping the best again") from e
    return best


class VerificationEval(_StepCallback):
    """Verification of `sets` with the current weights every `every_steps` steps and at the end.

    The training backbone's weights are copied into a float32 twin built
    like `load_backbone` builds it, which embeds the sets (flip-sum, or
    `eval.flip` when that is `sum` or `concat`) and whose checkpoint goes to
    `model_dir/best/`. The twin lives outside any distribution strategy and
    evaluating runs no collective op, so only the chief needs this callback:
    under Horovod or `multi_worker` the other workers go on to the next step
    and wait in its all-reduce until the chief joins.

    Pairs are scored as `evaluate` scores them (`PairScoring`: the run's
    test-time scorer; HIB's with the training head's current weights).

    Each evaluation writes `eval/<set>/<metric>` scalars (accuracy,
    accuracy_std, threshold, auc, eer, tar@far=1e-3 where the set has enough
    different pairs, embedding_size, mean_nnz, flops_per_pair, r_sub, and
    confidence_auroc, confidence_aupr, confidence_aurcc where the run has a
    confidence) and,
    with `verbose`, prints one line per set. With `eval.keep_best`, an
    evaluation that improves on the best so far (strictly: ties keep the
    earlier step) replaces `model_dir/best`, a symlink swapped atomically onto
    a complete `.best-<step>-<pid>` directory: config.yaml (with the flip mode the
    evaluation used), checkpoints/ (the backbone, and the head where its scorer
    has trained weights) and best.json (step, metric, value, mode,
    every set's results). A resumed run reads best.json and keeps its value.

    Args:
        backbone: The training backbone; its weights are read, it is never called.
        sets: The sets (`read_eval_sets`).
        config: The run config.
        model_dir: The run's output directory.
        optimizer: The optimizer whose `iterations` is the global step.
        writer: TensorBoard writer for the scalars (the training summaries' one).
        verbose: Print one line per set and evaluation.
    """

    def __init__(self, backbone: keras.Model, sets: tuple[EvalSet, ...], config: Config,
                 model_dir: str | os.PathLike, optimizer: keras.optimizers.Optimizer,
                 writer: tf.summary.SummaryWriter, verbose: bool = True) -> None:
        super().__init__(optimizer)
        self.backbone = backbone
        self.sets = sets
        self.config = config
        self.model_dir = Path(model_dir)
        self.writer = writer
        self.verbose = verbose
        self.flip = config.eval.flip if config.eval.flip != "none" else "sum"
        self._twin = build_backbone(config)
        self._scoring: PairScoring | None = None
        self._best_config = dataclasses.replace(
            config, eval=dataclasses.replace(config.eval, flip=self.flip))
        self._mode = BEST_METRICS.get(config.eval.best_metric) if config.eval.keep_best else ""
        self._best: float | None = None
        self._evaluated = -1

    def on_train_begin(self, logs: dict | None = None) -> None:
        if not self._mode:
            return
        best = read_best(self.model_dir)
        if best is None:
            return
        if best["metric"] != self.config.eval.keep_best:
            logging.warning("%s was kept by %s; from now on by eval.keep_best=%s",
                            self.model_dir / BEST_DIR, best["metric"], self.config.eval.keep_best)
            return
        self._best = float(best["value"])

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.step % self.config.eval.every_steps == 0:
            self.evaluate()

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.step != self._evaluated:
            self.evaluate()

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Evaluates every set with the current weights, logs, and keeps the best.

        Returns:
            Set name -> metric name (as in the tags) -> value.
        """
        step = self.step
        self._twin.set_weights(self.backbone.get_weights())
        compression.after_restore(self._twin)
        if self._scoring is None:
            # The training head's scorer (HIB's weights train with it), once fit has set the model.
            head = getattr(self.model, "head", None)
            self._scoring = PairScoring(self._twin, self.config, self.flip,
                                        scorer=getattr(head, "scorer", None))
        results = {}
        for evaluation in self.sets:
            start = time.perf_counter()
            dataset = bytes_dataset(evaluation.images, evaluation.names, self.config.eval.batch_size,
                                    self.config.model.input_shape)
            inputs, _ = self._scoring.embed(dataset, total=len(evaluation.names))
            scores = self._scoring.scores(inputs, evaluation.left, evaluation.right)
            measured, _ = pair_results(inputs.embedding, evaluation.left, evaluation.right,
                                       evaluation.issame, evaluation.fold,
                                       self.config.sparsity.zero_threshold, scores=scores,
                                       confidence=inputs.confidence)
            metrics = {_tag_name(k): float(v) for k, v in measured.items() if not isinstance(v, str)}
            results[evaluation.name] = metrics
            with self.writer.as_default(step=step):
                for name, value in metrics.items():
                    tf.summary.scalar(f"eval/{evaluation.name}/{name}", value)
            if self.verbose:
                shown = "  ".join(f"{k} {metrics[k]:.4g}" for k in _PRINTED if k in metrics)
                print(f"eval step {step} {evaluation.name}: {shown}  "
                      f"({time.perf_counter() - start:.1f} s)", flush=True)
        self.writer.flush()
        self._evaluated = step
        if self._mode:
            value = results[self.config.eval.best_set][self.config.eval.best_metric]
            better = self._best is None or (value > self._best if self._mode == "max"
                                            else value < self._best)
            if better:
                self._keep(step, value, results)
        return results

    def _keep(self, step: int, value: float, results: dict[str, dict[str, float]]) -> None:
        """Writes `.best-<step>-<pid>` completely, then points the `best` symlink at it."""
        # The process id keeps the name apart from the one `best` may point at
        # now: a resumed run can evaluate a step again.
        target = f".{BEST_DIR}-{step}-{os.getpid()}"
        link = self.model_dir / BEST_DIR
        with atomic_path(self.model_dir / target) as tmp:
            tmp.mkdir()
            scorer = self._scoring.scorer if self._scoring is not None else None
            # A scorer with trained weights (HIB's) is the head's: kept with the backbone.
            head = getattr(self.model, "head", None) if scorer is not None and scorer.weights else None
            save_backbone(self._twin, tmp, step, head)
            save_config(self._best_config, tmp / "config.yaml")
            if (self.model_dir / RUN_FILE).is_file():  # the data directory, for embed / evaluate / export
                shutil.copy(self.model_dir / RUN_FILE, tmp / RUN_FILE)
            (tmp / BEST_JSON).write_text(json.dumps({
                "step": step, "metric": self.config.eval.keep_best, "value": value,
                "mode": self._mode, "metrics": results}, indent=2))
        with atomic_path(link) as tmp:
            tmp.symlink_to(target)
        for stale in self.model_dir.glob(f".{BEST_DIR}-*"):
            if stale.name != target:
                shutil.rmtree(stale, ignore_errors=True)
        self._best = value
        if self.verbose:
            print(f"eval step {step}: best {self.config.eval.keep_best} {value:.4g}, kept in {link}",
                  flush=True)
