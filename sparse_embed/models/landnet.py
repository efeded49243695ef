"""Landnet: five facial landmarks from a face crop, Open Model Zoo's landmarks-regression-retail-0009.

The landmark network of the OpenVINO face recognition toolkit
(training_extensions' `LandmarksNet`), as its model card describes it:

    input 48x48x3 RGB in [0, 1] -> BatchNorm (on the raw input)
    conv3x3 16  -> PReLU -> BN -> maxpool 2   24x24
    conv3x3 32  -> PReLU -> BN -> maxpool 2   12x12
    conv3x3 64  -> PReLU -> BN -> maxpool 2    6x6
    conv3x3 64  -> PReLU -> BN                 6x6
    conv3x3 128 -> PReLU -> BN                 6x6x128
    depthwise conv6x6 -> PReLU -> BN           1x1x128
    conv1x1 256 -> PReLU -> BN
    conv1x1 64  -> PReLU
    conv1x1 10  -> sigmoid                     (x, y) of five points in [0, 1]

Every PReLU has one slope shared by all its channels. The ten outputs are
x1, y1, ..., x5, y5 in crop coordinates divided by the crop's width and
height, in `LANDMARK_NAMES` order (image-left eye, image-right eye, nose tip,
image-left and image-right mouth corner), the order of MTCNN's points.

At 48x48 the network has 190,616 parameters (batch-norm moving statistics
excluded) and 10,339,456 multiply-adds, `python -m sparse_embed.models
landnet`; the card's 0.191M parameters and 0.021 GFLOPs are the same
network: a GFLOP counts a multiply and an add as two operations, so
0.021 GFLOPs is about 10.3M multiply-adds.

Landmark networks are their own family, `LANDMARK_MODELS` (registry.py): they
map images to points, not to embeddings, so they do not take the embedding
builders' arguments.
"""

from __future__ import annotations

from sparse_embed.errors import ConfigError
from sparse_embed.keras import keras
from sparse_embed.models.registry import LANDMARK_MODELS

NUM_POINTS = 5
INPUT_SIZE = 48
# Channels of the five 3x3 blocks, and how many of them are followed by a 2x2 max-pool.
BLOCK_CHANNELS = (16, 32, 64, 64, 128)
POOLED_BLOCKS = 3
HEAD_CHANNELS = (256, 64)


def _prelu(name: str) -> keras.layers.PReLU:
    # One slope for the whole tensor, as the reference's nn.PReLU() (num_parameters=1).
    return keras.layers.PReLU(shared_axes=[1, 2, 3], name=name)


@LANDMARK_MODELS.register("landnet")
def landnet(input_size: int = INPUT_SIZE) -> keras.Model:
    """Builds Landnet (landmarks-regression-retail-0009).

    Args:
        input_size: Side of the square RGB input in pixels; a multiple of 8, at
            least 8 (the last feature map, input_size / 8 on a side, is reduced
            to 1x1 by a depthwise convolution of that size). 48 is the
            published network.

    Returns:
        A functional model named `landnet`, float32 [B, input_size, input_size, 3]
        in [0, 1] -> float32 [B, 10] in [0, 1]: x1, y1, ..., x5, y5 over the
        crop's width and height.

    Raises:
        ConfigError: If `input_size` is not a positive multiple of 8.
    """
    if input_size < 8 or input_size % 8:
        raise ConfigError(f"landnet takes a square input whose side is a multiple of 8 (48 published); "
                          f"got input_size={input_size}")
    images = keras.Input((input_size, input_size, 3), name="images")
    x = keras.layers.BatchNormalization(name="input_bn")(images)
    for i, channels in enumerate(BLOCK_CHANNELS, start=1):
        x = keras.layers.Conv2D(channels, 3, padding="same", name=f"conv{i}")(x)
        x = _prelu(f"conv{i}_prelu")(x)
        x = keras.layers.BatchNormalization(name=f"conv{i}_bn")(x)
        if i <= POOLED_BLOCKS:
            x = keras.layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = keras.layers.DepthwiseConv2D(input_size // 2**POOLED_BLOCKS, name="reduce")(x)
    x = _prelu("reduce_prelu")(x)
    x = keras.layers.BatchNormalization(name="reduce_bn")(x)
    x = keras.layers.Conv2D(HEAD_CHANNELS[0], 1, name="fc1")(x)
    x = _prelu("fc1_prelu")(x)
    x = keras.layers.BatchNormalization(name="fc1_bn")(x)
    x = keras.layers.Conv2D(HEAD_CHANNELS[1], 1, name="fc2")(x)
    x = _prelu("fc2_prelu")(x)
    x = keras.layers.Conv2D(2 * NUM_POINTS, 1, name="points")(x)
    # A separate layer, so quantization-aware training fake-quantizes the conv output first.
    x = keras.layers.Activation("sigmoid", name="points_sigmoid")(x)
    points = keras.layers.Flatten(name="landmarks")(x)
    return keras.Model(images, points, name="landnet")
