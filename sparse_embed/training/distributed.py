"""How training is distributed: the one place Horovod is imported.

Launching, batch size and learning rate, resuming, Partial FC: docs/distributed.md.

The trainer only talks to a `Strategy` (`sparse_embed.strategy`: the
protocol, its gradient convention and the single process). `get_strategy`
picks the backend named by the `distributed` config section:

- `none`: one process (`sparse_embed.strategy.SingleProcess`);
- `horovod`: one process per device under `horovodrun` (Gloo or MPI);
- `mirrored`, `multi_worker`: TensorFlow's own `MirroredStrategy` (all local
  GPUs, or the logical CPUs, in one process) and `MultiWorkerMirroredStrategy`
  (processes described by TF_CONFIG), for where Horovod is not installed.
  Their "workers" in the sense of this module are the replicas.

Every backend here follows the protocol's gradient convention: the backward
pass of each collective is its adjoint (mean -> mean of the upstream
gradients, sum and all-gather -> sum).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from sparse_embed.config import DistributedConfig
from sparse_embed.errors import ConfigError
from sparse_embed.keras import tf
from sparse_embed.launch import has_tf_config, launched_by_horovod
from sparse_embed.registry import Registry
from sparse_embed.strategy import DatasetFn, SingleProcess, Strategy

STRATEGIES: Registry[type] = Registry("distribution backend")
# One process lives beside the protocol, where heads take it without importing Horovod;
# it is registered here with the backends `get_strategy` chooses from.
STRATEGIES.register("none")(SingleProcess)


def _self_adjoint(reduce: Callable[[tf.Tensor], tf.Tensor], tensor: tf.Tensor) -> tf.Tensor:
    """`reduce(tensor)` whose backward pass applies the same reduction to the upstream gradient.

    A sum or a mean over workers is its own adjoint: with y = sum_k x_k on
    every worker, d(sum_k L_k)/dx_r = sum_k dL_k/dy.
    """

    @tf.custom_gradient
    def _reduced(x: tf.Tensor) -> tuple[tf.Tensor, Callable[[tf.Tensor], tf.Tensor]]:
        return reduce(x), reduce

    return _reduced(tensor)


def _import_horovod() -> Any:
    try:
        import horovod.tensorflow as hvd
    except ImportError as e:
        raise ConfigError(
            f"distributed.backend=horovod needs Horovod, which is not importable here ({e}); "
            f"install it with `make horovod`, or set distributed.backend=none"
        ) from e
    return hvd


@STRATEGIES.register("horovod")
class HorovodStrategy:
    """Horovod data parallelism: one process per device, launched by `horovodrun`.

    `hvd.init()` runs on construction; with GPUs, each process sees only the
    GPU of its local rank. Gradients are averaged with one grouped (fused)
    all-reduce per step, as `hvd.DistributedGradientTape` does.
    """

    name = "horovod"
    saves_on_every_worker = False

    def __init__(self) -> None:
        hvd = self._hvd = _import_horovod()
        hvd.init()
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            gpu = gpus[hvd.local_rank() % len(gpus)]
            tf.config.experimental.set_memory_growth(gpu, True)
            tf.config.set_visible_devices(gpu, "GPU")
        self.num_workers = hvd.size()
        self.worker_index = hvd.rank()
        # Eager collectives are matched across ranks by name; every rank makes
        # the same calls in the same order, so a counter names them alike.
        self._names = itertools.count()

    @property
    def is_chief(self) -> bool:
        """Rank 0 is the chief."""
        return self.worker_index == 0

    def scope(self) -> contextlib.AbstractContextManager:
        """No special placement: each process has its own device."""
        return contextlib.nullcontext()

    def distribute_dataset(self, make: DatasetFn) -> tf.data.Dataset:
        """This rank's own input pipeline, one of `size`.

        Args:
            make: Builds the dataset of pipeline `i` of `n`.
        """
        return make(self.num_workers, self.worker_index)

    def reduce_gradients(self, grads: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """Averages gradients over all ranks with one fused all-reduce.

        Args:
            grads: Per-variable gradients (IndexedSlices are densified).
        """
        dense = [tf.convert_to_tensor(g) for g in grads]
        return list(self._hvd.grouped_allreduce(dense, op=self._hvd.Average))

    def broadcast_variables(self, variables: Sequence[tf.Variable]) -> None:
        """Copies rank 0's values of `variables` to every rank.

        Args:
            variables: Model and optimizer variables, slots included.
        """
        self._hvd.broadcast_variables(list(variables), root_rank=0)

    def average_variables(self, variables: Sequence[tf.Variable]) -> None:
        """Sets each variable to its average over ranks, with one fused all-reduce.

        Args:
            variables: float variables of the same shapes on every rank.
        """
        variables = list(variables)
        if variables:
            averaged = self._hvd.grouped_allreduce([v.read_value() for v in variables],
                                                   op=self._hvd.Average)
            for variable, value in zip(variables, averaged, strict=True):
                variable.assign(value)

    def mean(self, tensor: tf.Tensor) -> tf.Tensor:
        """Averages over ranks; the gradient is the rank-average of the upstream gradients.

        With gradients averaged afterwards, that backward pass makes the step
        equal to the step of one process on the concatenated batch: every rank
        holds the same shared value, so d(mean)/d(local) = 1/N, times the N
        identical loss copies the gradient average sums over.

        Args:
            tensor: float tensor of the same shape on every rank.
        """
        hvd = self._hvd
        return _self_adjoint(lambda x: hvd.allreduce(x, op=hvd.Average), tensor)

    def all_gather(self, tensor: tf.Tensor) -> tf.Tensor:
        """Concatenates every rank's tensor along axis 0 (rank order).

        The gradient of rank r's slice is the sum over ranks of the upstream
        gradient of that slice: each rank's loss depends on every rank's rows.

        Args:
            tensor: tensor [B, ...], the same B on every rank (integers are not differentiated).
        """
        hvd = self._hvd
        rank, size = self.worker_index, self.num_workers
        if not tensor.dtype.is_floating:
            return hvd.allgather(tensor)

        @tf.custom_gradient
        def _gather(x: tf.Tensor) -> tuple[tf.Tensor, Any]:
            def grad(upstream: tf.Tensor) -> tf.Tensor:
                # Dense: rows gathered from the result (tf.gather) arrive as IndexedSlices.
                summed = hvd.allreduce(tf.convert_to_tensor(upstream), op=hvd.Sum)
                return tf.split(summed, size, axis=0)[rank]

            return hvd.allgather(x), grad

        return _gather(tensor)

    def sum(self, tensor: tf.Tensor) -> tf.Tensor:
        """Sums over ranks; the backward pass sums the upstream gradients (its adjoint).

        Args:
            tensor: float tensor of the same shape on every rank.
        """
        hvd = self._hvd
        return _self_adjoint(lambda x: hvd.allreduce(x, op=hvd.Sum), tensor)

    def max(self, tensor: tf.Tensor) -> tf.Tensor:
        """Elementwise maximum over ranks, without a gradient.

        Args:
            tensor: tensor of the same shape on every rank.
        """
        return self._hvd.allreduce(tf.stop_gradient(tensor), op=self._hvd.Max)

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on at least one rank.

        Args:
            flag: This rank's value.
        """
        total = self._hvd.allreduce(tf.constant(float(flag)), op=self._hvd.Sum,
                                    name=f"sparse_embed_any_{next(self._names)}")
        return float(total) > 0

    def min_int(self, value: int) -> int:
        """The smallest of the ranks' values.

        Args:
            value: This rank's value.
        """
        least = self._hvd.allreduce(tf.constant(-int(value), tf.int64), op=self._hvd.Max,
                                    name=f"sparse_embed_min_{next(self._names)}")
        return -int(least)


