"""The trainer: backbone + head + scheduled sparsity regularizer in one Keras model.

`train()` is what `python -m sparse_embed.train` runs: it builds the input
pipeline, model, optimizer and LR schedule from a `Config`, restores the latest
checkpoint of `model_dir` if there is one (global step, optimizer slots and
therefore both schedules, which are pure functions of the step), and fits
until `train.steps`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

from sparse_embed.config import Config, OptimizerConfig, SparsityConfig, save_config
from sparse_embed.data.checks import train_inputs
from sparse_embed.data.pipeline import train_dataset
from sparse_embed.data.tfrecord import read_label_map
from sparse_embed.heads import build_head
from sparse_embed.keras import keras
from sparse_embed.models import build_model
from sparse_embed.registry import Registry
from sparse_embed.sparsity import REGULARIZERS, sparsity_stats, sparsity_weight
from sparse_embed.training.callbacks import (
    CheckpointEvery,
    ProgressLog,
    StopOnNonFiniteLoss,
    SummaryScalars,
)
from sparse_embed.training.distributed import Strategy, get_strategy
from sparse_embed.training.schedules import LearningRateSchedule

CHECKPOINT_DIR = "checkpoints"

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


class EmbeddingTrainer(keras.Model):
    """Trains a backbone with a classification head and a sparsity regularizer.

    loss = head_loss(e, y) + w(t) * R(normalize(e)), where R is the FLOPs or L1
    regularizer of Paria et al. (2020) applied to the L2-normalised embeddings
    that retrieval uses, and w(t) the scheduled weight.

    Args:
        backbone: images -> embeddings (after the final activation).
        head: A head layer from `sparse_embed.heads` (`head(e, y)` -> loss, `head.logits(e)`).
        sparsity: The `sparsity` section of the config.
        strategy: Averages gradients across workers.
        **kwargs: Passed to `keras.Model`.
    """

    def __init__(self, backbone: keras.Model, head: keras.layers.Layer,
                 sparsity: SparsityConfig, strategy: Strategy, **kwargs) -> None:
        super().__init__(**kwargs)
        self.backbone = backbone
        self.head = head
        self.sparsity = sparsity
        self.strategy = strategy
        self._regularizer = REGULARIZERS.get(sparsity.type)

    def call(self, images: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        return self.backbone(images, training=training)

    def train_step(self, data: tuple[tf.Tensor, tf.Tensor]) -> dict[str, tf.Tensor]:
        images, labels = data
        step = self.optimizer.iterations
        weight = sparsity_weight(self.sparsity, step)
        with tf.GradientTape() as tape:
            embeddings = self.backbone(images, training=True)
            head_loss = self.head(embeddings, labels, training=True)
            normalized = tf.math.l2_normalize(embeddings, axis=-1)
            sparsity_loss = self._regularizer(normalized)
            loss = head_loss + weight * sparsity_loss
        variables = self.trainable_variables
        grads = self.strategy.reduce_gradients(tape.gradient(loss, variables))
        self.optimizer.apply_gradients(zip(grads, variables, strict=True))
        # Read after applying: the optimizer stores the rate it just used.
        lr = self.optimizer.learning_rate
        predictions = tf.argmax(self.head.logits(embeddings), axis=-1, output_type=labels.dtype)
        stats = sparsity_stats(normalized, self.sparsity.zero_threshold)
        return {
            "loss": loss,
            "head_loss": head_loss,
            "sparsity_loss": sparsity_loss,
            "sparsity_weight": weight,
            "accuracy": tf.reduce_mean(tf.cast(predictions == labels, tf.float32)),
            "nnz": stats["nnz"],
            "flops": stats["flops"],
            "r_sub": stats["r_sub"],
            "lr": tf.cast(lr, tf.float32),
        }


@dataclass(frozen=True)
class TrainResult:
    """What a finished `train()` reports.

    Attributes:
        step: The global step reached.
        resumed_from: The step restored from a checkpoint (0 for a fresh run).
        metrics: The last step's training metrics (empty if no step ran).
    """

    step: int
    resumed_from: int
    metrics: dict[str, float]


def build_networks(config: Config, num_classes: int) -> tuple[keras.Model, keras.layers.Layer]:
    """Builds the backbone and head of a run, with every variable created.

    Args:
        config: The run config.
        num_classes: Number of training identities.

    Returns:
        (backbone, head).
    """
    backbone = build_model(config.model)
    head = build_head(num_classes, config.model.embedding_size, config.head)
    head.build((None, config.model.embedding_size))
    return backbone, head


def checkpoint_for(backbone: keras.Model, head: keras.layers.Layer | None = None,
                   optimizer: keras.optimizers.Optimizer | None = None) -> tf.train.Checkpoint:
    """Returns the checkpoint object layout shared by training and embedding.

    Args:
        backbone: The embedding network.
        head: The training head, omitted when only embedding.
        optimizer: The optimizer, omitted when only embedding.
    """
    parts = {"backbone": backbone}
    if head is not None:
        parts["head"] = head
    if optimizer is not None:
        parts["optimizer"] = optimizer
    return tf.train.Checkpoint(**parts)


def train(config: Config, data_dir: str | os.PathLike, model_dir: str | os.PathLike,
          strategy: Strategy | None = None, verbose: int = 1) -> TrainResult:
    """Trains (or resumes training) a run until `config.train.steps`.

    Args:
        config: The resolved run config.
        data_dir: Directory the `data.*` paths of the config are relative to.
        model_dir: Output directory: config.yaml, checkpoints/, TensorBoard logs.
        strategy: Distribution strategy; the process's own by default.
        verbose: 0 silent, 1 Keras progress bar, 2 one line of metrics every `train.log_every` steps.

    Returns:
        The step reached, the step resumed from and the last metrics.

    Raises:
        DataError: If the data dir, TFRecords or label map are missing.
        TrainingError: If the loss becomes non-finite.
    """
    strategy = strategy or get_strategy()
    data_dir, model_dir = Path(data_dir), Path(model_dir)
    pattern, label_map = train_inputs(config, data_dir)
    class_names = read_label_map(label_map)
    keras.utils.set_random_seed(config.train.seed)

    if strategy.is_chief:
        model_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, model_dir / "config.yaml")

    # --- data ---
    per_worker_batch = config.train.batch_size // strategy.num_workers
    # --- model ---
    backbone, head = build_networks(config, len(class_names))
    optimizer = OPTIMIZERS.get(config.optimizer.name)(
        config.optimizer, LearningRateSchedule(config.schedule, config.train.steps)
    )
    model = EmbeddingTrainer(backbone, head, config.sparsity, strategy)
    model.compile(optimizer=optimizer)
    # Creating the optimizer slots before restoring makes the restore immediate
    # and exact, instead of deferred until the first step.
    optimizer.build(model.trainable_variables)

    checkpoint = checkpoint_for(backbone, head, optimizer)
    manager = tf.train.CheckpointManager(
        checkpoint, str(model_dir / CHECKPOINT_DIR), max_to_keep=config.train.keep_checkpoints
    )
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    strategy.broadcast_variables(model.variables + optimizer.variables)
    start = int(optimizer.iterations.numpy())
    remaining = config.train.steps - start
    if remaining <= 0:
        return TrainResult(step=start, resumed_from=start, metrics={})

    dataset = train_dataset(
        pattern, per_worker_batch, config.model.input_size,
        augment=config.data.augment, shuffle_buffer=config.data.shuffle_buffer,
        seed=config.train.seed, num_workers=strategy.num_workers,
        worker_index=strategy.worker_index, start_batch=start,
    )

    # --- train ---
    callbacks: list[keras.callbacks.Callback] = [StopOnNonFiniteLoss(optimizer)]
    if strategy.is_chief:
        if verbose == 2:
            callbacks.append(ProgressLog(optimizer, config.train.steps, config.train.log_every))
        callbacks += [
            SummaryScalars(str(model_dir / "logs" / "train"), optimizer, config.train.log_every),
            CheckpointEvery(manager, optimizer, config.train.checkpoint_every),
        ]
    history = model.fit(dataset, epochs=1, steps_per_epoch=remaining, callbacks=callbacks,
                        verbose=1 if verbose == 1 and strategy.is_chief else 0)
    metrics = {k: float(v[-1]) for k, v in history.history.items()}
    return TrainResult(step=int(optimizer.iterations.numpy()), resumed_from=start, metrics=metrics)
