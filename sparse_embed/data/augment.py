"""Training-time image augmentations, built on stateless random ops.

`AUGMENTATIONS` names the policies a config picks with `data.augmentation`:
`full` (flip, scale/crop, colour jitter, on float32) and `flip` (mirror only,
on uint8; `to_model_input` scales those batches in the train step).

Every function takes one image (float32 [H, W, 3] in [-1, 1]) and a seed
(int [2]); the same seed gives the same result eagerly and inside
`tf.data.Dataset.map`, which makes the input pipeline reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sparse_embed.keras import tf
from sparse_embed.registry import Registry

MAX_SCALE = 1.15
BRIGHTNESS = 0.125
CONTRAST = 0.2
SATURATION = 0.2


def _split(seed: tf.Tensor, num: int) -> tf.Tensor:
    return tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=num)


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Mirrors the image left-right with probability 1/2.

    Args:
        image: float32 [H, W, 3].
        seed: int [2].
    """
    return tf.image.stateless_random_flip_left_right(image, seed)


def random_scale_crop(image: tf.Tensor, seed: tf.Tensor, max_scale: float = MAX_SCALE) -> tf.Tensor:
    """Zooms in by a random factor in [1, max_scale], crops the input size at a random offset.

    Args:
        image: float32 [H, W, 3].
        seed: int [2].
        max_scale: Largest zoom factor; 1 returns the image unchanged.

    Raises:
        ValueError: If `max_scale` < 1.
    """
    if max_scale < 1.0:
        raise ValueError(f"max_scale must be >= 1, got {max_scale}")
    if max_scale == 1.0:
        return image
    scale_seed, crop_seed = tf.unstack(_split(seed, 2))
    shape = tf.shape(image)
    scale = tf.random.stateless_uniform([], scale_seed, 1.0, max_scale)
    size = tf.cast(tf.round(tf.cast(shape[:2], tf.float32) * scale), tf.int32)
    zoomed = tf.image.resize(image, size, method="bilinear")
    cropped = tf.image.stateless_random_crop(zoomed, shape, crop_seed)
    return tf.ensure_shape(cropped, image.shape)


def color_jitter(
    image: tf.Tensor,
    seed: tf.Tensor,
    brightness: float = BRIGHTNESS,
    contrast: float = CONTRAST,
    saturation: float = SATURATION,
) -> tf.Tensor:
    """Random brightness shift, contrast and saturation factors; 0 disables each.

    Args:
        image: float32 [H, W, 3] in [-1, 1].
        seed: int [2].
        brightness: Largest brightness shift, as a fraction of the value range.
        contrast: Contrast factor drawn from [1 - contrast, 1 + contrast].
        saturation: Saturation factor drawn from [1 - saturation, 1 + saturation].

    Returns:
        The jittered image, clipped to [-1, 1].

    Raises:
        ValueError: If a strength is negative or `contrast` / `saturation` >= 1.
    """
    if brightness < 0 or not 0 <= contrast < 1 or not 0 <= saturation < 1:
        raise ValueError(
            f"need brightness >= 0 and contrast, saturation in [0, 1); got "
            f"{brightness}, {contrast}, {saturation}"
        )
    seeds = tf.unstack(_split(seed, 3))
    # The colour ops assume [0, 1] (saturation goes through HSV).
    x = (image + 1.0) / 2.0
    if brightness:
        x = tf.image.stateless_random_brightness(x, brightness, seeds[0])
    if contrast:
        x = tf.image.stateless_random_contrast(x, 1.0 - contrast, 1.0 + contrast, seeds[1])
    if saturation:
        x = tf.image.stateless_random_saturation(
            tf.clip_by_value(x, 0.0, 1.0), 1.0 - saturation, 1.0 + saturation, seeds[2]
        )
    return tf.clip_by_value(x * 2.0 - 1.0, -1.0, 1.0)


