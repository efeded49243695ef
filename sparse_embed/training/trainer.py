"""The trainer: backbone + head + scheduled sparsity regularizer in one Keras model.

`train()` is what `python -m sparse_embed.train` runs: it builds the input
pipeline, model, optimizer and LR schedule from a `Config`, restores the latest
checkpoint of `model_dir` if there is one (global step, optimizer slots and
therefore both schedules, which are pure functions of the step), and fits
until `train.steps`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from sparse_embed import compression
from sparse_embed.checkpoints import CHECKPOINT_DIR, checkpoint_for, saved_shards, variable_key, worker_dir
from sparse_embed.config import (
    Config,
    OptimizerConfig,
    SparsityConfig,
    check_head_distribution,
    config_from_model_dir,
    config_to_dict,
    save_config,
)
from sparse_embed.data.augment import to_model_input
from sparse_embed.data.checks import damaged_tfrecords, train_inputs
from sparse_embed.data.pipeline import training_stream
from sparse_embed.data.tfrecord import read_label_map
from sparse_embed.distributions import Distribution
from sparse_embed.errors import ConfigError, DataError, SparseEmbedError
from sparse_embed.heads import HEADS, build_head
from sparse_embed.heads.pair import PairLossHead
from sparse_embed.heads.partial_fc import shard_range
from sparse_embed.heads.probabilistic import ProbabilisticHead
from sparse_embed.keras import keras, silence_warnings, tf
from sparse_embed.models import build_model
from sparse_embed.models.embedding import EXTRA_LAYER, PARAMETERS_LAYER, mean_network
from sparse_embed.registry import Registry
from sparse_embed.run_record import write_run_record
from sparse_embed.sparsity import REGULARIZERS, sparsity_stats, sparsity_weight
from sparse_embed.strategy import Strategy
from sparse_embed.training.callbacks import (
    CheckpointEvery,
    ProgressLog,
    StopOnNonFiniteLoss,
    SummaryScalars,
    Throughput,
    VerificationEval,
    read_eval_sets,
)
from sparse_embed.training.distributed import get_strategy, scratch_checkpoint_dir
from sparse_embed.training.schedules import LearningRateSchedule

OPTIMIZERS: Registry = Registry("optimizer")


@OPTIMIZERS.register("sgd")
def _sgd(config: OptimizerConfig, lr: keras.optimizers.schedules.LearningRateSchedule):
    return keras.optimizers.SGD(
        lr, momentum=config.momentum, weight_decay=config.weight_decay or None,
        clipnorm=config.clipnorm or None,
    )


@OPTIMIZERS.register("adam")
def _adam(config: OptimizerConfig, lr: keras.optimizers.schedules.LearningRateSchedule):
    return keras.optimizers.Adam(lr, clipnorm=config.clipnorm or None)


@OPTIMIZERS.register("adamw")
def _adamw(config: OptimizerConfig, lr: keras.optimizers.schedules.LearningRateSchedule):
    return keras.optimizers.AdamW(
        lr, weight_decay=config.weight_decay, clipnorm=config.clipnorm or None
    )


def apply_gradients(optimizer: keras.optimizers.Optimizer, grads_and_vars: Iterable,
                    lr_multipliers: Sequence[tuple[tf.Variable, float]] = ()) -> None:
    """Applies averaged gradients, stepping some variables as if at a multiple of the learning rate.

    The optimizer steps every variable; each variable v of `lr_multipliers`
    then moves `m` times as far: v <- v_old + m (v_new - v_old). That is
    exactly the step of the same optimizer at m times the learning rate,
    because each optimizer of `OPTIMIZERS` moves a variable by an amount
    proportional to the rate: SGD by -lr g (with momentum, the velocity
    accumulates lr g, so it and every later step scale with lr too), Adam by
    -lr m_hat / (sqrt(v_hat) + eps), and the decoupled weight decay of SGD and
    AdamW by -lr wd v. Multiplying the gradient instead would be the same for
    plain SGD only: Adam divides its scale away. (Exact in real arithmetic; in
    float32 the rescaled step carries about m ulps of v of rounding.) The
    optimizer's slots are the same as without multipliers, so checkpoints and
    resume are unaffected, and a step the loss scaler skips stays skipped.

    Args:
        optimizer: The run's optimizer (possibly a `LossScaleOptimizer`).
        grads_and_vars: (gradient, variable) pairs, already averaged over workers.
        lr_multipliers: (variable, multiplier) pairs; a multiplier of 1 changes nothing.
    """
    scaled = [(v, m) for v, m in lr_multipliers if m != 1.0]
    before = [tf.identity(v) for v, _ in scaled]
    optimizer.apply_gradients(grads_and_vars, skip_gradients_aggregation=True)
    for (variable, multiplier), old in zip(scaled, before, strict=True):
        variable.assign(old + multiplier * (variable - old))


class EmbeddingTrainer(keras.Model):
    """Trains a backbone with a classification head and a sparsity regularizer.

    loss = head_loss(e, y) + w(t) * R(normalize(e)), where R is the FLOPs or L1
    regularizer of Paria et al. (2020) applied to the L2-normalised embeddings
    that retrieval uses, and w(t) the scheduled weight. A probabilistic model's
    output is a parameter vector `[mean | extra]`: the head reads all of it,
    the regularizer and the sparsity statistics the mean, and the mean
    confidence of the batch is logged. The embeddings, the
    regularizer and the loss are float32 even when the backbone runs in
    float16; with a `LossScaleOptimizer` the loss is scaled before the gradient
    and the gradients unscaled after they are averaged over workers, so every
    worker sees the same overflow and skips the same steps.

    Args:
        backbone: images -> embeddings (after the final activation).
        head: A head layer from `sparse_embed.heads` (`head.loss_and_accuracy(e, y)`).
        sparsity: The `sparsity` section of the config.
        strategy: Averages gradients and metrics across workers.
        distribution: How a probabilistic backbone's output is read; None for
            an embedding (a `dirac` model).
        **kwargs: Passed to `keras.Model`.
    """

    def __init__(self, backbone: keras.Model, head: keras.layers.Layer,
                 sparsity: SparsityConfig, strategy: Strategy,
                 distribution: Distribution | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.backbone = backbone
        self.head = head
        self.sparsity = sparsity
        self.strategy = strategy
        self.distribution = distribution
        self._regularizer = REGULARIZERS.get(sparsity.type)
        # Examples consumed by all workers together: what a resume with a
        # different worker count needs (a step count alone depends on N when
        # the global batch does).
        self.samples = tf.Variable(0, dtype=tf.int64, trainable=False, name="samples",
                                   aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        # Pruning masks are computed alike on every worker from the same
        # weights: averaging them would only cost an all-reduce.
        same = {id(v) for v in compression.identical_on_workers(backbone)}
        self._moving_statistics = [v for v in backbone.non_trainable_variables
                                   if v.dtype.is_floating and id(v) not in same]
        self._compress_metrics = compression.metrics(backbone)
        # Variables stepped faster than the rest (a proxy head's proxies).
        self._lr_multipliers = list(getattr(head, "lr_multipliers", ()))
        # The step returns metrics already averaged over workers: Keras must
        # report one replica's copy, not their sum.
        self.distribute_reduction_method = "first"

    def call(self, images: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        return self.backbone(images, training=training)

    @property
    def sharded_variables(self) -> list[tf.Variable]:
        """Variables that differ per worker (a sharded head's class centres)."""
        return list(getattr(self.head, "sharded_variables", ()))

    def _reduce(self, grads: list, variables: list[tf.Variable]) -> list:
        """Averages replicated gradients over workers; scales sharded ones by 1/N.

        A sharded variable lives on one worker, and its gradient is already
        that of the sum of the workers' losses (heads/partial_fc.py), so it is
        divided by N instead of averaged with the other workers' (different)
        variables.
        """
        sharded_ids = {id(v) for v in self.sharded_variables}
        sharded = [i for i, v in enumerate(variables) if id(v) in sharded_ids]
        replicated = [i for i in range(len(variables)) if i not in sharded]
        reduced = list(grads)
        averaged = self.strategy.reduce_gradients([grads[i] for i in replicated])
        for i, g in zip(replicated, averaged, strict=True):
            reduced[i] = g
        scale = 1.0 / self.strategy.num_workers
        for i in sharded:
            g = grads[i]
            # Sampled class centres have IndexedSlices gradients: keep them sparse.
            reduced[i] = (tf.IndexedSlices(g.values * scale, g.indices, g.dense_shape)
                          if isinstance(g, tf.IndexedSlices) else g * scale)
        return reduced

    # Traced as written: the step, the heads and the regularizers branch on Python
    # values only, and AutoGraph's conversion of every function they call (a few
    # seconds of CPU per training process) would change nothing.
    @tf.autograph.experimental.do_not_convert
    def train_step(self, data: tuple[tf.Tensor, tf.Tensor]) -> dict[str, tf.Tensor]:
        images, labels = data
        images = to_model_input(images)
        optimizer = self.optimizer
        loss_scaled = isinstance(optimizer, keras.mixed_precision.LossScaleOptimizer)
        step = optimizer.iterations
        weight = sparsity_weight(self.sparsity, step)
        cross_replica_mean = self.strategy.mean if self.sparsity.cross_replica else None
        with tf.GradientTape() as tape:
            embeddings = tf.cast(self.backbone(images, training=True), tf.float32)
            head_loss, accuracy = self.head.loss_and_accuracy(embeddings, labels, training=True)
            means = embeddings if self.distribution is None else embeddings[:, :self.distribution.dim]
            normalized = tf.math.l2_normalize(means, axis=-1)
            sparsity_loss = self._regularizer(normalized, cross_replica_mean)
            loss = head_loss + weight * sparsity_loss
            objective = optimizer.get_scaled_loss(loss) if loss_scaled else loss
        variables = self.trainable_variables
        grads = self._reduce(tape.gradient(objective, variables), variables)
        if loss_scaled:
            grads = optimizer.get_unscaled_gradients(grads)
        # The strategy has averaged the gradients already.
        apply_gradients(optimizer, zip(grads, variables, strict=True), self._lr_multipliers)
        # BatchNorm moving statistics follow each worker's own batches; their
        # average keeps every worker's model identical, and is the moving
        # average of the workers' mean batch statistics.
        self.strategy.average_variables(self._moving_statistics)
        self.samples.assign_add(
            tf.cast(tf.shape(images)[0], tf.int64) * self.strategy.num_workers
        )
        # Read after applying: the optimizer stores the rate it just used.
        lr = optimizer.learning_rate
        stats = sparsity_stats(normalized, self.sparsity.zero_threshold)
        metrics = {
            "loss": loss,
            "head_loss": head_loss,
            "sparsity_loss": sparsity_loss,
            "sparsity_weight": weight,
            "accuracy": accuracy,
            "nnz": stats["nnz"],
            "flops": stats["flops"],
            "r_sub": stats["r_sub"],
            "lr": tf.cast(lr, tf.float32),
            **self._compress_metrics(),
        }
        if self.distribution is not None and self.distribution.has_confidence:
            metrics["confidence"] = tf.reduce_mean(self.distribution.confidence(embeddings))
        if loss_scaled:
            metrics["loss_scale"] = tf.cast(optimizer.loss_scale, tf.float32)
        # Every worker logs (and the non-finite guard sees) the average over
        # workers: one all-reduce of the stacked values.
        averaged = tf.unstack(self.strategy.mean(tf.stack(list(metrics.values()))))
        return dict(zip(metrics, averaged, strict=True))


@dataclass(frozen=True)
class TrainResult:
    """What a finished `train()` reports.

    Attributes:
        step: The global step reached.
        resumed_from: The step restored from a checkpoint (0 for a fresh run).
        samples: Training examples consumed by all workers together.
        num_workers: Workers that trained this time.
        metrics: The last step's training metrics, averaged over workers (empty if no step ran).
        images_per_second: Training examples per second of all workers together,
            after the first (traced) step; 0 when fewer than two steps ran.
        model: The trained model (`model.backbone`, `model.head`) of this worker.
    """

    step: int
    resumed_from: int
    samples: int
    num_workers: int
    metrics: dict[str, float]
    images_per_second: float
    model: EmbeddingTrainer = field(repr=False, compare=False)


def build_networks(config: Config, num_classes: int,
                   strategy: Strategy | None = None) -> tuple[keras.Model, keras.layers.Layer]:
    """Builds the backbone and head of a run, with every variable created.

    With `train.mixed_precision`, both are built under the `mixed_float16`
    policy (float32 variables, float16 compute); the process's global policy
    is restored afterwards.

    Args:
        config: The run config.
        num_classes: Number of training identities.
        strategy: What a sharded head (`head.sharded`) splits its classes over; None is one process.

    Returns:
        (backbone, head): the backbone outputs the embeddings, or with a
        probabilistic `model.distribution` the parameter vectors the head reads.
    """
    previous = keras.mixed_precision.global_policy()
    if config.train.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        backbone = build_model(config.model)
        distribution = config.model.distribution.build(config.model.embedding_size)
        width = distribution.num_parameters
        head = build_head(num_classes, width, config.head, strategy, distribution=distribution)
        if isinstance(head, (PairLossHead, ProbabilisticHead)) and strategy is not None:
            # What `head.gather_batch` gathers the batch over (pair losses, HIB, PFE, SPE).
            head.strategy = strategy
        head.build((None, width))
    finally:
        keras.mixed_precision.set_global_policy(previous)
    return backbone, head


def check_sampler(config: Config) -> None:
    """Checks that a pair loss gets batches with at least two images of each class.

    Args:
        config: The run config (`head.name`, `data.sampler`, `data.samples_per_class`).

    Raises:
        ConfigError: If a pair loss, or a head that needs class-balanced batches
            (SPE), would train without the P x K sampler or with K < 2.
    """
    data = config.data
    if HEADS.get(config.head.name).balanced and (data.sampler != "p_k" or data.samples_per_class < 2):
        raise ConfigError(
            f"head.name={config.head.name} needs class-balanced batches, every class of a batch "
            f"equally often and at least twice (got data.sampler={data.sampler}, "
            f"data.samples_per_class={data.samples_per_class}); set data.sampler: p_k (with "
            f"data.samples_per_class >= 2)"
        )
    if HEADS.get(config.head.name).pairs and (data.sampler != "p_k" or data.samples_per_class < 2):
        raise ConfigError(
            f"head.name={config.head.name} is a pair loss and needs at least two images of every "
            f"class in a batch (got data.sampler={data.sampler}, data.samples_per_class="
            f"{data.samples_per_class}); set data.sampler: p_k (with data.samples_per_class >= 2)"
        )


def worker_batch_size(config: Config, num_workers: int) -> int:
    """Examples per step on each worker.

    Args:
        config: The run config (`train.batch_size`, `distributed.scale_lr`).
        num_workers: Number of workers.

    Raises:
        ConfigError: If the global batch does not split evenly over the workers.
    """
    batch = config.train.batch_size
    if config.distributed.scale_lr:
        return batch
    if batch % num_workers:
        raise ConfigError(
            f"train.batch_size={batch} (the global batch) does not split over {num_workers} "
            f"workers; use a multiple of {num_workers}, or set distributed.scale_lr=true to make "
            f"it the per-worker batch"
        )
    return batch // num_workers


def _restore(checkpoint: tf.train.Checkpoint, manager: tf.train.CheckpointManager,
             config: Config, model_dir: Path, strategy: Strategy, per_worker: bool) -> None:
    """Restores the latest checkpoint on every worker that sees one.

    Workers agree on the outcome before anyone goes on, so a checkpoint that
    does not fit the config stops every worker with the same error instead of
    leaving some waiting in the first collective. With per-worker checkpoints
    (a sharded head), they also agree on the step: the latest one every worker
    saved, since a kill can fall between two workers' saves.
    """
    path = manager.latest_checkpoint
    if per_worker:
        steps = {int(p.rsplit("-", 1)[1]) for p in manager.checkpoints}
        agreed = strategy.min_int(max(steps, default=0))
        path = f"{manager.directory}/ckpt-{agreed}" if agreed in steps else None
        if strategy.any(agreed > 0 and path is None):
            raise ConfigError(
                f"the workers' checkpoints in {model_dir / CHECKPOINT_DIR} have no common step; "
                f"raise train.keep_checkpoints, or start again with a new --model_dir"
            )
    error = None
    if path:
        try:
            checkpoint.restore(path).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as e:
            error = str(e).strip().splitlines()[0][:200]
        if error is not None:
            # The failed restore warns about its unrestored values at shutdown;
            # the error below already says what happened.
            silence_warnings()
    if strategy.any(error is not None):
        raise ConfigError(
            f"the checkpoint in {model_dir / CHECKPOINT_DIR} does not match this config "
            f"({error or 'failed on another worker'}){_config_differences(config, model_dir)}; "
            f"resume with the config it was trained with, or pass a new --model_dir"
        )


def _checkpoint_dir(model_dir: Path, strategy: Strategy, per_worker: bool) -> Path:
    """Where this worker's checkpoints go.

    The chief's checkpoints are always in `model_dir/checkpoints` (what embed
    and evaluate read: the backbone is the same on every worker). With a
    sharded head, the other workers keep their own class centres and
    optimizer slots in `checkpoints/worker-<r>-of-<N>`.
    """
    root = model_dir / CHECKPOINT_DIR
    if per_worker and not strategy.is_chief:
        return worker_dir(root, strategy.worker_index, strategy.num_workers)
    return root


def _reshard_restore(model: EmbeddingTrainer, optimizer: keras.optimizers.Optimizer,
                     model_dir: Path, old_shards: int) -> int:
    """Restores a sharded-head run saved by `old_shards` workers into this worker's block.

    Everything but the class centres comes from the chief's checkpoint; this
    worker's centres and their optimizer slots are cut from the old workers'
    blocks that overlap its new block. Every worker reads only files, so no
    collective is needed. Under mixed precision the dynamic loss scale starts
    again from its initial value and settles within a few steps. Returns the
    step restored.

    Raises:
        ConfigError: If the old workers' checkpoints share no step.
    """
    head = model.head
    root = model_dir / CHECKPOINT_DIR
    dirs = [root] + [worker_dir(root, r, old_shards) for r in range(1, old_shards)]
    saved = []
    for directory in dirs:
        state = tf.train.get_checkpoint_state(str(directory))
        paths = state.all_model_checkpoint_paths if state else []
        saved.append({int(path.rsplit("-", 1)[1]) for path in paths})
    common = set.intersection(*saved)
    if not common:
        raise ConfigError(
            f"{root} holds a sharded head checkpointed over {old_shards} workers with no step "
            f"saved by all of them; resume it with {old_shards} workers, or pass a new --model_dir"
        )
    step = max(common)
    readers = [tf.train.load_checkpoint(str(d / f"ckpt-{step}")) for d in dirs]
    checkpoint_for(model.backbone, samples=model.samples).restore(
        str(root / f"ckpt-{step}")).expect_partial()

    start, end = head.class_start, head.class_start + head.num_local

    def my_rows(key: str) -> np.ndarray:
        parts = []
        for r, reader in enumerate(readers):
            old_start, old_end = shard_range(head.num_classes, old_shards, r)
            lo, hi = max(start, old_start), min(end, old_end)
            if lo < hi:
                parts.append(reader.get_tensor(key)[lo - old_start:hi - old_start])
        return np.concatenate(parts)

    head.kernel.assign(my_rows(variable_key("head/kernel")))
    slots = {v.name for v in optimizer.variables} - {v.name for v in _replicated(
        optimizer.variables, [head.kernel])}
    chief = readers[0]
    optimizer.iterations.assign(chief.get_tensor(variable_key("optimizer/_iterations")))
    # The optimizer checkpoints its slots by position, the same for every
    # worker count; position 0 is the step counter.
    for i, variable in enumerate(optimizer.variables[1:], start=1):
        key = variable_key(f"optimizer/_variables/{i}")
        variable.assign(my_rows(key) if variable.name in slots else chief.get_tensor(key))
    return step


def _replicated(variables: list[tf.Variable], sharded: list[tf.Variable]) -> list[tf.Variable]:
    """`variables` without the sharded ones and their optimizer slots.

    Keras names a slot `<slot>/<variable's shared name>` (`m/sharded_arcface_head/kernel:0`).
    """
    own = {v.name for v in sharded} | {getattr(v, "_shared_name", v.name) for v in sharded}
    return [v for v in variables
            if v.name not in own and v.name.split("/", 1)[-1].removesuffix(":0") not in own]


def _config_differences(config: Config, model_dir: Path) -> str:
    """Names the model/head keys where `model_dir/config.yaml` differs from `config`."""
    try:
        saved = config_to_dict(config_from_model_dir(model_dir))
    except SparseEmbedError:
        return ""
    new = config_to_dict(config)
    keys = [f"{section}.{key}" for section in ("model", "head")
            for key, value in new[section].items() if saved[section].get(key) != value]
    return f"; {model_dir}/config.yaml differs in {', '.join(keys)}" if keys else ""


# Compression types whose checkpoints can start another run: they restore
# into a float backbone (a pruned one once its wrappers are stripped). A
# quantization-aware run has no float model left to start from.
_INIT_SOURCES = ("none", "prune")


def check_compression(config: Config) -> None:
    """Checks that the compression section fits the rest of the run.

    Args:
        config: The run config.

    Raises:
        ConfigError: If compression is asked for under mixed precision, or
            `prune_qat` has no pruned run to start from.
    """
    kind = config.compression.type
    if kind != "none" and config.train.mixed_precision:
        # TF-MOT's fake-quant ops are float32 only, and its pruning wrapper
        # calls the wrapped layer without Keras' float16 autocast of the kernel.
        raise ConfigError(
            f"compression.type={kind} cannot run with train.mixed_precision=true (TF-MOT "
            f"quantizes and prunes float32 layers only); set train.mixed_precision=false"
        )
    if kind == "prune_qat" and not config.train.init_from:
        raise ConfigError(
            "compression.type=prune_qat keeps the zeros of a pruned run; pass --init_from=RUN "
            "(set train.init_from) with a run trained with compression.type=prune"
        )


def check_init_run(config: Config) -> Config:
    """Checks the run `train.init_from` names and returns its config.

    Args:
        config: The run config, with `train.init_from` set.

    A run with another `model.distribution` than the init run's (a
    probabilistic method's second stage) starts from an uncompressed `dirac`
    run: its mean is the init run's embedding, its extra head starts fresh.

    Raises:
        ConfigError: If the directory has no config.yaml, was trained with a
            different model (the differing keys are named), another
            distribution than `dirac` or this run's, or with a compression it
            cannot start from, or a `prune_qat` run does not start from a pruned one.
        DataError: If it has no checkpoint.
    """
    init_dir = Path(config.train.init_from)
    init = config_from_model_dir(init_dir)
    if tf.train.latest_checkpoint(str(init_dir / CHECKPOINT_DIR)) is None:
        raise DataError(f"train.init_from={init_dir} has no checkpoint in {init_dir / CHECKPOINT_DIR}; "
                        f"train that run first, or point --init_from at a trained run")
    new, old = config_to_dict(config)["model"], config_to_dict(init)["model"]
    keys = [f"model.{k}={v!r} (init run: {old.get(k)!r})" for k, v in new.items()
            if k != "distribution" and old.get(k) != v]
    if keys:
        raise ConfigError(f"train.init_from={init_dir} was trained with a different model: "
                          f"{', '.join(keys)}; use the same model settings as that run")
    kind = init.compression.type
    if init.model.distribution != config.model.distribution:
        if init.model.distribution.name != "dirac":
            raise ConfigError(
                f"train.init_from={init_dir} was trained with model.distribution.name="
                f"{init.model.distribution.name}, and this run reads another distribution; start "
                f"from a dirac run, or from one with this run's model.distribution")
        if kind != "none":
            raise ConfigError(
                f"train.init_from={init_dir} is a compression.type={kind} run; a "
                f"model.distribution.name={config.model.distribution.name} run starts from an "
                f"uncompressed one (compression.type=none)")
    if kind not in _INIT_SOURCES:
        raise ConfigError(f"train.init_from={init_dir} is a compression.type={kind} run, which cannot "
                          f"start another; start from its own init run (train.init_from in its config)")
    if config.compression.type == "prune_qat" and kind != "prune":
        raise ConfigError(f"compression.type=prune_qat needs a pruned run; train.init_from={init_dir} "
                          f"has compression.type={kind}: prune it first (compression.type=prune)")
    return init


def initialize_from(backbone: keras.Model, head: keras.layers.Layer, config: Config,
                    init: Config) -> keras.Model:
    """Loads the latest backbone (and head, when it fits) of the run `config.train.init_from`.

    The init run's own compression is rebuilt first so its checkpoint fits,
    then taken off again: a pruned run's wrappers are stripped (masks applied),
    leaving a float backbone with its zeros. The head is restored when it has
    the same variables and shapes (same head and number of classes); otherwise
    it keeps its fresh initialisation and a warning says so, since a new
    class set needs new class centres. The optimizer, step and data position
    start again at 0.

    A probabilistic run from a `dirac` one (`check_init_run`) takes the init
    run's backbone and embedding layer as its mean's network; its extra head
    starts fresh. A head with `set_class_centres` (DUL-reg, SCF) takes the
    class centres of the init run's margin head. The parts `train.reinit`
    names keep this run's fresh initialisation (layers by name, batch-norm
    statistics included; the head loads nothing).

    Args:
        backbone: The freshly built float backbone of this run.
        head: This run's head.
        config: This run's config.
        init: The init run's config (`check_init_run`).

    Returns:
        The float backbone holding the init run's weights (`backbone` itself
        unless the init run was pruned).

    Raises:
        ConfigError: If the checkpoint does not fit the rebuilt backbone.
    """
    init_dir = Path(config.train.init_from)
    latest = tf.train.latest_checkpoint(str(init_dir / CHECKPOINT_DIR))
    reinit = config.train.reinit
    fresh_layers = {layer.name: layer.get_weights() for layer in backbone.layers
                    if _part(layer.name) in reinit}
    whole = init.model.distribution == config.model.distribution
    # Another distribution: only the mean's part (the init run's whole backbone) has weights to load.
    source = compression.compress(backbone if whole else mean_network(backbone), init.compression,
                                  init.train.steps)
    try:
        checkpoint_for(source).restore(latest).expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as e:
        silence_warnings()
        reason = str(e).strip().splitlines()[0][:200]
        raise ConfigError(f"the checkpoint {latest} of train.init_from does not fit this backbone "
                          f"({reason}); check that run's config.yaml") from e
    restored = compression.for_export(source) if whole else backbone
    for layer in restored.layers:
        if layer.name in fresh_layers:
            layer.set_weights(fresh_layers[layer.name])
    if "head" in reinit:
        return restored
    if hasattr(head, "set_class_centres"):
        _load_class_centres(head, latest, init_dir, init)
        return restored
    fresh = head.get_weights()
    try:
        tf.train.Checkpoint(head=head).restore(latest).expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError):
        head.set_weights(fresh)
        logging.warning("train.init_from=%s: its head does not fit this one (head %s, %s classes "
                        "there); the head starts from scratch", init_dir, init.head.name,
                        _init_classes(init_dir))
    return restored


