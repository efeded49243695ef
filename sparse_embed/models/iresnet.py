"""IResNet: the ResNets of ArcFace (Deng et al., "ArcFace: Additive Angular
Margin Loss for Deep Face Recognition", CVPR 2019), as in InsightFace's
`arcface_torch` backbones, and the sparse-embed paper's `faceresnet`.

    input 112x112x3
    conv3x3, 64, BN, PReLU                      -> 112x112x64
    stage 1: n1 IR blocks, 64 channels          -> 56x56x64
    stage 2: n2 IR blocks, 128 channels         -> 28x28x128
    stage 3: n3 IR blocks, 256 channels         -> 14x14x256
    stage 4: n4 IR blocks, 512 channels         -> 7x7x512
    "E" output: BN, dropout, flatten, FC d, BN  -> the embedding (embedding.py)

    (n1, n2, n3, n4) = (2, 2, 2, 2) iresnet18, (3, 4, 6, 3) iresnet34,
                       (3, 4, 14, 3) iresnet50, (3, 13, 30, 3) iresnet100

An improved-residual (IR) block is BN - conv3x3 - BN - PReLU - conv3x3 - BN
plus a shortcut; the stage's stride sits on the second convolution, and the
first block of a stage (where the shape changes) has a 1x1 strided
convolution + BN on its shortcut. Strided convolutions pad one pixel on every
side (ZeroPadding2D + "valid"), as PyTorch's padding=1 does, rather than
Keras' "same", which pads only the bottom/right of an even input: the
sampled positions then match InsightFace's, so its weights would transfer.
At 112x112 and d = 512 the sizes are within 0.2% of InsightFace's published
r34 34.1M parameters / 8.934 GFLOPs, r50 43.6M / 12.637 GFLOPs, r100 65.1M /
24.209 GFLOPs (FLOPs = 2 x multiply-adds; tests/test_models.py).

Two details differ from `arcface_torch`, both from the project's shared
embedding layer: the FC has no bias (the BN after it has one) and that BN's
scale is trained, where InsightFace freezes it at 1.

`faceresnet` is the face ResNet of the original sparse-embed code (Paria et
al., ICLR 2020): the same IR units [3, 13, 30, 3], but a ReLU inside the
blocks and a bare stem convolution (no BN or activation after it). Its
parameter count differs from iresnet100's only by those PReLU slopes and the
stem BN; its multiply-adds are identical. The paper trains it with the
soft-threshold final activation; the builder follows `model.final_activation`
like every other (a packaged config selects soft_threshold).
"""

from __future__ import annotations

from dataclasses import dataclass

from sparse_embed.keras import keras, tf
from sparse_embed.models.common import check_common, check_input_shape, check_no_se, prelu, scale_channels
from sparse_embed.models.embedding import batch_norm, embedding_block
from sparse_embed.models.registry import MODELS

ACTIVATIONS = ("prelu", "relu")


@dataclass(frozen=True)
class IResNetSpec:
    """An IResNet variant, at width 1.

    Attributes:
        blocks: IR blocks per stage.
        channels: Output channels per stage (each stage halves the resolution).
        stem_channels: Channels of the stem convolution.
        activation: The non-linearity inside the blocks (and after the stem):
            `prelu` (InsightFace) or `relu` (sparse-embed's faceresnet).
        stem_norm: BN + activation after the stem convolution (InsightFace);
            faceresnet has none.
    """

    blocks: tuple[int, ...]
    channels: tuple[int, ...] = (64, 128, 256, 512)
    stem_channels: int = 64
    activation: str = "prelu"
    stem_norm: bool = True

    def __post_init__(self) -> None:
        if len(self.blocks) != len(self.channels) or min(self.blocks, default=0) < 1:
            raise ValueError(f"IResNetSpec needs one block count >= 1 per stage, got blocks "
                             f"{self.blocks} for channels {self.channels}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"IResNetSpec.activation must be one of {', '.join(ACTIVATIONS)}, "
                             f"got {self.activation!r}")

    @property
    def stride(self) -> int:
        """Total down-sampling factor of the network."""
        return 2 ** len(self.blocks)


IRESNET18 = IResNetSpec(blocks=(2, 2, 2, 2))
IRESNET34 = IResNetSpec(blocks=(3, 4, 6, 3))
IRESNET50 = IResNetSpec(blocks=(3, 4, 14, 3))
IRESNET100 = IResNetSpec(blocks=(3, 13, 30, 3))
FACERESNET = IResNetSpec(blocks=(3, 13, 30, 3), activation="relu", stem_norm=False)
# One block per stage and an eighth of the channels: ~0.1M parameters at
# 32x32 and d = 128, for tests.
IRESNET_TINY = IResNetSpec(blocks=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_channels=8)


