"""How training is distributed: the one place a multi-process backend is imported.

The trainer only talks to a `Strategy`: which worker it is, how to average
gradients and how to make every worker start from the same weights. The
single-process implementation is the identity; a Horovod implementation slots
in here without touching the trainer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import tensorflow as tf

from sparse_embed.registry import Registry


class Strategy(Protocol):
    """What the trainer needs from a distribution backend."""

    num_workers: int
    worker_index: int

    @property
    def is_chief(self) -> bool:
        """Whether this worker writes checkpoints, summaries and files."""

    def reduce_gradients(self, grads: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """Averages gradients over workers."""

    def broadcast_variables(self, variables: Sequence[tf.Variable]) -> None:
        """Copies the chief's values of `variables` to every worker."""


STRATEGIES: Registry[type] = Registry("distribution strategy")


@STRATEGIES.register("single")
class SingleProcess:
    """One process, all local devices seen by TensorFlow's default placement."""

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


def get_strategy() -> Strategy:
    """Returns the strategy of this process (single-process for now)."""
    return SingleProcess()
