"""Data: synthetic identities, TFRecord conversion, tf.data pipelines, verification pairs.

Importing this package is cheap: the TensorFlow-based modules (`tfrecord`,
`pipeline`, `augment`) are imported only by those who ask for them, so the
synthetic generator and the pairs reader run without TensorFlow.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from sparse_embed.errors import DataError


def format_summary(title: str, rows: Sequence[tuple[str, object]]) -> str:
    """Formats the closing summary of a long job as a two-column table.

    Args:
        title: First line of the table.
        rows: (name, value) pairs, printed in order.

    Returns:
        The table as a multi-line string (no trailing newline).
    """
    width = max((len(name) for name, _ in rows), default=0)
    lines = [title, "-" * max(len(title), width + 12)]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def add_writer_flags(parser: argparse.ArgumentParser, shards_help: str = "Number of shards."
                     ) -> None:
    """Adds the flags every TFRecord converter shares: --shards, --workers, --seed.

    Args:
        parser: The converter's parser.
        shards_help: Help text of --shards.
    """
    parser.add_argument("--shards", type=int, default=8, help=shards_help)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="Processes reading and checking images.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the example order.")


def image_folder(root: str | os.PathLike) -> tuple[list[str], list[int], list[str]]:
    """Lists a folder-per-class image tree.

    Every non-hidden file in a class folder is listed; whether it is an image is
    checked by the consumer. Classes are the sorted names of the sub-folders that
    contain files; files are sorted within each class.

    Args:
        root: Directory with one sub-folder per class.

    Returns:
        (paths, labels, class_names): label i is `class_names[i]`.

    Raises:
        DataError: If `root` is missing or holds no class folder with files.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"image folder {root} does not exist; pass a directory with one folder per class"
        )
    paths: list[str] = []
    labels: list[int] = []
    class_names: list[str] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
        if not files:
            continue
        paths += [str(f) for f in files]
        labels += [len(class_names)] * len(files)
        class_names.append(folder.name)
    if not paths:
        raise DataError(
            f"image folder {root} has no class sub-folders with files; "
            f"expected <root>/<class>/<image>"
        )
    return paths, labels, class_names
