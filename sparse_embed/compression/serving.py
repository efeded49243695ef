"""The serving function every export format starts from: images -> embedding (and confidence).

float32 NHWC RGB images in [-1, 1] at the run's `model.input_shape`, any
batch size, named `images` -> the embedding (not L2-normalised), named
`embedding`. With `flip_concat` the MLPerf face protocol's test-time flip is
part of the graph: the output is `concat(e(x), e(flip(x)))`, [B, 2d].

A probabilistic run (a distribution with a confidence) has a second output,
`confidence`, float32 [B] (higher: surer), and its `embedding` is the mean
part of the parameter vector `[mean | extra]`. Both are plain ops every
format converts: the confidence is -mean log sigma^2 (Gaussian) or log kappa
(vMF), read from the extra head's output through the parametrization, with
no Bessel function; the vMF's expectation A_D(kappa) mu, which needs one, is
not exported, as its direction is the mean part's (the embedding is used
L2-normalised). With `flip_concat` the confidence is the smaller of the two
views' confidences.
"""

from __future__ import annotations

from sparse_embed.distributions import Distribution
from sparse_embed.keras import keras, tf

INPUT_NAME = "images"
OUTPUT_NAME = "embedding"
CONFIDENCE_NAME = "confidence"


def serving_function(model: keras.Model, flip_concat: bool = False,
                     distribution: Distribution | None = None) -> tf.types.experimental.GenericFunction:
    """The function every format exports: images -> {"embedding": ...[, "confidence": ...]}.

    Args:
        model: A backbone, images -> embeddings or parameter vectors (pruning wrappers already stripped).
        flip_concat: Output `concat(e(x), e(flip(x)))` (MLPerf's test-time flip) instead of e(x).
        distribution: The run's distribution; one with a confidence (not `dirac`)
            adds the `confidence` output and takes the mean part as the embedding.

    Returns:
        A `tf.function` with input signature float32 [None, H, W, 3] named `images`.
    """
    shape = [None, *model.input_shape[1:]]
    probabilistic = distribution is not None and distribution.has_confidence

    def outputs(images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor | None]:
        parameters = model(images, training=False)
        if not probabilistic:
            return parameters, None
        return parameters[:, :distribution.dim], tf.cast(distribution.confidence(parameters), tf.float32)

    # No AutoGraph: the branches are on Python values, and converting the model's calls costs seconds.
    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, name=INPUT_NAME)], autograph=False)
    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        embedding, confidence = outputs(images)
        if flip_concat:
            # Width is axis 2 of NHWC: the mirror image, as tf.image.flip_left_right.
            mirrored, mirrored_confidence = outputs(tf.reverse(images, axis=[2]))
            embedding = tf.concat([embedding, mirrored], axis=-1)
            if confidence is not None:
                confidence = tf.minimum(confidence, mirrored_confidence)
        if confidence is None:
            return {OUTPUT_NAME: embedding}
        return {OUTPUT_NAME: embedding, CONFIDENCE_NAME: confidence}

    return serve
