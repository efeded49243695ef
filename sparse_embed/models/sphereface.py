"""SphereFace-20: Liu et al., "SphereFace: Deep Hypersphere Embedding for Face
Recognition" (CVPR 2017), Table 2, the 20-layer CNN of its Caffe release.

    input 112x96x3
    conv3x3, 64, stride 2, PReLU    + 1 residual unit   -> 56x48x64
    conv3x3, 128, stride 2, PReLU   + 2 residual units  -> 28x24x128
    conv3x3, 256, stride 2, PReLU   + 4 residual units  -> 14x12x256
    conv3x3, 512, stride 2, PReLU   + 1 residual unit   -> 7x6x512
    FC 512                                              -> the embedding (embedding.py)

A residual unit is x + PReLU(conv3x3(PReLU(conv3x3(x)))), with no activation
after the addition. There is no batch norm inside the network. As in the
released prototxt, the strided convolutions have a bias and Xavier
initialisation, the residual convolutions Gaussian(0.01) weights and no bias
(the release freezes theirs at zero with lr_mult 0), and every PReLU learns
one slope per channel. Strided convolutions pad one pixel on every side, as
Caffe's pad=1 does.

The FC layer takes the flattened 7x6x512 map, so the input size is part of
the architecture: SphereFace-20 takes 112x96 (the paper's crops) or 112x112
(the InsightFace crops the rest of this project aligns to), and nothing else.

Size at 112x96 and d = 512: 22.67M parameters (our embedding layer adds a
1024-parameter batch norm after the FC) and 1.75G multiply-adds. The MLPerf
edge benchmark lists 21.6M parameters and 1.75 GMACs; 21.6M is this count in
units of 2^20 (22.67e6 / 2^20 = 21.6), within 5% of it in either unit.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparse_embed.errors import ConfigError
from sparse_embed.keras import keras, tf
from sparse_embed.models.common import check_common, check_no_se, prelu, scale_channels
from sparse_embed.models.embedding import embedding_block
from sparse_embed.models.registry import MODELS

RESIDUAL_STDDEV = 0.01


@dataclass(frozen=True)
class SphereFaceSpec:
    """A SphereFace network, at width 1.

    Attributes:
        units: Residual units per stage.
        channels: Channels per stage.
        sizes: The (height, width) inputs the network takes.
    """

    units: tuple[int, ...]
    channels: tuple[int, ...]
    sizes: tuple[tuple[int, int], ...]


SPHEREFACE20 = SphereFaceSpec(units=(1, 2, 4, 1), channels=(64, 128, 256, 512),
                              sizes=((112, 96), (112, 112)))
# One unit per stage, an eighth of the channels and a quarter of the
# resolution: ~0.16M parameters at d = 128, for tests.
SPHEREFACE20_TINY = SphereFaceSpec(units=(1, 1, 1, 1), channels=(8, 16, 32, 64),
                                   sizes=((28, 24), (28, 28)))


def _sizes(spec: SphereFaceSpec) -> str:
    return ", ".join(f"{h}x{w} (input_size={h}, input_width={w})" for h, w in spec.sizes)


def build_sphereface(spec: SphereFaceSpec, name: str, embedding_size: int, final_activation: str,
                     input_size: int, width: float, input_width: int = 0, dropout: float = 0.0,
                     se: bool = False) -> keras.Model:
    """Builds a SphereFace network from its stage table.

    Args:
        spec: The network (`SPHEREFACE20`, `SPHEREFACE20_TINY`, or your own).
        name: Model name.
        embedding_size: Embedding dimension d.
        final_activation: A name in `sparse_embed.models.embedding.ACTIVATIONS`.
        input_size: Input height; (input_size, input_width) must be one of `spec.sizes`.
        width: Multiplier of every channel count (rounded to multiples of 8);
            1 is the published network.
        input_width: Input width; 0 means square.
        dropout: Dropout rate before the FC layer.
        se: Must be false: SphereFace has no squeeze-and-excitation blocks.

    Returns:
        A functional model float32 [B, input_size, input_width, 3] in [-1, 1] ->
        float32 [B, embedding_size], the embedding after the final activation.

    Raises:
        ConfigError: If the input size is not one the network takes, another
            argument is out of range, `se` is true or `final_activation` is unknown.
    """
    shape = (input_size, input_width or input_size)
    if shape not in spec.sizes:
        raise ConfigError(f"{name} takes {_sizes(spec)}; got model.input_size={input_size!r}, "
                          f"model.input_width={input_width!r}")
    check_common(embedding_size, final_activation, width, dropout)
    check_no_se(name, se)

    images = keras.Input(shape=(*shape, 3), dtype="float32", name="images")
    x = images
    for i, (units, channels) in enumerate(zip(spec.units, spec.channels, strict=True), start=1):
        channels = scale_channels(channels, width)
        x = keras.layers.ZeroPadding2D(1, name=f"conv{i}_1_pad")(x)
        x = keras.layers.Conv2D(channels, 3, strides=2, padding="valid",
                                kernel_initializer="glorot_uniform", name=f"conv{i}_1")(x)
        x = prelu(x, f"conv{i}_1_prelu")
        for j in range(units):
            y: tf.Tensor = x
            for k in (2 * j + 2, 2 * j + 3):
                y = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False,
                                        kernel_initializer=keras.initializers.RandomNormal(
                                            stddev=RESIDUAL_STDDEV),
                                        name=f"conv{i}_{k}")(y)
                y = prelu(y, f"conv{i}_{k}_prelu")
            x = keras.layers.Add(name=f"res{i}_{2 * j + 3}")([x, y])
    embedding = embedding_block(x, embedding_size, final_activation, dropout=dropout)
    return keras.Model(images, embedding, name=name)


@MODELS.register("sphereface20")
def sphereface20(embedding_size: int = 512, final_activation: str = "none", input_size: int = 112,
                 width: float = 1.0, input_width: int = 96, dropout: float = 0.0,
                 se: bool = False) -> keras.Model:
    """SphereFace-20 (Liu et al., 2017), 112x96 or 112x112, d = 512.

    Args:
        embedding_size: Embedding dimension d.
        final_activation: `none` | `relu` | `soft_threshold`.
        input_size: Input height (112).
        width: Channel width multiplier (1 is the published network).
        input_width: Input width: 96 (the paper) or 112; 0 means square.
        dropout: Dropout rate before the FC layer.
        se: Must be false (no squeeze-and-excitation blocks).
    """
    return build_sphereface(SPHEREFACE20, "sphereface20", embedding_size, final_activation,
                            input_size, width, input_width, dropout, se)


@MODELS.register("sphereface20_tiny")
def sphereface20_tiny(embedding_size: int = 128, final_activation: str = "none", input_size: int = 28,
                      width: float = 1.0, input_width: int = 24, dropout: float = 0.0,
                      se: bool = False) -> keras.Model:
    """SphereFace-20 with one unit per stage and 8-64 channels, 28x24 input: for tests.

    Args:
        embedding_size: Embedding dimension d.
        final_activation: `none` | `relu` | `soft_threshold`.
        input_size: Input height (28).
        width: Channel width multiplier.
        input_width: Input width: 24 or 28; 0 means square.
        dropout: Dropout rate before the FC layer.
        se: Must be false (no squeeze-and-excitation blocks).
    """
    return build_sphereface(SPHEREFACE20_TINY, "sphereface20_tiny", embedding_size,
                            final_activation, input_size, width, input_width, dropout, se)
