"""Network in Network (Lin et al., ICLR 2014) for 32x32 CIFAR-100, as in the
CIFAR-100 retrieval experiments of the sparse-embed paper (Paria et al.,
"Minimizing FLOPs to Learn Efficient Sparse Representations", ICLR 2020).

    input 32x32x3
    mlpconv: conv5x5 192, conv1x1 160, conv1x1 96; maxpool3x3/2, dropout  -> 16x16x96
    mlpconv: conv5x5 192, conv1x1 192, conv1x1 192; avgpool3x3/2, dropout -> 8x8x192
    mlpconv: conv3x3 192, linear conv1x1 192                              -> 8x8x192
    global average pool, ReLU                                             -> 192
    FC d (d = 64 in the paper)                                            -> the embedding (embedding.py)

Every convolution has a bias and a ReLU (the last one excepted: the ReLU
comes after the global pooling), and there is no batch norm inside the
network, as in the original code; the two dropouts (rate 0.5) are part of
the architecture. `model.dropout` adds one more, before the embedding layer,
as for every backbone. At 32x32 and d = 64 the network has 0.98M parameters
and 222M multiply-adds.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparse_embed.keras import keras, tf
from sparse_embed.models.common import check_common, check_input_shape, check_no_se, scale_channels
from sparse_embed.models.embedding import embedding_block
from sparse_embed.models.registry import MODELS

BLOCK_DROPOUT = 0.5


@dataclass(frozen=True)
class MlpConv:
    """One mlpconv block: a k x k convolution followed by 1x1 convolutions.

    Attributes:
        kernel_size: k, of the first convolution.
        channels: Output channels of each convolution, the k x k one first.
        pool: `max` | `avg` (3x3, stride 2, then dropout) or `none`.
    """

    kernel_size: int
    channels: tuple[int, ...]
    pool: str


@dataclass(frozen=True)
class NINSpec:
    """A Network-in-Network, at width 1.

    Attributes:
        blocks: The mlpconv blocks, in order; the last convolution of the
            last block is linear.
    """

    blocks: tuple[MlpConv, ...]

    @property
    def stride(self) -> int:
        """Total down-sampling factor of the network."""
        return 2 ** sum(block.pool != "none" for block in self.blocks)


NIN = NINSpec(blocks=(
    MlpConv(5, (192, 160, 96), "max"),
    MlpConv(5, (192, 192, 192), "avg"),
    MlpConv(3, (192, 192), "none"),
))
# A quarter of the channels and one 1x1 layer per block: ~60k parameters at 16x16, for tests.
NIN_TINY = NINSpec(blocks=(
    MlpConv(5, (48, 24), "max"),
    MlpConv(5, (48, 48), "avg"),
    MlpConv(3, (48, 48), "none"),
))

_POOLS = {"max": keras.layers.MaxPooling2D, "avg": keras.layers.AveragePooling2D}


def build_nin(spec: NINSpec, name: str, embedding_size: int, final_activation: str, input_size: int,
              width: float, input_width: int = 0, dropout: float = 0.0, se: bool = False) -> keras.Model:
    """Builds a Network-in-Network from its block table.

    Args:
        spec: The network (`NIN`, `NIN_TINY`, or your own).
        name: Model name.
        embedding_size: Embedding dimension d.
        final_activation: A name in `sparse_embed.models.embedding.ACTIVATIONS`.
        input_size: Input height, at least the total stride (4); 32 for CIFAR.
        width: Multiplier of every channel count (rounded to multiples of 8);
            1 is the published network.
        input_width: Input width; 0 means square.
        dropout: Dropout rate before the embedding layer (the blocks' own
            dropout is fixed at `BLOCK_DROPOUT`).
        se: Must be false: NIN has no squeeze-and-excitation blocks.

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
    x: tf.Tensor = images
    for i, block in enumerate(spec.blocks, start=1):
        for j, channels in enumerate(block.channels, start=1):
            last = i == len(spec.blocks) and j == len(block.channels)
            x = keras.layers.Conv2D(scale_channels(channels, width), block.kernel_size if j == 1 else 1,
                                    padding="same", activation=None if last else "relu",
                                    kernel_initializer="he_normal", name=f"block{i}_conv{j}")(x)
        if block.pool != "none":
            x = _POOLS[block.pool](3, strides=2, padding="same", name=f"block{i}_{block.pool}pool")(x)
            x = keras.layers.Dropout(BLOCK_DROPOUT, name=f"block{i}_dropout")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.ReLU(name="pool_relu")(x)
    embedding = embedding_block(x, embedding_size, final_activation, dropout=dropout)
    return keras.Model(images, embedding, name=name)


@MODELS.register("nin")
def nin(embedding_size: int = 64, final_activation: str = "none", input_size: int = 32,
        width: float = 1.0, input_width: int = 0, dropout: float = 0.0, se: bool = False) -> keras.Model:
    """Network in Network for 32x32 CIFAR-100, d = 64 (the sparse-embed CIFAR experiments).

    Args:
        embedding_size: Embedding dimension d.
        final_activation: `none` | `relu` | `soft_threshold`.
        input_size: Input height.
        width: Channel width multiplier (1 is the published network).
        input_width: Input width; 0 means square.
        dropout: Dropout rate before the embedding layer.
        se: Must be false (no squeeze-and-excitation blocks).
    """
    return build_nin(NIN, "nin", embedding_size, final_activation, input_size, width, input_width,
                     dropout, se)


@MODELS.register("nin_tiny")
def nin_tiny(embedding_size: int = 64, final_activation: str = "none", input_size: int = 16,
             width: float = 1.0, input_width: int = 0, dropout: float = 0.0, se: bool = False) -> keras.Model:
    """Network in Network with a quarter of the channels, 16x16 input: for tests.

    Args:
        embedding_size: Embedding dimension d.
        final_activation: `none` | `relu` | `soft_threshold`.
        input_size: Input height.
        width: Channel width multiplier.
        input_width: Input width; 0 means square.
        dropout: Dropout rate before the embedding layer.
        se: Must be false (no squeeze-and-excitation blocks).
    """
    return build_nin(NIN_TINY, "nin_tiny", embedding_size, final_activation, input_size, width,
                     input_width, dropout, se)
