"""MobileFaceNet: Chen et al., "MobileFaceNets: Efficient CNNs for Accurate
Real-Time Face Verification on Mobile Devices" (CCBR 2018), Table 1.

    input 112x112x3
    conv3x3, 64, stride 2                       -> 56x56x64
    depthwise conv3x3, 64, stride 1
    bottleneck (t, c, n, s) = (2, 64, 5, 2)     -> 28x28x64
                              (4, 128, 1, 2)    -> 14x14x128
                              (2, 128, 6, 1)
                              (4, 128, 1, 2)    -> 7x7x128
                              (2, 128, 2, 1)
    conv1x1, 512
    linear GDConv7x7, 512 (depthwise, valid)    -> 1x1x512
    linear conv1x1, d; BN                       -> the embedding (embedding.py)

Bottlenecks are MobileNetV2's: 1x1 expansion to t * input channels, 3x3
depthwise with the stage's stride on the first of its n blocks, linear 1x1
projection, and a residual connection where stride is 1 and the channel
counts match. Every convolution is followed by batch norm, and every
non-linear one by a PReLU with one slope per channel. At d = 128 the network
has 1.00M parameters and 221M multiply-adds, within 5% of the paper's 0.99M
and 221M (tests/test_models.py).

The global depthwise convolution covers the whole final feature map, whatever
its size, so smaller inputs (the tiny variant, 32x32) work with the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparse_embed.keras import keras, tf
from sparse_embed.models.common import check_common, check_input_shape, check_no_se, prelu, scale_channels
from sparse_embed.models.embedding import batch_norm, embedding_block
from sparse_embed.models.registry import MODELS


@dataclass(frozen=True)
class Bottleneck:
    """One row of the paper's Table 1: a stage of n inverted-residual blocks.

    Attributes:
        expansion: t, expansion factor of the 1x1 layer (x input channels).
        channels: c, output channels of every block of the stage.
        repeats: n, number of blocks.
        stride: s, stride of the first block's depthwise convolution.
    """

    expansion: int
    channels: int
    repeats: int
    stride: int


@dataclass(frozen=True)
class StageTable:
    """The stage table of a MobileFaceNet or MobileNetV2 variant, at width 1.

    Both networks are a stem, stages of inverted-residual bottlenecks and a 1x1
    head convolution; they differ in the blocks built from the table.

    Attributes:
        stem_channels: Channels of the stride-2 3x3 convolution (and, in
            MobileFaceNet, of the depthwise convolution after it).
        stages: The bottleneck stages, in order.
        head_channels: Channels of the 1x1 convolution before the GDConv.
    """

    stem_channels: int
    stages: tuple[Bottleneck, ...]
    head_channels: int

    @property
    def stride(self) -> int:
        """Total down-sampling factor of the network."""
        stride = 2
        for stage in self.stages:
            stride *= stage.stride
        return stride


MOBILEFACENET = StageTable(
    stem_channels=64,
    stages=(
        Bottleneck(2, 64, 5, 2),
        Bottleneck(4, 128, 1, 2),
        Bottleneck(2, 128, 6, 1),
        Bottleneck(4, 128, 1, 2),
        Bottleneck(2, 128, 2, 1),
    ),
    head_channels=512,
)

# The paper's table with one block per stage and a quarter of the channels:
# ~50k parameters and 0.65M MACs at d = 128: builds and trains in seconds on a
# CPU (tests, the smoke config).
MOBILEFACENET_TINY = StageTable(
    stem_channels=16,
    stages=(
        Bottleneck(2, 16, 1, 2),
        Bottleneck(4, 32, 1, 2),
        Bottleneck(2, 32, 1, 1),
        Bottleneck(4, 32, 1, 2),
        Bottleneck(2, 32, 1, 1),
    ),
    head_channels=128,
)


def _conv_bn(x: tf.Tensor, filters: int, kernel_size: int, strides: int, name: str,
             linear: bool = False) -> tf.Tensor:
    x = keras.layers.Conv2D(filters, kernel_size, strides=strides, padding="same",
                            use_bias=False, name=f"{name}_conv")(x)
    x = batch_norm(f"{name}_bn")(x)
    return x if linear else prelu(x, f"{name}_prelu")


def _depthwise_bn(x: tf.Tensor, kernel_size: int | tuple[int, int], strides: int, name: str,
                  padding: str = "same", linear: bool = False) -> tf.Tensor:
    x = keras.layers.DepthwiseConv2D(kernel_size, strides=strides, padding=padding,
                                     use_bias=False, name=f"{name}_dw")(x)
    x = batch_norm(f"{name}_bn")(x)
    return x if linear else prelu(x, f"{name}_prelu")


def _inverted_residual(x: tf.Tensor, expansion: int, channels: int, strides: int,
                       name: str) -> tf.Tensor:
    in_channels = x.shape[-1]
    y = _conv_bn(x, expansion * in_channels, 1, 1, f"{name}_expand")
    y = _depthwise_bn(y, 3, strides, f"{name}_depthwise")
    y = _conv_bn(y, channels, 1, 1, f"{name}_project", linear=True)
    if strides == 1 and in_channels == channels:
        y = keras.layers.Add(name=f"{name}_add")([x, y])
    return y


def build_mobilefacenet(spec: StageTable, name: str, embedding_size: int,
                        final_activation: str, input_size: int, width: float,
                        input_width: int = 0, dropout: float = 0.0, se: bool = False) -> keras.Model:
    """Builds a MobileFaceNet from its stage table.

    Args:
        spec: The stage table (`MOBILEFACENET`, `MOBILEFACENET_TINY`, or your own).
        name: Model name.
        embedding_size: Embedding dimension d.
        final_activation: A name in `sparse_embed.models.embedding.ACTIVATIONS`.
        input_size: Input height, at least the total stride.
        width: Multiplier of every channel count (rounded to multiples of 8);
            the embedding size is not scaled.
        input_width: Input width; 0 means square. The GDConv covers the
            whole final map, so any size from the total stride up works.
        dropout: Dropout rate before the embedding layer.
        se: Must be false: MobileFaceNet has no squeeze-and-excitation blocks.

    Returns:
        A functional model float32 [B, input_size, input_width, 3] in [-1, 1] ->
        float32 [B, embedding_size], the embedding after the final activation.

    Raises:
        ConfigError: If an argument is out of range, `se` is true or
            `final_activation` is unknown.
    """
    height, image_width = check_input_shape(name, input_size, input_width, spec.stride)
    check_common(embedding_size, final_activation, width, dropout)
    check_no_se(name, se)

    images = keras.Input(shape=(height, image_width, 3), dtype="float32", name="images")
    stem = scale_channels(spec.stem_channels, width)
    x = _conv_bn(images, stem, 3, 2, "stem")
    x = _depthwise_bn(x, 3, 1, "stem_depthwise")
    for i, stage in enumerate(spec.stages, start=1):
        channels = scale_channels(stage.channels, width)
        for j in range(1, stage.repeats + 1):
            strides = stage.stride if j == 1 else 1
            x = _inverted_residual(x, stage.expansion, channels, strides, f"stage{i}_block{j}")
    x = _conv_bn(x, scale_channels(spec.head_channels, width), 1, 1, "head")
    # Global depthwise convolution: a learned per-channel weighting of every
    # position of the final map (faces are aligned, so positions matter,
    # unlike with global average pooling).
    x = _depthwise_bn(x, (x.shape[1], x.shape[2]), 1, "gdconv", padding="valid", linear=True)
    embedding = embedding_block(x, embedding_size, final_activation, dropout=dropout)
    return keras.Model(images, embedding, name=name)


@MODELS.register("mobilefacenet")
def mobilefacenet(embedding_size: int = 128, final_activation: str = "none",
                  input_size: int = 112, width: float = 1.0, input_width: int = 0,
                  dropout: float = 0.0, se: bool = False) -> keras.Model:
    """MobileFaceNet as in Chen et al. (2018), Table 1.

    Args:
        embedding_size: Embedding dimension d.
        final_activation: `none` | `relu` | `soft_threshold`.
        input_size: Input height (the paper's is 112).
        width: Channel width multiplier.
        input_width: Input width; 0 means square.
        dropout: Dropout rate before the embedding layer.
        se: Must be false (no squeeze-and-excitation blocks).
    """
    return build_mobilefacenet(MOBILEFACENET, "mobilefacenet", embedding_size, final_activation,
                               input_size, width, input_width, dropout, se)


@MODELS.register("mobilefacenet_tiny")
def mobilefacenet_tiny(embedding_size: int = 128, final_activation: str = "none",
                       input_size: int = 32, width: float = 1.0, input_width: int = 0,
                       dropout: float = 0.0, se: bool = False) -> keras.Model:
    """MobileFaceNet with one block per stage and 16-32 channels, 32x32 input: for tests.

    Args:
        embedding_size: Embedding dimension d.
        final_activation: `none` | `relu` | `soft_threshold`.
        input_size: Input height.
        width: Channel width multiplier.
        input_width: Input width; 0 means square.
        dropout: Dropout rate before the embedding layer.
        se: Must be false (no squeeze-and-excitation blocks).
    """
    return build_mobilefacenet(MOBILEFACENET_TINY, "mobilefacenet_tiny", embedding_size,
                               final_activation, input_size, width, input_width, dropout, se)