def _activation(x: tf.Tensor, kind: str, name: str) -> tf.Tensor:
    if kind == "prelu":
        return prelu(x, name)
    return keras.layers.ReLU(name=name)(x)


def _conv(x: tf.Tensor, filters: int, kernel_size: int, strides: int, name: str) -> tf.Tensor:
    if strides > 1 and kernel_size > 1:
        # PyTorch's symmetric padding (see the module docstring).
        x = keras.layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
        padding = "valid"
    else:
        padding = "same"
    return keras.layers.Conv2D(filters, kernel_size, strides=strides, padding=padding,
                               use_bias=False, name=name)(x)


def _ir_block(x: tf.Tensor, channels: int, strides: int, activation: str, name: str) -> tf.Tensor:
    shortcut = x
    if strides != 1 or x.shape[-1] != channels:
        shortcut = _conv(x, channels, 1, strides, f"{name}_shortcut_conv")
        shortcut = batch_norm(f"{name}_shortcut_bn")(shortcut)
    y = batch_norm(f"{name}_bn1")(x)
    y = _conv(y, channels, 3, 1, f"{name}_conv1")
    y = batch_norm(f"{name}_bn2")(y)
    y = _activation(y, activation, f"{name}_{activation}")
    y = _conv(y, channels, 3, strides, f"{name}_conv2")
    y = batch_norm(f"{name}_bn3")(y)
    return keras.layers.Add(name=f"{name}_add")([shortcut, y])


def build_iresnet(spec: IResNetSpec, name: str, embedding_size: int, final_activation: str,
                  input_size: int, width: float, input_width: int = 0, dropout: float = 0.0,
                  se: bool = False) -> keras.Model:
    """Builds an IResNet from its stage table.

    Args:
        spec: The variant (`IRESNET50`, `FACERESNET`, ..., or your own).
        name: Model name.
        embedding_size: Embedding dimension d.
        final_activation: A name in `sparse_embed.models.embedding.ACTIVATIONS`.
        input_size: Input height, at least the total stride (16).
        width: Multiplier of every channel count (rounded to multiples of 8);
            1 is the published network.
        input_width: Input width; 0 means square.
        dropout: Dropout rate on the flattened features before the FC layer.
        se: Must be false: IResNet has no squeeze-and-excitation blocks.

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
    x = _conv(images, scale_channels(spec.stem_channels, width), 3, 1, "stem_conv")
    if spec.stem_norm:
        x = batch_norm("stem_bn")(x)
        x = _activation(x, spec.activation, f"stem_{spec.activation}")
    for i, (blocks, channels) in enumerate(zip(spec.blocks, spec.channels, strict=True), start=1):
        channels = scale_channels(channels, width)
        for j in range(1, blocks + 1):
            x = _ir_block(x, channels, 2 if j == 1 else 1, spec.activation, f"stage{i}_block{j}")
    x = batch_norm("output_bn")(x)
    embedding = embedding_block(x, embedding_size, final_activation, dropout=dropout)
    return keras.Model(images, embedding, name=name)


def _register(name: str, spec: IResNetSpec, default_size: int, default_embedding: int, doc: str) -> None:
    def builder(embedding_size: int = default_embedding, final_activation: str = "none",
                input_size: int = default_size, width: float = 1.0, input_width: int = 0,
                dropout: float = 0.0, se: bool = False) -> keras.Model:
        return build_iresnet(spec, name, embedding_size, final_activation, input_size, width,
                             input_width, dropout, se)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"""{doc}

    Args:
        embedding_size: Embedding dimension d.
        final_activation: `none` | `relu` | `soft_threshold`.
        input_size: Input height.
        width: Channel width multiplier (1 is the published network).
        input_width: Input width; 0 means square.
        dropout: Dropout rate before the FC layer ("E" output).
        se: Must be false (no squeeze-and-excitation blocks).
    """
    MODELS.register(name)(builder)


_register("iresnet18", IRESNET18, 112, 512, "IResNet-18 (InsightFace), 112x112, d = 512.")
_register("iresnet34", IRESNET34, 112, 512, "IResNet-34 (InsightFace), 112x112, d = 512.")
_register("iresnet50", IRESNET50, 112, 512, "IResNet-50 (InsightFace), 112x112, d = 512.")
_register("iresnet100", IRESNET100, 112, 512, "IResNet-100 (InsightFace), 112x112, d = 512.")
_register("faceresnet", FACERESNET, 112, 512,
          "The sparse-embed paper's face ResNet: IR units [3, 13, 30, 3] with ReLU, 112x112, d = 512.")
_register("iresnet_tiny", IRESNET_TINY, 32, 128,
          "IResNet with one block per stage and 8-64 channels, 32x32 input: for tests.")
