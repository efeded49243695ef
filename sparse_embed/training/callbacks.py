"""Keras callbacks of the trainer: checkpoints, TensorBoard scalars, non-finite loss guard."""

from __future__ import annotations

import math
import time

from sparse_embed.errors import TrainingError
from sparse_embed.keras import keras, tf


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