def _load_class_centres(head: keras.layers.Layer, latest: str, init_dir: Path, init: Config) -> None:
    """Gives `head` the class centres of the init run's margin head, or warns that it cannot."""
    reader = tf.train.load_checkpoint(latest)
    key = variable_key("head/kernel")
    reason = f"it has no class centres (head {init.head.name})"
    if key in reader.get_variable_to_shape_map():
        try:
            head.set_class_centres(reader.get_tensor(key))
            return
        except ValueError as e:
            reason = str(e)
    logging.warning("train.init_from=%s: %s; the class centres start from scratch", init_dir, reason)


def _part(layer_name: str) -> str:
    """Which part of a backbone (`FREEZABLE`) a layer belongs to; `extra` for the extra head."""
    if layer_name in (EXTRA_LAYER, PARAMETERS_LAYER):
        return "extra"
    if layer_name == "embedding" or layer_name.startswith("embedding_"):
        return "embedding"
    return "backbone"


def freeze(backbone: keras.Model, head: keras.layers.Layer, parts: Sequence[str]) -> None:
    """Stops the training of the named parts (`train.freeze`).

    A frozen layer's weights leave the trainable variables; a frozen batch
    norm also runs in inference mode, so its statistics stay as they are.

    Args:
        backbone: The run's backbone (`backbone`: the layers before the
            embedding layer; `embedding`: the embedding layer and its dense
            layer and batch norm; the extra head always trains).
        head: The run's head (`head`).
        parts: Names of `sparse_embed.config.FREEZABLE`.
    """
    for layer in backbone.layers:
        if _part(layer.name) in parts:
            layer.trainable = False
    if "head" in parts:
        head.trainable = False


