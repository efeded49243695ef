"""Magnitude pruning of a backbone with TF-MOT (`prune_low_magnitude`).

Only Conv2D and Dense layers are wrapped, one by one: TF-MOT refuses to wrap
a whole model that contains PReLU, and DepthwiseConv2D is not prunable in
TF-MOT (nor preserved by its PQAT), so the depthwise convolutions of
MobileFaceNet and MobileNetV2 stay dense. Each wrapper keeps a mask, a
threshold and a `pruning_step` counter as layer weights, so checkpoints hold
them and a resumed run prunes exactly as an uninterrupted one. The counter
starts at 0 with this run (a run initialised from another starts again at 0,
as its optimizer does) and goes up by one with each training step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.sparsity.keras import pruning_wrapper

from sparse_embed.config import CompressionConfig
from sparse_embed.errors import ConfigError
from sparse_embed.keras import keras, tf
from sparse_embed.registry import Registry

_sparsity = tfmot.sparsity.keras

# The layer types that are pruned (exact types: DepthwiseConv2D is not one).
PRUNED_TYPES = (keras.layers.Conv2D, keras.layers.Dense)

SCHEDULES: Registry = Registry("compression.schedule")


@SCHEDULES.register("polynomial")
def _polynomial(config: CompressionConfig, end_step: int) -> _sparsity.PruningSchedule:
    return _sparsity.PolynomialDecay(initial_sparsity=0.0, final_sparsity=config.target_sparsity,
                                     begin_step=config.begin_step, end_step=end_step,
                                     frequency=config.frequency)


@SCHEDULES.register("constant")
def _constant(config: CompressionConfig, end_step: int) -> _sparsity.PruningSchedule:
    return _sparsity.ConstantSparsity(config.target_sparsity, begin_step=config.begin_step,
                                      end_step=end_step, frequency=config.frequency)


def _prunable(layer: keras.layers.Layer) -> bool:
    return type(layer) in PRUNED_TYPES


def end_step(config: CompressionConfig, total_steps: int) -> int:
    """The step where pruning reaches its target (`compression.end_step`, 0 meaning the run's last).

    Args:
        config: The compression section.
        total_steps: The run's `train.steps`.

    Raises:
        ConfigError: If the schedule ends before it begins.
    """
    end = config.end_step or total_steps
    if end <= config.begin_step:
        raise ConfigError(
            f"compression.end_step={end} must come after compression.begin_step="
            f"{config.begin_step}; raise end_step (0 means train.steps={total_steps})"
        )
    return end


def prune(backbone: keras.Model, config: CompressionConfig, total_steps: int) -> keras.Model:
    """Wraps every Conv2D and Dense layer of a backbone in `prune_low_magnitude`.

    Args:
        backbone: A float backbone (its weights are carried over).
        config: The compression section (`target_sparsity`, `schedule`,
            `m_by_n`, `begin_step`, `end_step`, `frequency`).
        total_steps: The run's `train.steps` (what `end_step: 0` means).

    Returns:
        A new model sharing nothing with `backbone` but the weight values.

    Raises:
        ConfigError: If `m_by_n` is not a pair m < n, or the schedule ends before it begins.
    """
    m_by_n = tuple(config.m_by_n) or None
    if m_by_n is not None and (len(m_by_n) != 2 or m_by_n[0] >= m_by_n[1]):
        raise ConfigError(f"compression.m_by_n must be two integers m < n such as [2, 4]; "
                          f"got {list(config.m_by_n)}")
    schedule = SCHEDULES.get(config.schedule)(config, end_step(config, total_steps))

    def wrap(layer: keras.layers.Layer) -> keras.layers.Layer:
        clone = layer.__class__.from_config(layer.get_config())
        if not _prunable(layer):
            return clone
        return _sparsity.prune_low_magnitude(clone, pruning_schedule=schedule,
                                             sparsity_m_by_n=m_by_n)

    pruned = keras.models.clone_model(backbone, clone_function=wrap)
    for layer in backbone.layers:
        target = pruned.get_layer(_wrapped_name(layer))
        (target.layer if isinstance(target, pruning_wrapper.PruneLowMagnitude) else target).set_weights(
            layer.get_weights())
    return pruned


def _wrapped_name(layer: keras.layers.Layer) -> str:
    return f"prune_low_magnitude_{layer.name}" if _prunable(layer) else layer.name


class PruningStep(_sparsity.UpdatePruningStep):
    """TF-MOT's `UpdatePruningStep` without its end-of-epoch re-masking of the kernels.

    The wrappers count their own steps (checkpointed); this callback starts
    the counters of a new run at 0. TF-MOT's callback also multiplies the
    kernels by their masks at the end of each epoch, which would make the
    state a run ends with differ from the state it checkpoints mid-run: the
    next mask update ranks weights by magnitude, pruned positions included,
    so a resumed run would prune differently from an uninterrupted one.
    Masks are applied where a kernel leaves training instead (`strip`).
    """

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        del epoch, logs


def wrappers(model: keras.Model) -> list[pruning_wrapper.PruneLowMagnitude]:
    """The pruning wrappers of `model` (nested models included).

    Args:
        model: A Keras model.
    """
    return pruning_wrapper.collect_prunable_layers(model)


def has_pruning_wrappers(model: keras.Model) -> bool:
    """Whether any layer of `model` is a `prune_low_magnitude` wrapper.

    Args:
        model: A Keras model.
    """
    return bool(wrappers(model))


def pruning_variables(model: keras.Model) -> list[tf.Variable]:
    """Masks, thresholds and step counters of the wrappers: state every worker computes alike.

    Args:
        model: A Keras model.
    """
    variables = []
    for wrapper in wrappers(model):
        for _, mask, threshold in wrapper.pruning_vars:
            variables += [mask, threshold]
        variables.append(wrapper.pruning_step)
    return variables


def apply_masks(model: keras.Model) -> None:
    """Multiplies every pruned kernel by its mask, in place.

    The wrappers mask their kernels at the start of each call, so a kernel
    saved between two training steps still holds the last update at its
    pruned positions; this makes the variables themselves sparse.

    Args:
        model: A model with pruning wrappers.
    """
    for wrapper in wrappers(model):
        for weight, mask, _ in wrapper.pruning_vars:
            weight.assign(weight * mask)


def strip(model: keras.Model) -> keras.Model:
    """Returns a copy of `model` with every pruning wrapper replaced by its masked layer.

    Args:
        model: A functional model with `prune_low_magnitude` wrappers (its
            kernels are masked in place first).
    """
    apply_masks(model)
    return _sparsity.strip_pruning(model)


def masked_kernels(model: keras.Model) -> list[Callable[[], tf.Tensor]]:
    """Functions returning each pruned kernel times its mask (what the next step computes with).

    Args:
        model: A model with pruning wrappers.
    """
    return [functools.partial(tf.multiply, weight, mask)
            for wrapper in wrappers(model) for weight, mask, _ in wrapper.pruning_vars]
