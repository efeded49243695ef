"""The embedding layer every backbone ends with, and its final activation.

A backbone's features go through `embedding_block`: a linear projection to
the embedding dimension, batch normalisation and the final activation chosen
by `model.final_activation`:

- `none`: the linear, batch-normalised embedding (dense; the usual face model).
- `relu`: max(x, 0). Sparse embeddings of Paria et al., "Minimizing FLOPs to
  Learn Efficient Sparse Representations" (ICLR 2020): about half the entries
  are zero at initialisation and the FLOPs regularizer pushes the rest.
- `soft_threshold`: `SoftThreshold`, sign(x) * max(|x| - t, 0) with a learned
  per-dimension t. Keeps both signs (twice the code space of ReLU for the same
  number of non-zeros) while still producing exact zeros.

The output layer is always named ``embedding`` and computes in float32, so the
embedding keeps full precision under a mixed-precision policy and tools can
find the output by name whatever the activation.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

from sparse_embed.errors import ConfigError
from sparse_embed.keras import keras, tf
from sparse_embed.registry import Registry

# Batch-norm settings shared by the backbones: momentum 0.9 and epsilon 1e-5
# are those of the reference face-recognition implementations (InsightFace);
# Keras' 0.99 would make the moving statistics of short runs lag far behind.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

DEFAULT_INITIAL_THRESHOLD = 0.01


@keras.utils.register_keras_serializable(package="sparse_embed")
class SoftThreshold(keras.layers.Layer):
    """Learned soft-thresholding: y = sign(x) * max(|x| - t, 0), one t per dimension.

    Entries with |x| <= t become exactly zero, the others shrink towards zero
    by t, which is the proximal operator of t * |x| (the L1 penalty), as in
    ISTA-style sparse coding.

    The threshold is a plain non-negative weight (a `NonNeg` constraint, and
    clipped at zero again in `call` for optimizers that skip constraints)
    rather than softplus of an unconstrained weight, for two reasons:
    decoupled weight decay then pulls t towards 0, i.e. towards the identity,
    instead of towards softplus(0) = ln 2, which would silently zero about half
    of a unit-variance input; and dy/dt is -sign(y) on active entries at any t,
    whereas through softplus a small threshold would learn at a rate scaled by
    sigmoid(raw) ~ t, i.e. hardly at all.

    Args:
        initial_threshold: Initial value of every threshold, >= 0. Keep it small
            against the input's scale (unit variance after batch norm), so the
            layer starts near the identity and training decides the sparsity.
        **kwargs: Base `keras.layers.Layer` arguments (name, dtype, ...).

    Input shape:
        [..., d] with d known.

    Output shape:
        The input shape.
    """

    def __init__(self, initial_threshold: float = DEFAULT_INITIAL_THRESHOLD, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if (isinstance(initial_threshold, bool) or not isinstance(initial_threshold, numbers.Real)
                or not math.isfinite(initial_threshold) or initial_threshold < 0):
            raise ValueError(
                f"initial_threshold must be a finite number >= 0, got {initial_threshold!r}"
            )
        self.initial_threshold = float(initial_threshold)

    def build(self, input_shape: tf.TensorShape) -> None:
        dim = tf.TensorShape(input_shape)[-1]
        if dim is None:
            raise ValueError(
                f"SoftThreshold needs a known last dimension, got input shape {input_shape}"
            )
        self.threshold = self.add_weight(
            name="threshold",
            shape=(dim,),
            initializer=keras.initializers.Constant(self.initial_threshold),
            constraint=keras.constraints.NonNeg(),
            trainable=True,
        )
        super().build(input_shape)

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        t = tf.cast(tf.nn.relu(self.threshold), inputs.dtype)
        # relu(x - t) - relu(-x - t) equals sign(x) * max(|x| - t, 0) exactly
        # (at most one term is non-zero), and uses only ops that every TFLite
        # delegate and integer quantization support.
        return tf.nn.relu(inputs - t) - tf.nn.relu(-inputs - t)

    def compute_output_shape(self, input_shape: tf.TensorShape) -> tf.TensorShape:
        return tf.TensorShape(input_shape)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"initial_threshold": self.initial_threshold})
        return config


# Final activations: factory(name) -> the output layer. float32 so that the
# embedding (and the sparsity regularizer on it) stays full precision under a
# mixed-precision policy.
ACTIVATIONS: Registry[Callable[[str], keras.layers.Layer]] = Registry("final activation")


@ACTIVATIONS.register("none")
def _identity(name: str) -> keras.layers.Layer:
    return keras.layers.Activation("linear", name=name, dtype="float32")


@ACTIVATIONS.register("relu")
def _relu(name: str) -> keras.layers.Layer:
    return keras.layers.ReLU(name=name, dtype="float32")


@ACTIVATIONS.register("soft_threshold")
def _soft_threshold(name: str) -> keras.layers.Layer:
    return SoftThreshold(name=name, dtype="float32")


def batch_norm(name: str) -> keras.layers.BatchNormalization:
    """Returns a batch-norm layer with the project's shared settings.

    Args:
        name: Layer name.
    """
    return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)


def check_embedding_args(embedding_size: int, final_activation: str,
                         dropout: float = 0.0) -> tuple[Callable[[str], keras.layers.Layer], float]:
    """Checks the embedding layer's arguments; builders call it before building any layer.

    Args:
        embedding_size: Embedding dimension d, a positive integer.
        final_activation: A name in `ACTIVATIONS`.
        dropout: Dropout rate before the linear layer, in [0, 1).

    Returns:
        The final activation's factory and the dropout rate as a float.

    Raises:
        ConfigError: If one of them is out of range or unknown.
    """
    if (isinstance(embedding_size, bool) or not isinstance(embedding_size, numbers.Integral)
            or embedding_size < 1):
        raise ConfigError(
            f"model.embedding_size must be a positive integer, got {embedding_size!r}"
        )
    if isinstance(dropout, bool) or not (isinstance(dropout, numbers.Real) and 0 <= dropout < 1):
        raise ConfigError(f"model.dropout must be a number in [0, 1), got {dropout!r}")
    return ACTIVATIONS.get(final_activation), float(dropout)


def embedding_block(x: tf.Tensor, embedding_size: int, final_activation: str,
                    name: str = "embedding", dropout: float = 0.0) -> tf.Tensor:
    """Projects backbone features to the embedding: [dropout,] linear layer, BN, final activation.

    Inputs of rank > 2 are flattened first, so a [B, 1, 1, C] global feature
    (MobileFaceNet's GDConv) and a [B, H, W, C] map (IResNet's FC output
    layer) both work; on a 1x1 map the dense layer is exactly a linear 1x1
    convolution. No bias: the batch norm that follows has its own.

    Args:
        x: Backbone features, [B, C] or [B, ..., C] with static trailing dims.
        embedding_size: Embedding dimension d.
        final_activation: A name in `ACTIVATIONS`.
        name: Prefix of the created layers; the output layer gets `name` itself.
        dropout: Rate of a dropout layer on the (flattened) features before
            the linear layer, as in IResNet's "E" output; 0 adds no layer.

    Returns:
        The embedding, float32 [B, embedding_size], after the final activation
        and not L2-normalised.

    Raises:
        ConfigError: If `embedding_size` is not a positive integer, `dropout`
            is outside [0, 1) or `final_activation` is unknown.
    """
    activation, dropout = check_embedding_args(embedding_size, final_activation, dropout)
    if x.shape.rank > 2:
        x = keras.layers.Flatten(name=f"{name}_flatten")(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name=f"{name}_dropout")(x)
    x = keras.layers.Dense(int(embedding_size), use_bias=False, name=f"{name}_dense")(x)
    x = batch_norm(f"{name}_bn")(x)
    return activation(name)(x)


# The output layer of a model whose output is a parameter vector `[mean | extra]`.
PARAMETERS_LAYER = "parameters"
# The extra head's layer: the variance or concentration parameters.
EXTRA_LAYER = "extra"


def with_extra_head(model: keras.Model, extra: int) -> keras.Model:
    """`model` with an extra head: images -> parameter vectors `[embedding (D) | extra]`.

    The extra head is one linear layer on the features the embedding layer
    reads (its dense layer's input), as the probabilistic-embeddings reference
    predicts a variance or concentration (its multi-layer extra head has no
    activations, so it is linear too). The new model shares every layer of
    `model`; `mean_network` recovers `model` from it, with the same checkpoint
    layout, so a deterministic run's weights load into the mean's part.

    Args:
        model: A model of `MODELS`, ending with the `embedding` layer.
        extra: Number of extra parameters (1, or D for a diagonal covariance).

    Returns:
        float32 [B, D + extra], named like `model`; its output layer is `parameters`.
    """
    features = model.get_layer("embedding_dense").input
    hidden = keras.layers.Dense(extra, name=EXTRA_LAYER, dtype="float32")(features)
    parameters = keras.layers.Concatenate(name=PARAMETERS_LAYER, dtype="float32")([model.output, hidden])
    return keras.Model(model.inputs, parameters, name=model.name)


def mean_size(model: keras.Model) -> int | None:
    """D, the mean's width, of a model with an extra head; None for a model whose output is the embedding.

    Args:
        model: A model of `MODELS`, with or without an extra head.
    """
    if model.output_names != [PARAMETERS_LAYER]:
        return None
    return int(model.get_layer("embedding").output.shape[-1])


def mean_network(model: keras.Model) -> keras.Model:
    """images -> embeddings (the mean) of a model, as `MODELS` builds it without an extra head.

    Args:
        model: A model of `MODELS`, with or without an extra head.

    Returns:
        `model` itself without an extra head; otherwise a model sharing its layers.
    """
    if model.output_names != [PARAMETERS_LAYER]:
        return model
    return keras.Model(model.inputs, model.get_layer("embedding").output, name=model.name)
