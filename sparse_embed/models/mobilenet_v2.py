"""MobileNetV2: Sandler et al., "MobileNetV2: Inverted Residuals and Linear
Bottlenecks" (CVPR 2018), Table 2, as a face embedding network.

    input 112x112x3 (ImageNet: 224x224x3)
    conv3x3, 32, stride 2
    bottleneck (t, c, n, s) = (1, 16, 1, 1)
                              (6, 24, 2, 2)
                              (6, 32, 3, 2)
                              (6, 64, 4, 2)
                              (6, 96, 3, 1)
                              (6, 160, 3, 2)  -> 4x4 (ImageNet: 7x7)
                              (6, 320, 1, 1)
    conv1x1, 1280
    face:     linear GDConv over the whole map, BN -> the embedding (embedding.py)
    ImageNet: global average pool, FC 1000, softmax (`imagenet_classifier`)

A bottleneck is an inverted residual: 1x1 expansion to t x the input
channels (none when t = 1), 3x3 depthwise convolution with the stage's
stride on its first block, linear 1x1 projection, and a residual connection
where the stride is 1 and the channel counts match. Every convolution is
followed by batch norm and every non-linear one by ReLU6. The width
multiplier scales every channel count as Keras' `MobileNetV2(alpha=...)`
does (multiples of 8; the 1280-channel head only grows, for width > 1), so
`imagenet_classifier()` has exactly the parameters of
`keras.applications.MobileNetV2(weights=None)`.

The face variant replaces the classifier by the global depthwise convolution
of MobileFaceNet (aligned faces: a learned weighting of every position
rather than an average). With `se=True` every block gets a
squeeze-and-excitation module on its projected output, before the residual
addition, with squeeze ratio 8, as in the MobileNetV2 face recognition models
of the OpenVINO training extensions.
"""

from __future__ import annotations

from sparse_embed.keras import keras, tf
from sparse_embed.models.common import check_common, check_input_shape, check_width, scale_channels
from sparse_embed.models.embedding import batch_norm, embedding_block
from sparse_embed.models.mobilefacenet import Bottleneck, StageTable
from sparse_embed.models.registry import MODELS

SE_RATIO = 8


MOBILENET_V2 = StageTable(
    stem_channels=32,
    stages=(
        Bottleneck(1, 16, 1, 1),
        Bottleneck(6, 24, 2, 2),
        Bottleneck(6, 32, 3, 2),
        Bottleneck(6, 64, 4, 2),
        Bottleneck(6, 96, 3, 1),
        Bottleneck(6, 160, 3, 2),
        Bottleneck(6, 320, 1, 1),
    ),
    head_channels=1280,
)

# One block per stage and about a quarter of the channels: ~80k parameters
# at 32x32 and d = 128, for tests.
MOBILENET_V2_TINY = StageTable(
    stem_channels=8,
    stages=(
        Bottleneck(1, 8, 1, 1),
        Bottleneck(6, 8, 1, 2),
        Bottleneck(6, 8, 1, 2),
        Bottleneck(6, 16, 1, 2),
        Bottleneck(6, 24, 1, 1),
        Bottleneck(6, 40, 1, 2),
        Bottleneck(6, 80, 1, 1),
    ),
    head_channels=128,
)


def _conv_bn(x: tf.Tensor, filters: int, kernel_size: int, name: str, linear: bool = False,
             strides: int = 1) -> tf.Tensor:
    x = keras.layers.Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=False,
                            name=f"{name}_conv")(x)
    x = batch_norm(f"{name}_bn")(x)
    return x if linear else keras.layers.ReLU(6.0, name=f"{name}_relu6")(x)


def _squeeze_excite(x: tf.Tensor, name: str) -> tf.Tensor:
    # Hu et al. (2018): a per-channel gate from globally pooled features.
    channels = x.shape[-1]
    s = keras.layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_pool")(x)
    s = keras.layers.Conv2D(max(1, channels // SE_RATIO), 1, activation="relu",
                            name=f"{name}_reduce")(s)
    s = keras.layers.Conv2D(channels, 1, activation="sigmoid", name=f"{name}_expand")(s)
    return keras.layers.Multiply(name=f"{name}_scale")([x, s])


def _inverted_residual(x: tf.Tensor, expansion: int, channels: int, strides: int, se: bool,
                       name: str) -> tf.Tensor:
    in_channels = x.shape[-1]
    y = x
    if expansion != 1:
        y = _conv_bn(y, expansion * in_channels, 1, f"{name}_expand")
    y = keras.layers.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False,
                                     name=f"{name}_depthwise_dw")(y)
    y = batch_norm(f"{name}_depthwise_bn")(y)
    y = keras.layers.ReLU(6.0, name=f"{name}_depthwise_relu6")(y)
    y = _conv_bn(y, channels, 1, f"{name}_project", linear=True)
    if se:
        y = _squeeze_excite(y, f"{name}_se")
    if strides == 1 and in_channels == channels:
        y = keras.layers.Add(name=f"{name}_add")([x, y])
    return y


