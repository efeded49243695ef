"""Learning-rate schedules: linear warm-up followed by constant, piecewise or cosine decay."""

from __future__ import annotations

import math

from sparse_embed.config import ScheduleConfig
from sparse_embed.keras import keras, tf
from sparse_embed.registry import Registry

DECAYS: Registry = Registry("learning-rate schedule")


@DECAYS.register("constant")
def _constant(step: tf.Tensor, config: ScheduleConfig, total_steps: int) -> tf.Tensor:
    del step, total_steps
    return tf.constant(config.base_lr, tf.float32)


@DECAYS.register("piecewise")
def _piecewise(step: tf.Tensor, config: ScheduleConfig, total_steps: int) -> tf.Tensor:
    del total_steps
    passed = tf.reduce_sum(tf.cast(step >= tf.constant(config.boundaries or (2**62,), tf.int64),
                                   tf.float32))
    return config.base_lr * tf.pow(tf.constant(config.decay_rate, tf.float32), passed)


@DECAYS.register("cosine")
def _cosine(step: tf.Tensor, config: ScheduleConfig, total_steps: int) -> tf.Tensor:
    span = max(total_steps - config.warmup_steps, 1)
    progress = tf.clip_by_value(tf.cast(step - config.warmup_steps, tf.float32) / span, 0.0, 1.0)
    return 0.5 * config.base_lr * (1.0 + tf.cos(math.pi * progress))


@keras.utils.register_keras_serializable(package="sparse_embed")
class LearningRateSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to `base_lr` over `warmup_steps`, then the configured decay.

    The rate is a pure function of the optimizer step, so restoring the
    optimizer's `iterations` from a checkpoint restores the schedule exactly.

    Args:
        config: The `schedule` section of the run config.
        total_steps: Length of the run (the cosine decay ends there).
    """

    def __init__(self, config: ScheduleConfig, total_steps: int) -> None:
        super().__init__()
        self.config = config
        self.total_steps = total_steps
        self._decay = DECAYS.get(config.name)

    def __call__(self, step: tf.Tensor) -> tf.Tensor:
        step = tf.cast(step, tf.int64)
        rate = self._decay(step, self.config, self.total_steps)
        if self.config.warmup_steps > 0:
            warm = tf.cast(step + 1, tf.float32) / self.config.warmup_steps
            rate = tf.where(step < self.config.warmup_steps, self.config.base_lr * warm, rate)
        return rate

    def get_config(self) -> dict:
        return {"config": self.config.__dict__, "total_steps": self.total_steps}

    @classmethod
    def from_config(cls, config: dict) -> LearningRateSchedule:
        c = dict(config["config"])
        c["boundaries"] = tuple(c["boundaries"])
        return cls(ScheduleConfig(**c), config["total_steps"])
