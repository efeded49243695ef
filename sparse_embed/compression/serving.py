"""The serving function every export format starts from: images -> embedding.

float32 NHWC RGB images in [-1, 1] at the run's `model.input_shape`, any
batch size, named `images` -> the embedding (not L2-normalised), named
`embedding`. With `flip_concat` the MLPerf face protocol's test-time flip is
part of the graph: the output is `concat(e(x), e(flip(x)))`, [B, 2d].
"""

from __future__ import annotations

from sparse_embed.keras import keras, tf

INPUT_NAME = "images"
OUTPUT_NAME = "embedding"


def serving_function(model: keras.Model, flip_concat: bool = False) -> tf.types.experimental.GenericFunction:
    """The function every format exports: images -> {"embedding": ...}.

    Args:
        model: A backbone, images -> embeddings (pruning wrappers already stripped).
        flip_concat: Output `concat(e(x), e(flip(x)))` (MLPerf's test-time flip) instead of e(x).

    Returns:
        A `tf.function` with input signature float32 [None, H, W, 3] named `images`.
    """
    shape = [None, *model.input_shape[1:]]

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, name=INPUT_NAME)])
    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        embedding = model(images, training=False)
        if flip_concat:
            # Width is axis 2 of NHWC: the mirror image, as tf.image.flip_left_right.
            mirrored = model(tf.reverse(images, axis=[2]), training=False)
            embedding = tf.concat([embedding, mirrored], axis=-1)
        return {OUTPUT_NAME: embedding}

    return serve