def augment(
    image: tf.Tensor,
    seed: tf.Tensor,
    *,
    flip: bool = True,
    max_scale: float = MAX_SCALE,
    brightness: float = BRIGHTNESS,
    contrast: float = CONTRAST,
    saturation: float = SATURATION,
) -> tf.Tensor:
    """The training augmentation: flip, scale/crop, colour jitter.

    Args:
        image: float32 [H, W, 3] in [-1, 1].
        seed: int [2]; the result is a pure function of image and seed.
        flip: Random horizontal flip (faces are roughly symmetric).
        max_scale: Largest zoom of the random scale/crop; 1 disables it.
        brightness: See `color_jitter`.
        contrast: See `color_jitter`.
        saturation: See `color_jitter`.

    Returns:
        float32 [H, W, 3] in [-1, 1].
    """
    flip_seed, crop_seed, color_seed = tf.unstack(_split(seed, 3))
    if flip:
        image = random_flip(image, flip_seed)
    image = random_scale_crop(image, crop_seed, max_scale)
    return color_jitter(image, color_seed, brightness, contrast, saturation)


def _mix(seed: int, index: tf.Tensor) -> tf.Tensor:
    """A 64-bit hash of (seed, example index), vectorised (splitmix64's finaliser)."""
    x = tf.cast(index, tf.int64) + tf.constant(seed, tf.int64)
    # Integer products wrap modulo 2^64, which is what the finaliser relies on.
    x = x * tf.constant(-7046029254386353131, tf.int64)  # 0x9E3779B97F4A7C15
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 30))
    x = x * tf.constant(-4658895280553007687, tf.int64)  # 0xBF58476D1CE4E5B9
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 27))
    x = x * tf.constant(-7723592293110705685, tf.int64)  # 0x94D049BB133111EB
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 31))


def random_flip_uint8(image: tf.Tensor, index: tf.Tensor, seed: int) -> tf.Tensor:
    """Mirrors a uint8 image left-right with probability 1/2.

    Whether example `index` is mirrored depends only on (seed, index), so a
    resumed stream mirrors the same examples.

    Args:
        image: uint8 [H, W, 3].
        index: int64 scalar, the example's stream position.
        seed: The worker's seed.
    """
    mirror = tf.equal(tf.bitwise.bitwise_and(tf.bitwise.right_shift(_mix(seed, index), 40), 1), 1)
    return tf.cond(mirror, lambda: tf.reverse(image, [1]), lambda: image)


def to_model_input(images: tf.Tensor) -> tf.Tensor:
    """Scales uint8 pixels to the models' float32 [-1, 1]; float32 images pass through.

    The `flip` policy hands batches over as uint8 (a quarter of the bytes to
    move to the device); the train step scales them there.

    Args:
        images: uint8 [B, H, W, 3] in [0, 255], or float32 [B, H, W, 3] in [-1, 1].
    """
    if images.dtype == tf.uint8:
        return tf.cast(images, tf.float32) / 127.5 - 1.0
    return images


@dataclass(frozen=True)
class Augmentation:
    """A training augmentation policy; at most one of the two functions is set.

    Attributes:
        per_example: (float32 image [H, W, 3] in [-1, 1], seed int [2]) -> image;
            the pipeline yields float32 batches.
        per_uint8: (uint8 image [H, W, 3], int64 stream position, worker seed)
            -> uint8 image; the pipeline yields uint8 batches, which
            `to_model_input` scales in the train step.
    """

    per_example: Callable[[tf.Tensor, tf.Tensor], tf.Tensor] | None = None
    per_uint8: Callable[[tf.Tensor, tf.Tensor, int], tf.Tensor] | None = None


AUGMENTATIONS: Registry[Augmentation] = Registry("augmentation")
AUGMENTATIONS.register("full")(Augmentation(per_example=augment))
# The insightface recipe for large face sets: mirror only. On uint8 pixels, with
# the scaling left to the device, it keeps the input pipeline near the raw JPEG
# decode rate (benchmarks/pipeline_bench.py).
AUGMENTATIONS.register("flip")(Augmentation(per_uint8=random_flip_uint8))
