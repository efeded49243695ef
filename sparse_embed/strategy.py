"""What a distribution backend offers the code that trains: the `Strategy` protocol, and one process.

The trainer and the losses that need collectives (a sharded classifier's
all-gather, a pair loss's gathered batch, the cross-replica FLOPs regularizer)
talk only to a `Strategy`: which worker this is, how to average gradients, how
to make every worker start from the same weights, and a few collectives.
`SingleProcess` is the strategy of one process, the default wherever none is
given. The multi-worker backends (Horovod, TensorFlow's own) are in
`sparse_embed.training.distributed`, the one module that imports Horovod.
This module imports neither Horovod nor the training package, so that heads
can take a strategy without depending on either.

Gradient convention: every worker computes the gradient of its own loss (a
mean over its local batch) and `reduce_gradients` averages them, so N workers
with batch B take the step one process would take with batch N*B. The
backward pass of every collective is its adjoint (mean -> mean of the upstream
gradients, sum and all-gather -> sum), so a loss built from collectives gets
the gradient of the sum of all workers' losses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from sparse_embed.keras import tf

DatasetFn = Callable[[int, int], tf.data.Dataset]


class Strategy(Protocol):
    """What the trainer, and the losses that use collectives, need from a distribution backend."""

    name: str
    num_workers: int
    worker_index: int
    # Whether every worker must take part in saving a checkpoint (the chief's is kept).
    saves_on_every_worker: bool

    def scope(self) -> contextlib.AbstractContextManager:
        """The context in which the model and optimizer variables are created."""

    def distribute_dataset(self, make: DatasetFn) -> Any:
        """The training input: `make(num_pipelines, pipeline_index)` per input pipeline."""

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


class SingleProcess:
    """One process, all local devices seen by TensorFlow's default placement."""

    name = "none"
    num_workers = 1
    worker_index = 0
    saves_on_every_worker = False

    @property
    def is_chief(self) -> bool:
        """The only worker is the chief."""
        return True

    def scope(self) -> contextlib.AbstractContextManager:
        """No special placement."""
        return contextlib.nullcontext()

    def distribute_dataset(self, make: DatasetFn) -> tf.data.Dataset:
        """The one input pipeline.

        Args:
            make: Builds the dataset of pipeline `i` of `n`.
        """
        return make(self.num_workers, self.worker_index)

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
