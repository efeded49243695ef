"""Checks that run inside real distributed processes.

    horovodrun -np N python distributed_checks.py CHECK OUT ...      (Horovod ranks)
    python distributed_checks.py step_equivalence OUT mirrored       (2 replicas on 2 logical CPUs)

Each rank writes what it measured to OUT/rank<r>.npz; tests/test_distributed.py
launches the processes and compares. Kept out of pytest's collection (no
`test_` prefix): it is a program, one process per rank.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from sparse_embed.config import load_config
from sparse_embed.heads.margin import ArcFaceHead
from sparse_embed.keras import keras, tf
from sparse_embed.sparsity import flops_regularizer, l1_regularizer
from sparse_embed.strategy import SingleProcess
from sparse_embed.training.distributed import HorovodStrategy, MirroredStrategy
from sparse_embed.training.trainer import EmbeddingTrainer, train

CLASSES, DIM, PER_RANK, LR = 5, 16, 4, 0.5


def _trainer(sparsity: str, cross_replica: bool, strategy) -> EmbeddingTrainer:
    """A network without batch-dependent layers, the same initial weights on every call."""
    keras.utils.set_random_seed(0)
    with strategy.scope():
        inputs = keras.Input((6, 6, 3))
        outputs = keras.layers.Dense(DIM, name="embed")(keras.layers.Flatten()(inputs))
        backbone = keras.Model(inputs, outputs)
        head = ArcFaceHead(CLASSES, scale=8.0, margin=0.3, embedding_size=DIM)
        head.build((None, DIM))
        config = load_config(None, [f"sparsity.type={sparsity}", "sparsity.weight=2.0",
                                    "sparsity.schedule=constant",
                                    f"sparsity.cross_replica={str(cross_replica).lower()}"])
        model = EmbeddingTrainer(backbone, head, config.sparsity, strategy)
        model.compile(optimizer=keras.optimizers.SGD(LR))
        model.optimizer.build(model.trainable_variables)
    return model


def _mirrored_on_two_cpus() -> MirroredStrategy:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    return MirroredStrategy()


def step_equivalence(out: Path, backend: str = "horovod") -> None:
    """One step of N workers x batch B against one process with the N*B batch.

    Horovod ranks feed their own B examples; the mirrored strategy is fed the
    N*B batch and splits it over its replicas.
    """
    strategy = HorovodStrategy() if backend == "horovod" else _mirrored_on_two_cpus()
    rank, size = strategy.worker_index, strategy.num_workers
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (size * PER_RANK, 6, 6, 3)).astype(np.float32)
    labels = rng.integers(0, CLASSES, size * PER_RANK).astype(np.int32)
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK) if backend == "horovod" else slice(None)
    results: dict[str, np.ndarray] = {}
    for sparsity, cross in (("l1", False), ("flops", True), ("flops", False)):
        name = f"{sparsity}_{'cross' if cross else 'local'}"
        model = _trainer(sparsity, cross, strategy)
        strategy.broadcast_variables(model.variables + model.optimizer.variables)
        logs = model.train_on_batch(images[mine], labels[mine], return_dict=True)
        results[f"{name}/weights"] = np.concatenate(
            [w.numpy().ravel() for w in model.trainable_variables])
        results[f"{name}/sparsity_loss"] = np.float64(logs["sparsity_loss"])

        # The reference, in one process: the loss the N ranks optimise together.
        ref = _trainer(sparsity, cross, SingleProcess())
        x, y = tf.constant(images), tf.constant(labels)
        with tf.GradientTape() as tape:
            e = ref.backbone(x, training=True)
            normalized = tf.math.l2_normalize(e, axis=-1)
            if sparsity == "l1" or cross:
                # Linear in the examples (L1), or a statistic of the whole batch (cross-replica).
                reg = (l1_regularizer if sparsity == "l1" else flops_regularizer)(normalized)
            else:
                # Per worker: the mean of the regularizers of the ranks' own batches.
                reg = tf.add_n([flops_regularizer(normalized[r * PER_RANK:(r + 1) * PER_RANK])
                                for r in range(size)]) / size
            loss = ref.head(e, y) + 2.0 * reg
        grads = tape.gradient(loss, ref.trainable_variables)
        results[f"{name}/reference_weights"] = np.concatenate(
            [(w - LR * g).numpy().ravel() for w, g in zip(ref.trainable_variables, grads, strict=True)])
        results[f"{name}/reference_sparsity_loss"] = np.float64(reg)
    np.savez(out / f"rank{rank}.npz", **results)


def partial_fc(out: Path) -> None:
    """One step with the class centres split over the ranks against the unsharded ArcFace head."""
    from sparse_embed.heads.partial_fc import ShardedMarginHead, shard_range

    strategy = HorovodStrategy()
    rank, size = strategy.worker_index, strategy.num_workers
    classes = 4 * size
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (size * PER_RANK, 6, 6, 3)).astype(np.float32)
    labels = rng.integers(0, classes, size * PER_RANK).astype(np.int32)
    centres = rng.normal(size=(classes, DIM)).astype(np.float32)
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    sparsity = load_config(None, ["sparsity.type=none"]).sparsity

    def trainer(head, strategy) -> EmbeddingTrainer:
        keras.utils.set_random_seed(0)
        inputs = keras.Input((6, 6, 3))
        backbone = keras.Model(inputs, keras.layers.Dense(DIM)(keras.layers.Flatten()(inputs)))
        head.build((None, DIM))
        model = EmbeddingTrainer(backbone, head, sparsity, strategy)
        model.compile(optimizer=keras.optimizers.SGD(LR))
        model.optimizer.build(model.trainable_variables)
        return model

    start, end = shard_range(classes, size, rank)
    sharded = ShardedMarginHead(ArcFaceHead(classes, scale=8.0, margin=0.3), strategy)
    model = trainer(sharded, strategy)
    sharded.kernel.assign(centres[start:end])
    logs = model.train_on_batch(images[mine], labels[mine], return_dict=True)

    full = ArcFaceHead(classes, scale=8.0, margin=0.3)
    ref = trainer(full, SingleProcess())
    full.kernel.assign(centres.T)
    ref_logs = ref.train_on_batch(images, labels, return_dict=True)
    np.savez(out / f"rank{rank}.npz",
             loss=logs["head_loss"], reference_loss=ref_logs["head_loss"],
             accuracy=logs["accuracy"], reference_accuracy=ref_logs["accuracy"],
             kernel=sharded.kernel.numpy(), reference_kernel=full.kernel.numpy().T[start:end],
             initial_kernel=centres[start:end],
             backbone=np.concatenate([w.numpy().ravel() for w in model.backbone.weights]),
             reference_backbone=np.concatenate([w.numpy().ravel() for w in ref.backbone.weights]))


def train_run(out: Path, data_dir: str, model_dir: str, *overrides: str) -> None:
    """`train()` under Horovod; every rank saves the weights it ended with."""
    result = train(load_config("smoke", list(overrides)), data_dir, model_dir, verbose=0)
    rank = result.model.strategy.worker_index
    np.savez(out / f"rank{rank}.npz", step=result.step, samples=result.samples,
             **{f"w{i}": w.numpy() for i, w in enumerate(result.model.variables)})


def train_eval(out: Path, data_dir: str, model_dir: str, *overrides: str) -> None:
    """`train()` with evaluation during training; every rank saves the steps it evaluated at."""
    import os

    from sparse_embed.training.callbacks import VerificationEval

    evaluated = []
    evaluate = VerificationEval.evaluate

    def counted(self: VerificationEval) -> dict:
        evaluated.append(self.step)
        return evaluate(self)

    VerificationEval.evaluate = counted
    result = train(load_config("smoke", list(overrides)), data_dir, model_dir, verbose=0)
    rank = result.model.strategy.worker_index
    np.savez(out / f"rank{rank}.npz", step=result.step, pid=os.getpid(),
             evaluated=np.array(evaluated, np.int64))


CHECKS = {"step_equivalence": step_equivalence, "partial_fc": partial_fc, "train": train_run,
          "train_eval": train_eval}

if __name__ == "__main__":
    check, out_dir, *rest = sys.argv[1:]
    CHECKS[check](Path(out_dir), *rest)
