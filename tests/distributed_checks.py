"""Checks that run inside real distributed processes.

    horovodrun -np N python distributed_checks.py CHECK OUT ...      (Horovod ranks)
    horovodrun -np N python distributed_checks.py CHECK,CHECK,... OUT (several, one launch)
    python distributed_checks.py step_equivalence,pe_step_equivalence OUT mirrored
                                                       (2 replicas on 2 logical CPUs)

Each rank writes what it measured to OUT/rank<r>.npz, or with several checks to
OUT/<check>/rank<r>.npz; tests/test_distributed.py launches the processes and
compares. Several checks share one launch because starting the processes (TensorFlow,
Horovod) costs more than any of these steps. Kept out of pytest's collection (no
`test_` prefix): it is a program, one process per rank.
"""

from __future__ import annotations

import functools
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


@functools.cache
def _mirrored_on_two_cpus() -> MirroredStrategy:
    # Cached: the logical devices can be set only once, before TensorFlow starts its runtime.
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


# The probabilistic methods whose loss couples the examples of a batch (gathered over the workers),
# and those whose loss is a mean over examples (each worker's own batch).
PE_GATHERED = ("hib", "pfe", "spe")
PE_PER_EXAMPLE = ("dul_reg", "dul_cls", "scf", "vmf_fl", "vmf_loss", "dsml")
PE_DIM, PE_LR = 4, 0.1
# Rank 0's batch, then rank 1's: class 1 is on both (SPE then counts classes 2, 4 and 2 times).
PE_LABELS = np.array([0, 0, 1, 1, 1, 2, 1, 2], np.int32)


def _pe_trainer(method: str, gather: bool, strategy) -> EmbeddingTrainer:
    """A one-layer network into the method's parameter vectors and its head; the same weights every call."""
    from sparse_embed.config import HeadConfig
    from sparse_embed.distributions.base import build_distribution
    from sparse_embed.heads import HEADS, build_head

    # The same layer and variable names on every rank whatever it built before (rank 0 builds the
    # references too): Horovod matches its collectives by name.
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    options = dict(HEADS.get(method).distribution)
    distribution = build_distribution(options.pop("name"), PE_DIM, **options)
    width = distribution.num_parameters
    with strategy.scope():
        inputs = keras.Input((6, 6, 3))
        backbone = keras.Model(inputs, keras.layers.Dense(width)(keras.layers.Flatten()(inputs)))
        config = HeadConfig(name=method, gather_batch=gather)
        head = build_head(CLASSES, width, config, distribution=distribution)
        head.strategy = strategy
        head.build((None, width))
        model = EmbeddingTrainer(backbone, head, load_config(None, ["sparsity.type=none"]).sparsity, strategy,
                                 distribution=distribution)
        # One step: tracing it would cost more than running it.
        model.compile(optimizer=keras.optimizers.SGD(PE_LR), run_eagerly=True)
        model.optimizer.build(model.trainable_variables)
    return model


def pe_step_equivalence(out: Path, backend: str = "horovod") -> None:
    """One step of every probabilistic method on N workers x batch B against one process.

    The draws of the sampled losses come from the fixed evaluation seed (in
    training too), so ranks and reference see the same samples of a batch. The
    methods of `PE_GATHERED` gather the batch: their reference is the loss of
    the N*B batch. The others are means over examples: their reference is the
    mean of the workers' losses of their own batches (the loss of the N*B batch
    where nothing is sampled). `local_reference_loss` is the mean of the
    workers' losses for the gathered methods too: what they would optimise
    without gathering. Rank 0 alone computes the references.
    """
    from sparse_embed.heads import probabilistic

    strategy = HorovodStrategy() if backend == "horovod" else _mirrored_on_two_cpus()
    fixed = tf.constant(probabilistic.EVALUATION_SEED, tf.int64)
    probabilistic._seed = lambda training: fixed
    rank, size = strategy.worker_index, strategy.num_workers
    rng = np.random.default_rng(3)
    images = rng.uniform(-1, 1, (size * PER_RANK, 6, 6, 3)).astype(np.float32)
    labels = np.resize(PE_LABELS, size * PER_RANK)
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK) if backend == "horovod" else slice(None)
    halves = [slice(r * PER_RANK, (r + 1) * PER_RANK) for r in range(size)]
    results: dict[str, np.ndarray] = {}
    for method in PE_GATHERED + PE_PER_EXAMPLE:
        gather = method in PE_GATHERED
        model = _pe_trainer(method, gather, strategy)
        strategy.broadcast_variables(model.variables + model.optimizer.variables)
        logs = model.train_on_batch(images[mine], labels[mine], return_dict=True)
        results[f"{method}/weights"] = np.concatenate([w.numpy().ravel() for w in model.trainable_variables])
        results[f"{method}/loss"] = np.float64(logs["head_loss"])
        if rank > 0:
            # The ranks' weights are compared with each other; one reference is enough.
            continue
        ref = _pe_trainer(method, False, SingleProcess())
        x, y = tf.constant(images), tf.constant(labels)
        with tf.GradientTape() as tape:
            parameters = ref.backbone(x, training=True)
            local = tf.add_n([ref.head(parameters[h], y[h], training=True) for h in halves]) / size
            loss = ref.head(parameters, y, training=True) if gather else local
        grads = tape.gradient(loss, ref.trainable_variables)
        results[f"{method}/reference_weights"] = np.concatenate(
            [(w - PE_LR * g).numpy().ravel() for w, g in zip(ref.trainable_variables, grads, strict=True)])
        results[f"{method}/reference_loss"] = np.float64(loss)
        results[f"{method}/local_reference_loss"] = np.float64(local)
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
    """`train()` with evaluation during training; every rank saves the steps it evaluated at and,
    as `train_run` does, the weights it ended with."""
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
    np.savez(out / f"rank{rank}.npz", step=result.step, samples=result.samples, pid=os.getpid(),
             evaluated=np.array(evaluated, np.int64),
             **{f"w{i}": w.numpy() for i, w in enumerate(result.model.variables)})


CHECKS = {"step_equivalence": step_equivalence, "pe_step_equivalence": pe_step_equivalence,
          "partial_fc": partial_fc, "train": train_run, "train_eval": train_eval}

if __name__ == "__main__":
    names, out_dir, *rest = sys.argv[1:]
    checks = names.split(",")
    for name in checks:
        out = Path(out_dir) / name if len(checks) > 1 else Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        # The same layer names on every rank whatever an earlier check built: Horovod matches
        # its collectives by name.
        keras.backend.clear_session()
        CHECKS[name](out, *rest)
