"""The one place Keras is imported.

The project uses Keras 2 (`tf_keras`) everywhere because TF Model Optimization
(quantization-aware training, pruning) only supports Keras 2. Every other
module does `from sparse_embed.keras import keras`.
"""

import os

# Route `tf.keras` to Keras 2 as well, so TensorFlow internals and TF-MOT agree
# with the layers built here. Must be set before TensorFlow is imported.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tf_keras as keras  # noqa: E402

__all__ = ["keras"]
