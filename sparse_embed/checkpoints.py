"""The checkpoint layout of a run directory, shared by training and embedding.

A run keeps its checkpoints in `<model_dir>/checkpoints` (`CHECKPOINT_DIR`).
Those are the chief's, the ones `embed`, `evaluate` and `export` read: the
backbone is the same on every worker. With a sharded head, each other worker
keeps its own class centres and optimizer slots in
`checkpoints/worker-<r>-of-<N>` (`worker_dir`), and the head records how many
blocks its classes were cut into (`SHARDS_KEY`), so that a resume with another
number of workers can cut them again.

A checkpoint object (`checkpoint_for`) holds `backbone`, and while training
also `head`, `optimizer` and `samples`: a backbone-only checkpoint restores
from a training one.

This module imports nothing of the project but Keras: the trainer, its
callbacks and `sparse_embed.inference` all read and write this layout, and
none of them has to import another to do so.
"""

from __future__ import annotations

import os
from pathlib import Path

from sparse_embed.keras import keras, tf

CHECKPOINT_DIR = "checkpoints"
# What `tf.train.load_checkpoint` appends to an object's path to name its value.
_VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


def variable_key(path: str) -> str:
    """The key under which a checkpoint reader finds a saved variable.

    Args:
        path: The variable's path in the checkpoint object, e.g. `head/kernel`
            or `optimizer/_iterations`.

    Returns:
        The key for `tf.train.load_checkpoint(...).get_tensor`.
    """
    return f"{path}{_VALUE_SUFFIX}"


# The number of blocks a sharded head's classes were split into when it was saved.
SHARDS_KEY = variable_key("head/shards")


def checkpoint_for(backbone: keras.Model, head: keras.layers.Layer | None = None,
                   optimizer: keras.optimizers.Optimizer | None = None,
                   samples: tf.Variable | None = None) -> tf.train.Checkpoint:
    """Returns the checkpoint object layout shared by training and embedding.

    Args:
        backbone: The embedding network.
        head: The training head, omitted when only embedding.
        optimizer: The optimizer (its `iterations` is the global step), omitted when only embedding.
        samples: The count of training examples consumed, omitted when only embedding.
    """
    parts = {"backbone": backbone, "head": head, "optimizer": optimizer, "samples": samples}
    return tf.train.Checkpoint(**{k: v for k, v in parts.items() if v is not None})


def worker_dir(root: str | os.PathLike, worker_index: int, num_workers: int) -> Path:
    """Where a worker other than the chief keeps its checkpoints of a sharded head.

    Args:
        root: The run's checkpoint directory (`<model_dir>/checkpoints`).
        worker_index: The worker's rank, 1 .. num_workers - 1.
        num_workers: The number of workers the head is sharded over.
    """
    return Path(root) / f"worker-{worker_index}-of-{num_workers}"


def saved_shards(model_dir: str | os.PathLike) -> int | None:
    """The number of blocks the latest checkpoint's sharded head was split into.

    Args:
        model_dir: The run directory.

    Returns:
        The number of blocks, or None when there is no checkpoint or its head is not sharded.
    """
    latest = tf.train.latest_checkpoint(str(Path(model_dir) / CHECKPOINT_DIR))
    if latest is None:
        return None
    reader = tf.train.load_checkpoint(latest)
    if SHARDS_KEY not in reader.get_variable_to_shape_map():
        return None
    return int(reader.get_tensor(SHARDS_KEY))
