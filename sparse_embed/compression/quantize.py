"""Quantization-aware training of a backbone with TF-MOT.

Three things TF-MOT's default 8-bit scheme does not do for a face backbone
are done here, without changing the model:

- PReLU (MobileFaceNet, IResNet) has no entry in TF-MOT's registry:
  `OutputQuantizeConfig` quantizes its output only. The converter quantizes
  the constant alpha itself, and an output-only fake-quant is what lets the
  TFLite PRELU op run in int8 (fake-quantizing alpha as well trains but
  leaves nothing more for the converter to use). The int8 export then
  rewrites PRELU, which XNNPACK does not run in int8, as MUL + MAXIMUM at
  that same trained output range (compression/rewrite.py).
- The embedding block ends Dense(no bias) -> BatchNormalization -> final
  activation. TF-MOT's Dense + BN transform trains but converts badly (the
  FULLY_CONNECTED op stays float with `Optimize.DEFAULT`, and a full-int8
  model gets a wrong bias scale), and a ReLU layer of its own leaves the Dense
  kernel without fake-quant. `fold_embedding` therefore folds the BN into the
  Dense (with bias) before QAT and merges a ReLU into `Dense(activation='relu')`.
  The folded embedding layer keeps the BN's inference-time statistics: QAT
  fine-tunes a trained run, it does not re-learn them.
- `SoftThreshold` (sparse_embed/models/embedding.py) gets
  `OutputQuantizeConfig`: its output is fake-quantized, its threshold is not.
  The threshold is subtracted, not multiplied, and the converter quantizes it
  into the SUB op's input scale; what matters for int8 is the range of the
  sparse output, whose exact zeros stay zeros (0 is on the quantization grid).

Weights use TF-MOT's per-channel scheme for convolutions (per-tensor for
Dense, as TFLite's FULLY_CONNECTED wants). N-bit QAT (`bits` or
`activation_bits` below 8) uses TF-MOT's experimental n-bit scheme; TFLite
deploys only 8-bit, so N-bit runs are for accuracy-versus-bits studies.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.quantization.keras import quantize_layer, quantize_wrapper

from sparse_embed.config import CompressionConfig
from sparse_embed.errors import ConfigError
from sparse_embed.keras import keras, tf
from sparse_embed.models.embedding import SoftThreshold

_quantizers = tfmot.quantization.keras.quantizers

# Layer names of the embedding block (models/embedding.py `embedding_block`).
EMBEDDING = "embedding"
EMBEDDING_DENSE = "embedding_dense"
EMBEDDING_BN = "embedding_bn"


def _activation_quantizer(bits: int) -> _quantizers.Quantizer:
    # As TF-MOT's default activation quantizer: asymmetric, per tensor, moving average range.
    return _quantizers.MovingAverageQuantizer(num_bits=bits, per_axis=False, symmetric=False,
                                             narrow_range=False)


@keras.utils.register_keras_serializable(package="sparse_embed")
class OutputQuantizeConfig(tfmot.quantization.keras.QuantizeConfig):
    """Fake-quantizes a layer's output only: no weight or inner activation quantization.

    Used for PReLU (the converter quantizes alpha itself) and for `SoftThreshold`.

    Args:
        activation_bits: Bits of the output quantizer.
    """

    def __init__(self, activation_bits: int = 8) -> None:
        self.activation_bits = int(activation_bits)

    def get_weights_and_quantizers(self, layer: keras.layers.Layer) -> list:
        return []

    def get_activations_and_quantizers(self, layer: keras.layers.Layer) -> list:
        return []

    def set_quantize_weights(self, layer: keras.layers.Layer, quantize_weights: list) -> None:
        del layer, quantize_weights

    def set_quantize_activations(self, layer: keras.layers.Layer, quantize_activations: list) -> None:
        del layer, quantize_activations

    def get_output_quantizers(self, layer: keras.layers.Layer) -> list:
        return [_activation_quantizer(self.activation_bits)]

    def get_config(self) -> dict:
        return {"activation_bits": self.activation_bits}


CUSTOM_OBJECTS = {
    "OutputQuantizeConfig": OutputQuantizeConfig,
    "SoftThreshold": SoftThreshold,
}


def _bn_scale_shift(bn: keras.layers.BatchNormalization) -> tuple[np.ndarray, np.ndarray]:
    """Inference-time BN as y = x * scale + shift."""
    dim = int(bn.moving_mean.shape[0])
    gamma = bn.gamma.numpy() if bn.scale else np.ones(dim, np.float32)
    beta = bn.beta.numpy() if bn.center else np.zeros(dim, np.float32)
    scale = gamma / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    return scale, beta - bn.moving_mean.numpy() * scale


def fold_embedding(backbone: keras.Model) -> keras.Model:
    """Folds the embedding block's BN into its Dense layer (and a ReLU into the Dense).

    Dense(W, no bias) -> BN(gamma, beta, mean, var) becomes Dense(W * s, b)
    with s = gamma / sqrt(var + eps) and b = beta - mean * s: the same function
    as the block in inference mode. A final ReLU becomes the Dense's activation
    and the Dense takes the name `embedding`; a linear final activation is
    dropped the same way; `SoftThreshold` stays a layer after the folded Dense.
    The layers before the block are shared with `backbone`, not copied.
    Inference-time BN is what QAT fine-tunes from: the folded layer has no
    batch statistics to learn.

    Args:
        backbone: A backbone built by `sparse_embed.models.build_model`.

    Returns:
        images -> embeddings, the same function in inference mode.

    Raises:
        ConfigError: If the backbone does not end with the embedding block.
    """
    try:
        dense = backbone.get_layer(EMBEDDING_DENSE)
        bn = backbone.get_layer(EMBEDDING_BN)
        final = backbone.get_layer(EMBEDDING)
    except ValueError as e:
        raise ConfigError(
            f"backbone {backbone.name} does not end with the embedding block "
            f"({EMBEDDING_DENSE} -> {EMBEDDING_BN} -> {EMBEDDING}); build it with embedding_block"
        ) from e
    scale, shift = _bn_scale_shift(bn)
    kernel = dense.kernel.numpy() * scale
    if isinstance(final, keras.layers.ReLU):
        activation, name = "relu", EMBEDDING
    elif isinstance(final, keras.layers.Activation) and final.get_config()["activation"] == "linear":
        activation, name = None, EMBEDDING
    elif isinstance(final, SoftThreshold):
        activation, name = None, EMBEDDING_DENSE
    else:
        raise ConfigError(f"cannot fold a final activation of type {type(final).__name__}; "
                          f"use model.final_activation relu, soft_threshold or none")
    folded = keras.layers.Dense(dense.units, activation=activation, use_bias=True, name=name,
                                dtype="float32")
    outputs = folded(dense.input)
    folded.set_weights([kernel, shift])
    if isinstance(final, SoftThreshold):
        # A copy, so the original backbone's last layer keeps a single inbound node.
        threshold = SoftThreshold.from_config(final.get_config())
        outputs = threshold(outputs)
        threshold.set_weights(final.get_weights())
    return keras.Model(backbone.input, outputs, name=backbone.name)


# Layers that get an output fake-quant only (OutputQuantizeConfig): no entry in TF-MOT's registry.
_OUTPUT_ONLY = (keras.layers.PReLU, SoftThreshold)


def _annotate(layer: keras.layers.Layer, activation_bits: int,
              output_only: tuple[type, ...] = _OUTPUT_ONLY) -> keras.layers.Layer:
    if isinstance(layer, output_only):
        return tfmot.quantization.keras.quantize_annotate_layer(
            layer, OutputQuantizeConfig(activation_bits))
    return tfmot.quantization.keras.quantize_annotate_layer(layer)


def quantize(backbone: keras.Model, config: CompressionConfig,
             preserve_sparsity: bool = False) -> keras.Model:
    """Returns the quantization-aware version of a backbone (folded embedding, fake-quant everywhere).

    Args:
        backbone: A float backbone (its weights are carried over).
        config: The compression section (`bits`, `activation_bits`).
        preserve_sparsity: Use TF-MOT's pruning-preserving scheme (PQAT): the
            zeros of every kernel stay zeros. 8-bit only.

    Returns:
        A new model; the float layers of `backbone` are not changed.

    Raises:
        ConfigError: If `preserve_sparsity` asks for fewer than 8 bits.
    """
    return _quantize(fold_embedding(backbone), config, preserve_sparsity, _OUTPUT_ONLY)


def quantize_model(model: keras.Model, config: CompressionConfig,
                   preserve_sparsity: bool = False) -> keras.Model:
    """Returns the quantization-aware version of a model that has no embedding block to fold.

    `quantize` for networks that are not embedding backbones (a landmark
    regressor such as Landnet): every layer annotated as in `quantize`,
    PReLU with its output fake-quant. Batch norms that follow activations,
    not convolutions (Landnet: conv -> PReLU -> BN), have no conv + BN fold
    in TF-MOT, which refuses them; kept as BN layers with an output
    fake-quant, their MUL would stay float in the int8 file (nothing gives
    its output a range). Each is folded first into the 1x1 depthwise
    convolution that computes it in inference mode (`fold_batch_norms`),
    which TF-MOT quantizes like any convolution: QAT fine-tunes from the
    inference-time statistics, as it does for the embedding block.

    Args:
        model: A float functional model (its weights are carried over).
        config: The compression section (`bits`, `activation_bits`).
        preserve_sparsity: Use TF-MOT's pruning-preserving scheme (8-bit only).

    Returns:
        A new model; the float layers of `model` are not changed.

    Raises:
        ConfigError: If `preserve_sparsity` asks for fewer than 8 bits.
    """
    return _quantize(fold_batch_norms(model), config, preserve_sparsity, _OUTPUT_ONLY)


def fold_batch_norms(model: keras.Model) -> keras.Model:
    """Replaces every BatchNormalization of a model by its inference-mode 1x1 depthwise convolution.

    BN(x) = x * s + b with s = gamma / sqrt(var + eps), b = beta - mean * s,
    per channel: a DepthwiseConv2D(1) with kernel s and bias b, the same
    function in inference mode. The layer keeps the BN's name.

    Args:
        model: A functional model whose batch norms act on NHWC tensors.

    Returns:
        A new model; `model` is not changed.
    """
    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        if isinstance(layer, keras.layers.BatchNormalization):
            return keras.layers.DepthwiseConv2D(1, use_bias=True, name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    folded = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        target = folded.get_layer(layer.name)
        if isinstance(layer, keras.layers.BatchNormalization):
            scale, shift = _bn_scale_shift(layer)
            target.set_weights([scale.reshape(1, 1, -1, 1).astype(np.float32), shift.astype(np.float32)])
        else:
            target.set_weights(layer.get_weights())
    return folded


def _quantize(model: keras.Model, config: CompressionConfig, preserve_sparsity: bool,
              output_only: tuple[type, ...]) -> keras.Model:
    n_bit = config.bits < 8 or config.activation_bits < 8
    if preserve_sparsity and n_bit:
        raise ConfigError(
            f"compression.type=prune_qat is 8-bit only (TF-MOT's pruning-preserving scheme); "
            f"got compression.bits={config.bits}, activation_bits={config.activation_bits}"
        )
    if preserve_sparsity:
        scheme = tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme()
    elif n_bit:
        scheme = tfmot.quantization.keras.experimental.default_n_bit.DefaultNBitQuantizeScheme(
            num_bits_weight=config.bits, num_bits_activation=config.activation_bits)
    else:
        scheme = tfmot.quantization.keras.default_8bit.Default8BitQuantizeScheme()
    annotated = keras.models.clone_model(
        model, clone_function=lambda layer: _annotate(layer, config.activation_bits, output_only))
    annotated.set_weights(model.get_weights())
    with tfmot.quantization.keras.quantize_scope(CUSTOM_OBJECTS):
        return tfmot.quantization.keras.quantize_apply(annotated, scheme)


def refresh_sparsity_masks(model: keras.Model) -> None:
    """Recomputes the zero masks of a pruning-preserving QAT model from its current weights.

    TF-MOT's PQAT computes each kernel's mask once, from the weights it sees
    when the model is built, and keeps it as a constant rather than a
    variable, so the checkpoint does not hold it. A model rebuilt to resume
    or to embed gets its weights only afterwards: this puts the masks back.
    A no-op for other models.

    Args:
        model: A model returned by `quantize`.
    """
    for layer in model.layers:
        for weight, _, quantizer_vars in getattr(layer, "_weight_vars", ()):
            if "sparsity_mask" in quantizer_vars:
                quantizer_vars["sparsity_mask"] = tf.math.divide_no_nan(weight, weight)


def _sparsity_preserving_kernels(model: keras.Model) -> list[tf.Variable]:
    return [weight for layer in model.layers
            for weight, _, quantizer_vars in getattr(layer, "_weight_vars", ())
            if "sparsity_mask" in quantizer_vars]


def preserves_sparsity(model: keras.Model) -> bool:
    """Whether `model` was quantized with the pruning-preserving scheme (PQAT).

    Args:
        model: A Keras model.
    """
    return bool(_sparsity_preserving_kernels(model))


def quantized_kernels(model: keras.Model) -> list[Callable[[], tf.Tensor]]:
    """Functions returning each kernel whose zeros PQAT preserves (the float kernels it fake-quantizes).

    Args:
        model: A model returned by `quantize(..., preserve_sparsity=True)`.
    """
    return [weight.read_value for weight in _sparsity_preserving_kernels(model)]


def has_quantize_layers(model: keras.Model) -> bool:
    """Whether `model` carries TF-MOT fake-quant (quantize wrappers or input quantize layers).

    Args:
        model: A Keras model.
    """
    kinds = (quantize_wrapper.QuantizeWrapper, quantize_layer.QuantizeLayer)
    return any(isinstance(layer, kinds) for layer in model.layers)
