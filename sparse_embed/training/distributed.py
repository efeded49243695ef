"""How training is distributed: the one place Horovod is imported.

The trainer only talks to a `Strategy`: which worker it is, how to average
gradients, how to make every worker start from the same weights, and the few
collectives the losses need (a differentiable mean for the cross-replica FLOPs
regularizer, an all-gather for the sharded classifier). `get_strategy` picks
the backend named by the `distributed` config section.

Gradient convention: every worker computes the gradient of its own loss (a
mean over its local batch) and `reduce_gradients` averages them, so N workers
with batch B take the step one process would take with batch N*B.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Protocol

from sparse_embed.config import DistributedConfig
from sparse_embed.errors import ConfigError
from sparse_embed.keras import tf
from sparse_embed.registry import Registry
from sparse_embed.training.launch import has_tf_config, launched_by_horovod


class Strategy(Protocol):
    """What the trainer needs from a distribution backend."""

    name: str
    num_workers: int
    worker_index: int

    @property
    def is_chief(self) -> bool:
        """Whether this worker writes checkpoints, summaries and files."""

    def reduce_gradients(self, grads: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """Averages gradients over workers."""

    def broadcast_variables(self, variables: Sequence[tf.Variable]) -> None:
        """Copies the chief's values of `variables` to every worker."""

    def average_variables(self, variables: Sequence[tf.Variable]) -> None:
        """Sets each variable to its average over workers (BatchNorm moving statistics)."""

    def mean(self, tensor: tf.Tensor) -> tf.Tensor:
        """Averages a tensor over workers; differentiable."""

    def all_gather(self, tensor: tf.Tensor) -> tf.Tensor:
        """Concatenates every worker's tensor along axis 0, in rank order; differentiable."""

    def sum(self, tensor: tf.Tensor) -> tf.Tensor:
        """Sums a tensor over workers; differentiable."""

    def max(self, tensor: tf.Tensor) -> tf.Tensor:
        """Elementwise maximum over workers; not differentiable."""

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on some worker (a host-side agreement step)."""

    def min_int(self, value: int) -> int:
        """The smallest of the workers' values (a host-side agreement step)."""


STRATEGIES: Registry[type] = Registry("distribution backend")


@STRATEGIES.register("none")
class SingleProcess:
    """One process, all local devices seen by TensorFlow's default placement."""

    name = "none"
    num_workers = 1
    worker_index = 0

    @property
    def is_chief(self) -> bool:
        """The only worker is the chief."""
        return True

    def reduce_gradients(self, grads: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """Returns the gradients unchanged: there is nothing to average with.

        Args:
            grads: Per-variable gradients.
        """
        return list(grads)

    def broadcast_variables(self, variables: Sequence[tf.Variable]) -> None:
        """Does nothing: one process already agrees with itself.

        Args:
            variables: The variables a multi-worker backend would synchronise.
        """

    def average_variables(self, variables: Sequence[tf.Variable]) -> None:
        """Does nothing: the average over one worker is the value.

        Args:
            variables: Variables a multi-worker backend would average.
        """

    def mean(self, tensor: tf.Tensor) -> tf.Tensor:
        """Returns `tensor`: the mean over one worker.

        Args:
            tensor: Any tensor.
        """
        return tensor

    def all_gather(self, tensor: tf.Tensor) -> tf.Tensor:
        """Returns `tensor`: the concatenation over one worker.

        Args:
            tensor: Any tensor.
        """
        return tensor

    def sum(self, tensor: tf.Tensor) -> tf.Tensor:
        """Returns `tensor`: the sum over one worker.

        Args:
            tensor: Any tensor.
        """
        return tensor

    def max(self, tensor: tf.Tensor) -> tf.Tensor:
        """Returns `tensor`: the maximum over one worker.

        Args:
            tensor: Any tensor.
        """
        return tensor

    def any(self, flag: bool) -> bool:
        """Returns `flag`.

        Args:
            flag: This worker's value.
        """
        return bool(flag)

    def min_int(self, value: int) -> int:
        """Returns `value`.

        Args:
            value: This worker's value.
        """
        return int(value)


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

        @tf.custom_gradient
        def _mean(x: tf.Tensor) -> tuple[tf.Tensor, Any]:
            def grad(upstream: tf.Tensor) -> tf.Tensor:
                return hvd.allreduce(upstream, op=hvd.Average)

            return hvd.allreduce(x, op=hvd.Average), grad

        return _mean(tensor)

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
                summed = hvd.allreduce(upstream, op=hvd.Sum)
                return tf.split(summed, size, axis=0)[rank]

            return hvd.allgather(x), grad

        return _gather(tensor)

    def sum(self, tensor: tf.Tensor) -> tf.Tensor:
        """Sums over ranks; the backward pass sums the upstream gradients (its adjoint).

        Args:
            tensor: float tensor of the same shape on every rank.
        """
        hvd = self._hvd

        @tf.custom_gradient
        def _sum(x: tf.Tensor) -> tuple[tf.Tensor, Any]:
            def grad(upstream: tf.Tensor) -> tf.Tensor:
                return hvd.allreduce(upstream, op=hvd.Sum)

            return hvd.allreduce(x, op=hvd.Sum), grad

        return _sum(tensor)

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
