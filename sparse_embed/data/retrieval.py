"""The metric-learning retrieval benchmarks in their published layouts, standard open-set splits.

    python -m sparse_embed.preprocessing.build_retrieval_tfrecords --dataset=cub --root=CUB_200_2011 \
        --output=data/cub

| dataset | files read (relative to --root) | splits |
|---|---|---|
| `cub` (CUB-200-2011) | `images.txt`, `image_class_labels.txt`, `images/` | classes 1-100 / 101-200 |
| `cars` (Cars196) | `cars_annos.mat` (scipy), `car_ims/` | classes 1-98 / 99-196 |
| `sop` (Stanford Online Products) | `Ebay_train.txt`, `Ebay_test.txt` | train, test |
| `inshop` (In-shop Clothes) | `list_eval_partition.txt`, `img/` | train, query, gallery |

The training split goes to `<output>/tfrecords/` (where the packaged configs
look for it); every other split to `<output>/<split>/`. Each directory gets its
own `labels.txt`: the splits are open-set, their classes do not overlap.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from sparse_embed.errors import DataError
from sparse_embed.registry import Registry

# split -> (image paths, class name of each image)
Splits = dict[str, tuple[list[str], list[str]]]
DATASETS: Registry[Callable[[Path], Splits]] = Registry("retrieval dataset")


def _lines(path: Path, fields: int, skip: int = 0) -> list[list[str]]:
    """The whitespace-split lines of a list file, each checked to have `fields` fields."""
    if not path.is_file():
        raise DataError(f"{path} not found; --root must be the dataset's top folder")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines()[skip:], start=skip + 1):
        if not line.strip():
            continue
        tokens = line.split()
        if len(tokens) != fields:
            raise DataError(f"{path}:{lineno}: expected {fields} fields, got {line.strip()!r}")
        rows.append(tokens)
    if not rows:
        raise DataError(f"{path} lists no images")
    return rows


def _split_by_class(root: Path, paths: list[str], classes: list[int], last_train: int) -> Splits:
    splits: Splits = {"train": ([], []), "test": ([], [])}
    for path, label in zip(paths, classes, strict=True):
        split = "train" if label <= last_train else "test"
        splits[split][0].append(str(root / path))
        splits[split][1].append(str(label))
    return splits


@DATASETS.register("cub")
def cub(root: Path) -> Splits:
    """CUB-200-2011: `images.txt` (id path) and `image_class_labels.txt` (id class).

    Args:
        root: The `CUB_200_2011` folder.
    """
    paths = {i: p for i, p in _lines(root / "images.txt", 2)}
    labels = {i: c for i, c in _lines(root / "image_class_labels.txt", 2)}
    if paths.keys() != labels.keys():
        raise DataError(f"{root}: images.txt and image_class_labels.txt list different image ids")
    ids = sorted(paths, key=int)
    return _split_by_class(root / "images", [paths[i] for i in ids],
                           [int(labels[i]) for i in ids], last_train=100)


@DATASETS.register("cars")
def cars(root: Path) -> Splits:
    """Cars196: the `annotations` of `cars_annos.mat` (relative_im_path, class).

    Args:
        root: The folder holding `cars_annos.mat` and `car_ims/`.
    """
    import scipy.io

    path = root / "cars_annos.mat"
    if not path.is_file():
        raise DataError(f"{path} not found; --root must hold cars_annos.mat and car_ims/")
    try:
        annotations = scipy.io.loadmat(str(path), squeeze_me=True)["annotations"]
        rows = [(str(a["relative_im_path"]), int(a["class"])) for a in annotations]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise DataError(f"{path} is not the Cars196 annotation file: "
                        f"{' '.join(str(e).split())}") from e
    return _split_by_class(root, [p for p, _ in rows], [c for _, c in rows], last_train=98)


@DATASETS.register("sop")
def sop(root: Path) -> Splits:
    """Stanford Online Products: `Ebay_{train,test}.txt` (image_id class_id super_class_id path).

    Args:
        root: The `Stanford_Online_Products` folder.
    """
    splits: Splits = {}
    for split in ("train", "test"):
        rows = _lines(root / f"Ebay_{split}.txt", 4, skip=1)
        splits[split] = ([str(root / r[3]) for r in rows], [r[1] for r in rows])
    return splits


@DATASETS.register("inshop")
def inshop(root: Path) -> Splits:
    """In-shop Clothes Retrieval: `list_eval_partition.txt` (image_name item_id evaluation_status).

    Args:
        root: The folder holding `list_eval_partition.txt` and `img/`.
    """
    splits: Splits = {"train": ([], []), "query": ([], []), "gallery": ([], [])}
    path = root / "list_eval_partition.txt"
    # Line 1: the image count; line 2: the column names.
    for name, item, status in _lines(path, 3, skip=2):
        if status not in splits:
            raise DataError(f"{path}: unknown evaluation_status {status!r}; expected "
                            f"train, query or gallery")
        splits[status][0].append(str(root / name))
        splits[status][1].append(item)
    return splits


def split_dir(output: str | os.PathLike, split: str) -> Path:
    """Where a split's TFRecords go: `tfrecords/` for training, `<split>/` otherwise.

    Args:
        output: The output directory.
        split: The split's name.
    """
    return Path(output) / ("tfrecords" if split == "train" else split)


def write_retrieval_tfrecords(dataset: str, root: str | os.PathLike, output: str | os.PathLike,
                              num_shards: int = 8, num_workers: int = 1,
                              seed: int = 0) -> dict[str, dict[str, object]]:
    """Writes every split of a benchmark as TFRecords with its own labels.txt.

    Args:
        dataset: A name in `DATASETS`.
        root: The dataset's top folder.
        output: Output directory (see `split_dir`).
        num_shards: Shards per split.
        num_workers: Processes checking the images.
        seed: Seed of the example order.

    Returns:
        The writer's summary of each split; unreadable or missing images are
        skipped and listed there.

    Raises:
        ConfigError: If the dataset is unknown.
        DataError: If a list file is missing or malformed.
    """
    from sparse_embed.data.tfrecord import write_tfrecords

    root = Path(root)
    splits = DATASETS.get(dataset)(root)
    summaries = {}
    for split, (paths, classes) in splits.items():
        names = sorted(set(classes), key=lambda c: (len(c), c))
        index = {name: i for i, name in enumerate(names)}
        summaries[split] = write_tfrecords(
            paths, [index[c] for c in classes], names, root, split_dir(output, split),
            name=split, num_shards=num_shards, num_workers=num_workers, seed=seed,
        )
    return summaries
