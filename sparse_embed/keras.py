"""The one place TensorFlow and Keras are imported.

The project uses Keras 2 (`tf_keras`) everywhere because TF Model Optimization
(quantization-aware training, pruning) only supports Keras 2. Every other
module does `from sparse_embed.keras import keras, tf`.

Importing TensorFlow prints 6-12 lines from its C++ runtime (oneDNN, CUDA
probing, CPU features) before it reads any setting, so `TF_CPP_MIN_LOG_LEVEL`
cannot silence them. They go to a temporary file instead, and reach the
terminal only if the import fails or `SPARSE_EMBED_TF_LOGS=1` asks for them.
"""

import logging
import os
import sys

from absl import logging as absl_logging

from sparse_embed.fileio import native_stderr_to_file

# Route `tf.keras` to Keras 2 as well, so TensorFlow internals and TF-MOT agree
# with the layers built here. Must be set before TensorFlow is imported.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
_SHOW_LOGS = os.environ.get("SPARSE_EMBED_TF_LOGS", "") not in ("", "0")
if not _SHOW_LOGS:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _import_quietly() -> None:
    """Imports TensorFlow with file descriptor 2 pointed at a temporary file."""
    with native_stderr_to_file():
        import tensorflow

        # The CUDA probe ("failed call to cuInit") runs at the first device
        # query, not at import; make it happen here. Listing physical
        # devices leaves set_visible_devices (one GPU per Horovod rank) possible.
        tensorflow.config.list_physical_devices()


if not _SHOW_LOGS and "tensorflow" not in sys.modules:
    _import_quietly()

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

if not _SHOW_LOGS:
    # Python-side INFO lines (checkpoint sharding times, dataset hints) are for
    # TensorFlow's developers; warnings still come through. TensorFlow logs
    # through absl (whose logging the entry points keep; their flags are argparse).
    absl_logging.set_verbosity(absl_logging.WARNING)
    tf.get_logger().setLevel(logging.WARNING)
    tf.autograph.set_verbosity(0)



def silence_warnings() -> None:
    """Silences TensorFlow's Python warnings from here on (errors still show).

    For a process that is about to exit with an error of its own, whose
    leftovers would otherwise warn about the same failure at shutdown.
    """
    absl_logging.set_verbosity(absl_logging.ERROR)
    tf.get_logger().setLevel(logging.ERROR)


__all__ = ["keras", "silence_warnings", "tf"]
