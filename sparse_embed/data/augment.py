"""Training-time image augmentations, built on stateless random ops.

Every function takes one image (float32 [H, W, 3] in [-1, 1]) and a seed
(int [2]); the same seed gives the same result eagerly and inside
`tf.data.Dataset.map`, which makes the input pipeline reproducible.
"""

from __future__ import annotations

from sparse_embed.keras import tf

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