class _TFDistribute:
    """A `tf.distribute` strategy behind the `Strategy` interface; replicas are the workers.

    Variables are mirrored by TensorFlow (identical at creation, BatchNorm
    statistics averaged on read), so broadcasting and averaging variables are
    no-ops; gradients and the loss collectives use the replica context of the
    training step.

    Args:
        strategy: The TensorFlow strategy.
        task_index: This process's index among the processes (0 with one process).
    """

    def __init__(self, strategy: tf.distribute.Strategy, task_index: int) -> None:
        self._strategy = strategy
        self.num_workers = strategy.num_replicas_in_sync
        self.worker_index = task_index

    @property
    def is_chief(self) -> bool:
        """Task 0 writes the files."""
        return self.worker_index == 0

    def scope(self) -> contextlib.AbstractContextManager:
        """The strategy's scope: variables created in it are mirrored."""
        return self._strategy.scope()

    def distribute_dataset(self, make: DatasetFn) -> Any:
        """One pipeline per process, each batch split over that process's replicas.

        Args:
            make: Builds the dataset of pipeline `i` of `n`, batched per replica.
        """
        def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
            return make(context.num_input_pipelines, context.input_pipeline_id)

        return self._strategy.distribute_datasets_from_function(dataset_fn)

    @staticmethod
    def _context() -> tf.distribute.ReplicaContext:
        return tf.distribute.get_replica_context()

    def reduce_gradients(self, grads: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """Averages gradients over replicas (one batched all-reduce).

        Args:
            grads: Per-variable gradients of this replica (IndexedSlices are densified).
        """
        dense = [tf.convert_to_tensor(g) for g in grads]
        return list(self._context().all_reduce(tf.distribute.ReduceOp.MEAN, dense))

    def broadcast_variables(self, variables: Sequence[tf.Variable]) -> None:
        """Nothing to do: mirrored variables start equal.

        Args:
            variables: Model and optimizer variables.
        """

    def average_variables(self, variables: Sequence[tf.Variable]) -> None:
        """Nothing to do: BatchNorm statistics are sync-on-read means.

        Args:
            variables: BatchNorm moving statistics.
        """

    def mean(self, tensor: tf.Tensor) -> tf.Tensor:
        """Averages over replicas; backward: the mean of the upstream gradients.

        Args:
            tensor: float tensor of the same shape on every replica.
        """
        context = self._context()
        return _self_adjoint(lambda x: context.all_reduce(tf.distribute.ReduceOp.MEAN, x), tensor)

    def sum(self, tensor: tf.Tensor) -> tf.Tensor:
        """Sums over replicas; backward: the sum of the upstream gradients.

        Args:
            tensor: float tensor of the same shape on every replica.
        """
        context = self._context()
        return _self_adjoint(lambda x: context.all_reduce(tf.distribute.ReduceOp.SUM, x), tensor)

    def all_gather(self, tensor: tf.Tensor) -> tf.Tensor:
        """Concatenates every replica's tensor along axis 0 (replica order).

        Args:
            tensor: tensor [B, ...], the same B on every replica.
        """
        context = self._context()
        if not tensor.dtype.is_floating:
            return context.all_gather(tensor, axis=0)

        @tf.custom_gradient
        def _gather(x: tf.Tensor) -> tuple[tf.Tensor, Any]:
            def grad(upstream: tf.Tensor) -> tf.Tensor:
                # Dense: rows gathered from the result (tf.gather) arrive as IndexedSlices.
                summed = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.convert_to_tensor(upstream))
                rows = tf.shape(x)[0]
                return summed[context.replica_id_in_sync_group * rows:][:rows]

            return context.all_gather(x, axis=0), grad

        return _gather(tensor)

    def max(self, tensor: tf.Tensor) -> tf.Tensor:
        """Elementwise maximum over replicas (ReduceOp has no MAX: gather, then reduce).

        Args:
            tensor: tensor of the same shape on every replica.
        """
        gathered = self._context().all_gather(tf.stop_gradient(tensor)[tf.newaxis], axis=0)
        return tf.reduce_max(gathered, axis=0)

    def _host_gather(self, value: float) -> list[float]:
        return [float(v) for v in self._gather_values(tf.constant(value, tf.float64)).numpy()]

    @tf.function
    def _gather_values(self, value: tf.Tensor) -> tf.Tensor:
        # Traced: the strategy warns (and is slow) when run eagerly.
        per_replica = self._strategy.run(lambda v: v[tf.newaxis], args=(value,))
        return self._strategy.gather(per_replica, axis=0)

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on at least one process.

        Args:
            flag: This process's value.
        """
        return max(self._host_gather(float(flag))) > 0

    def min_int(self, value: int) -> int:
        """The smallest of the processes' values.

        Args:
            value: This process's value.
        """
        return int(min(self._host_gather(float(value))))


@STRATEGIES.register("mirrored")
class MirroredStrategy(_TFDistribute):
    """`tf.distribute.MirroredStrategy` over every local GPU, or every logical CPU without GPUs."""

    name = "mirrored"
    saves_on_every_worker = False

    def __init__(self) -> None:
        devices = ([d.name for d in tf.config.list_logical_devices("GPU")]
                   or [d.name for d in tf.config.list_logical_devices("CPU")])
        super().__init__(_mirrored_over(tuple(devices)), task_index=0)


@functools.cache
def _mirrored_over(devices: tuple[str, ...]) -> tf.distribute.MirroredStrategy:
    """One `tf.distribute.MirroredStrategy` per set of devices for the whole process.

    A second strategy over the same devices numbers its collectives from the
    same start as the first, and TensorFlow's runtime matches them up: the
    second training of a process (the next seed, fold or trial of an
    experiment) stopped at its first step with "Shape mismatch in the
    collective instance". Variables belong to models, not to the strategy, so
    the trainings share it safely.

    Args:
        devices: The replicas' device names.
    """
    return tf.distribute.MirroredStrategy(list(devices))


@STRATEGIES.register("multi_worker")
class MultiWorkerStrategy(_TFDistribute):
    """`tf.distribute.MultiWorkerMirroredStrategy` over the processes TF_CONFIG lists.

    Reading a sync-on-read variable (BatchNorm statistics) is a collective, so
    every process saves each checkpoint; the chief's copy is kept (see
    `scratch_checkpoint_dir`).
    """

    name = "multi_worker"
    saves_on_every_worker = True

    def __init__(self) -> None:
        if not has_tf_config():
            raise ConfigError(
                "distributed.backend=multi_worker needs TF_CONFIG with a cluster of at least "
                "two tasks; see the README's Distributed training section"
            )
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        resolver = strategy.cluster_resolver
        super().__init__(strategy, task_index=int(resolver.task_id or 0))


@contextlib.contextmanager
def scratch_checkpoint_dir() -> Iterator[str]:
    """A temporary directory for a non-chief worker's copy of the checkpoints, removed after."""
    path = tempfile.mkdtemp(prefix="sparse_embed_worker_ckpt_")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def resolve_backend(config: DistributedConfig) -> str:
    """The backend `config.backend` means in this process (`auto` resolved).

    Args:
        config: The `distributed` section of the run config.
    """
    if config.backend != "auto":
        return config.backend
    if launched_by_horovod():
        return "horovod"
    if has_tf_config():
        return "multi_worker"
    return "none"


def get_strategy(config: DistributedConfig | None = None) -> Strategy:
    """Returns the strategy of this process.

    Args:
        config: The `distributed` section; None means the defaults (`auto`).

    Raises:
        ConfigError: If the backend is not available here (e.g. Horovod not installed).
    """
    backend = resolve_backend(config or DistributedConfig())
    return STRATEGIES.get(backend)()