def _init_classes(init_dir: Path) -> str:
    """The number of classes of the init run's head, read from its checkpoint's shapes (or '?')."""
    latest = tf.train.latest_checkpoint(str(init_dir / CHECKPOINT_DIR))
    shapes = tf.train.load_checkpoint(latest).get_variable_to_shape_map()
    kernel = shapes.get(variable_key("head/kernel"))
    return str(kernel[-1]) if kernel else "?"


def _damaged_input_error(pattern: str, error: tf.errors.DataLossError) -> DataError:
    """A one-line error naming the damaged TFRecord shard(s) behind a DataLossError."""
    damaged = damaged_tfrecords(pattern)
    if not damaged:
        reason = str(error).strip().splitlines()[0][:200]
        return DataError(f"a TFRecord file matching {pattern} is corrupt ({reason}); rebuild the "
                         f"shards with sparse-embed-build-tfrecords")
    path, records, problem = damaged[0]
    others = f" (and {len(damaged) - 1} more damaged shard(s))" if len(damaged) > 1 else ""
    return DataError(
        f"TFRecord shard {path} is damaged after {records} intact records: {problem}{others}; "
        f"rebuild it with sparse-embed-build-tfrecords, then re-run to resume"
    )


def train(config: Config, data_dir: str | os.PathLike, model_dir: str | os.PathLike,
          strategy: Strategy | None = None, verbose: int = 1) -> TrainResult:
    """Trains (or resumes training) a run until `config.train.steps`.

    Every worker builds the same model, restores the latest checkpoint of
    `model_dir` if it has one, and then takes rank 0's variables (weights,
    optimizer slots, global step, examples consumed). Each worker reads its own
    share of the TFRecords, skipping its share of the examples already
    consumed, so a resume continues at the right place even when the number of
    workers changed. Only the chief writes config.yaml (and run.json, the data
    directory: `sparse_embed.run_record`), checkpoints and
    summaries, and only the chief evaluates `eval.sets` during training
    (`VerificationEval`, with `eval.every_steps`): the other workers wait for
    it in the next step's all-reduce.

    Args:
        config: The resolved run config.
        data_dir: Directory the `data.*` paths of the config are relative to.
        model_dir: Output directory: config.yaml, checkpoints/, TensorBoard logs.
        strategy: Distribution strategy; by default the one `config.distributed` names.
        verbose: 0 silent, 1 Keras progress bar, 2 one line of metrics every `train.log_every` steps.

    Returns:
        The step reached, the step resumed from, examples consumed and the last metrics.

    Raises:
        ConfigError: If the backend is unavailable, the batch does not split over
            the workers, a pair loss runs without the P x K sampler, or the
            checkpoint in `model_dir` does not fit the config.
        DataError: If the data dir, TFRecords or label map, or a set of `eval.sets`, are missing.
        TrainingError: If the loss becomes non-finite.
    """
    check_head_distribution(config)
    check_sampler(config)
    strategy = strategy or get_strategy(config.distributed)
    data_dir, model_dir = Path(data_dir), Path(model_dir)
    pattern, label_map = train_inputs(config, data_dir)
    class_names = read_label_map(label_map)
    per_worker_batch = worker_batch_size(config, strategy.num_workers)
    # Only the chief evaluates during training; its sets are read before the
    # model is built, so a bad set stops the run before any step.
    eval_sets = read_eval_sets(config, data_dir) if config.eval.every_steps and strategy.is_chief else ()
    keras.utils.set_random_seed(config.train.seed)

    # --- model ---
    if config.head.sharded and strategy.name in ("mirrored", "multi_worker"):
        raise ConfigError(
            f"head.sharded splits class centres over Horovod processes; with "
            f"distributed.backend={strategy.name} use head.sharded=false, or run under horovodrun"
        )
    schedule = config.schedule
    if config.distributed.scale_lr:
        schedule = dataclasses.replace(schedule, base_lr=schedule.base_lr * strategy.num_workers)
    check_compression(config)
    fresh_run = tf.train.latest_checkpoint(str(model_dir / CHECKPOINT_DIR)) is None
    if HEADS.get(config.head.name).two_stage and fresh_run and not config.train.init_from:
        raise ConfigError(
            f"head.name={config.head.name} trains on top of a deterministic run: pass "
            f"--init_from=RUN (set train.init_from) with a run of the same model trained with "
            f"model.distribution.name=dirac (e.g. head.name=arcface)")
    init = check_init_run(config) if config.train.init_from and fresh_run else None
    with strategy.scope():
        backbone, head = build_networks(config, len(class_names), strategy)
        # The init run's weights go in before compression: folding a BN, or
        # pruning by magnitude, acts on trained values. A resume rebuilds the
        # same compressed structure and restores it from this run's checkpoints.
        if init is not None:
            backbone = initialize_from(backbone, head, config, init)
        backbone = compression.compress(backbone, config.compression, config.train.steps)
        optimizer = OPTIMIZERS.get(config.optimizer.name)(
            config.optimizer, LearningRateSchedule(schedule, config.train.steps)
        )
        if config.train.mixed_precision:
            optimizer = keras.mixed_precision.LossScaleOptimizer(optimizer)
        distribution = config.model.distribution.build(config.model.embedding_size)
        model = EmbeddingTrainer(backbone, head, config.sparsity, strategy,
                                 None if config.model.distribution.name == "dirac" else distribution)
        # After the trainer noted the moving statistics: frozen weights are not averaged every step.
        freeze(backbone, head, config.train.freeze)
        model.compile(optimizer=optimizer)
        # Creating the optimizer slots before restoring makes the restore immediate
        # and exact, instead of deferred until the first step, and gives the
        # broadcast below every variable to copy.
        optimizer.build(model.trainable_variables)

    # With class centres split over the workers, every worker saves its own.
    per_worker = bool(model.sharded_variables) and strategy.num_workers > 1
    checkpoint = checkpoint_for(backbone, head, optimizer, model.samples)
    manager = tf.train.CheckpointManager(
        checkpoint, str(_checkpoint_dir(model_dir, strategy, per_worker)),
        max_to_keep=config.train.keep_checkpoints,
    )
    old_shards = saved_shards(model_dir) if model.sharded_variables else None
    if old_shards is not None and old_shards != strategy.num_workers:
        _reshard_restore(model, optimizer, model_dir, old_shards)
    else:
        _restore(checkpoint, manager, config, model_dir, strategy, per_worker)
    strategy.broadcast_variables(
        _replicated(model.variables + optimizer.variables, model.sharded_variables))
    compression.after_restore(backbone)
    start = int(optimizer.iterations.numpy())
    samples = int(model.samples.numpy())
    remaining = config.train.steps - start
    if remaining <= 0:
        return TrainResult(step=start, resumed_from=start, samples=samples,
                           num_workers=strategy.num_workers, metrics={}, images_per_second=0.0,
                           model=model)

    # --- data ---
    def make_dataset(num_pipelines: int, index: int) -> tf.data.Dataset:
        # Each pipeline skips its share of the examples all workers consumed.
        return training_stream(pattern, config.data, per_worker_batch, config.model.input_shape,
                               config.train.seed, num_pipelines, index, samples // num_pipelines)

    # Built before anything is written, so bad input leaves no half-made run behind.
    dataset = strategy.distribute_dataset(make_dataset)
    if strategy.is_chief:
        model_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, model_dir / "config.yaml")
        # The data directory, so embed / evaluate / export need no --data_dir.
        write_run_record(model_dir, data_dir)

    # --- train ---
    throughput = Throughput()
    callbacks: list[keras.callbacks.Callback] = [
        *compression.callbacks(backbone), StopOnNonFiniteLoss(optimizer), throughput]
    with contextlib.ExitStack() as stack:
        if strategy.is_chief or per_worker:
            callbacks.append(CheckpointEvery(manager, optimizer, config.train.checkpoint_every))
        elif strategy.saves_on_every_worker:
            scratch = stack.enter_context(scratch_checkpoint_dir())
            callbacks.append(CheckpointEvery(
                tf.train.CheckpointManager(checkpoint, scratch, max_to_keep=1),
                optimizer, config.train.checkpoint_every))
        if strategy.is_chief:
            if verbose == 2:
                callbacks.append(ProgressLog(optimizer, config.train.steps, config.train.log_every))
            summaries = SummaryScalars(str(model_dir / "logs" / "train"), optimizer,
                                       config.train.log_every)
            if eval_sets:
                # Ahead of the summaries: the last evaluation writes through
                # their writer, which they close at the end of training.
                callbacks.append(VerificationEval(backbone, eval_sets, config, model_dir, optimizer,
                                                  summaries.writer, verbose=verbose > 0))
            callbacks.append(summaries)
        try:
            history = model.fit(dataset, epochs=1, steps_per_epoch=remaining,
                                callbacks=callbacks,
                                verbose=1 if verbose == 1 and strategy.is_chief else 0)
        except tf.errors.DataLossError as e:
            raise _damaged_input_error(pattern, e) from e
    metrics = {k: float(v[-1]) for k, v in history.history.items()}
    end = int(model.samples.numpy())
    return TrainResult(step=int(optimizer.iterations.numpy()), resumed_from=start, samples=end,
                       num_workers=strategy.num_workers, metrics=metrics,
                       images_per_second=throughput.steps_per_second * (end - samples) / remaining,
                       model=model)