def _features(images: tf.Tensor, spec: StageTable, width: float, se: bool) -> tf.Tensor:
    """The shared trunk: stem, bottlenecks and the 1x1 head convolution."""
    # Keras' channel rule: the stem scales the exact product, the blocks its
    # integer part, and the head keeps its width unless width > 1.
    x = _conv_bn(images, scale_channels(spec.stem_channels * width), 3, "stem", strides=2)
    for i, stage in enumerate(spec.stages, start=1):
        channels = scale_channels(int(stage.channels * width))
        for j in range(1, stage.repeats + 1):
            x = _inverted_residual(x, stage.expansion, channels, stage.stride if j == 1 else 1, se,
                                   f"stage{i}_block{j}")
    head = scale_channels(spec.head_channels * width) if width > 1 else spec.head_channels
    return _conv_bn(x, head, 1, "head")


def build_mobilenet_v2(spec: StageTable, name: str, embedding_size: int, final_activation: str,
                       input_size: int, width: float, input_width: int = 0, dropout: float = 0.0,
                       se: bool = False) -> keras.Model:
    """Builds a face MobileNetV2 (GDConv embedding head) from its stage table.

    Args:
        spec: The stage table (`MOBILENET_V2`, `MOBILENET_V2_TINY`, or your own).
        name: Model name.
        embedding_size: Embedding dimension d.
        final_activation: A name in `sparse_embed.models.embedding.ACTIVATIONS`.
        input_size: Input height, at least the total stride (32).
        width: Width multiplier (Keras' `alpha`); the embedding size is not scaled.
        input_width: Input width; 0 means square.
        dropout: Dropout rate before the embedding layer.
        se: Add a squeeze-and-excitation module to every block.

    Returns:
        A functional model float32 [B, input_size, input_width, 3] in [-1, 1] ->
        float32 [B, embedding_size], the embedding after the final activation.

    Raises:
        ConfigError: If an argument is out of range or `final_activation` is unknown.
    """
    height, image_width = check_input_shape(name, input_size, input_width, spec.stride)
    check_common(embedding_size, final_activation, width, dropout)

    images = keras.Input(shape=(height, image_width, 3), dtype="float32", name="images")
    x = _features(images, spec, width, bool(se))
    # Global depthwise convolution over the whole final map (see mobilefacenet.py).
    x = keras.layers.DepthwiseConv2D((x.shape[1], x.shape[2]), padding="valid", use_bias=False,
                                     name="gdconv_dw")(x)
    x = batch_norm("gdconv_bn")(x)
    embedding = embedding_block(x, embedding_size, final_activation, dropout=dropout)
    return keras.Model(images, embedding, name=name)


def imagenet_classifier(width: float = 1.0, input_size: int = 224, classes: int = 1000) -> keras.Model:
    """MobileNetV2 with its ImageNet classifier, built from the same blocks as the face variant.

    At width 1 and 224x224 it has exactly the 3,538,984 weights of
    `keras.applications.MobileNetV2(weights=None)` (Keras' count, batch-norm
    statistics included), which pins the blocks and the width rule.

    Args:
        width: Width multiplier (Keras' `alpha`).
        input_size: Square input resolution.
        classes: Number of classes of the softmax layer.

    Returns:
        A functional model float32 [B, input_size, input_size, 3] -> class
        probabilities [B, classes].

    Raises:
        ConfigError: If `width` or `input_size` is out of range.
        ValueError: If `classes` is not a positive integer.
    """
    height, image_width = check_input_shape("mobilenet_v2", input_size, 0, MOBILENET_V2.stride)
    check_width(width)
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise ValueError(f"classes must be a positive integer, got {classes!r}")
    images = keras.Input(shape=(height, image_width, 3), dtype="float32", name="images")
    x = _features(images, MOBILENET_V2, width, se=False)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    probabilities = keras.layers.Dense(classes, activation="softmax", name="predictions")(x)
    return keras.Model(images, probabilities, name="mobilenet_v2_imagenet")


@MODELS.register("mobilenet_v2")
def mobilenet_v2(embedding_size: int = 512, final_activation: str = "none", input_size: int = 112,
                 width: float = 1.0, input_width: int = 0, dropout: float = 0.0,
                 se: bool = False) -> keras.Model:
    """MobileNetV2 (Sandler et al., 2018) with a GDConv face embedding head, 112x112.

    Args:
        embedding_size: Embedding dimension d.
        final_activation: `none` | `relu` | `soft_threshold`.
        input_size: Input height.
        width: Width multiplier.
        input_width: Input width; 0 means square.
        dropout: Dropout rate before the embedding layer.
        se: Squeeze-and-excitation modules in every block.
    """
    return build_mobilenet_v2(MOBILENET_V2, "mobilenet_v2", embedding_size, final_activation,
                              input_size, width, input_width, dropout, se)


@MODELS.register("mobilenet_v2_tiny")
def mobilenet_v2_tiny(embedding_size: int = 128, final_activation: str = "none", input_size: int = 32,
                      width: float = 1.0, input_width: int = 0, dropout: float = 0.0,
                      se: bool = False) -> keras.Model:
    """MobileNetV2 with one block per stage and 8-80 channels, 32x32 input: for tests.

    Args:
        embedding_size: Embedding dimension d.
        final_activation: `none` | `relu` | `soft_threshold`.
        input_size: Input height.
        width: Width multiplier.
        input_width: Input width; 0 means square.
        dropout: Dropout rate before the embedding layer.
        se: Squeeze-and-excitation modules in every block.
    """
    return build_mobilenet_v2(MOBILENET_V2_TINY, "mobilenet_v2_tiny", embedding_size,
                              final_activation, input_size, width, input_width, dropout, se)
