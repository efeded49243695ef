"""Verification pairs in the LFW `pairs.txt` format: reading, writing, de-duplication.

The format (also used by CFP, AgeDB exports and the synthetic generator)::

    <nfolds> <n>
    name k1 k2                 # n "same" lines of fold 0
    name1 k1 name2 k2          # n "different" lines of fold 0
    ...                        # the same for folds 1 .. nfolds-1

A header with a single number `n` means one fold: LFW's View 1 files,
`pairsDevTrain.txt` (header `1100`) to choose a threshold on and
`pairsDevTest.txt` (header `500`) to measure it on; View 2's `pairs.txt` has
`10 300`. `name k`
refers to `<image_root>/name/<k>.<ext>` (the synthetic layout) or to LFW's
`<image_root>/name/name_<k:04d>.<ext>`, with `ext` one of jpg, jpeg, png.

InsightFace's verification packs (`lfw.bin`, `cfp_fp.bin`, `agedb_30.bin`, ...)
are a pickled `(bins, issame_list)`: a list of 2N encoded images (pair i is
images 2i and 2i+1) and N bools. `read_bin` loads them without running code
(pickle can), `write_bin` / `build-bin` writes the same layout:

    python -m sparse_embed.data.verification build-bin --pairs=pairs.txt \\
        --images=ALIGNED --output=my.bin
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparse_embed.errors import DataError
from sparse_embed.fileio import atomic_path

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")

SamePair = tuple[str, int, int]
DifferentPair = tuple[str, int, str, int]


@dataclass(frozen=True, eq=False)
class Pairs:
    """A verification protocol: image pairs, whether each is one identity, and its fold.

    Attributes:
        left: Path of the first image of each pair (joined onto the image root given).
        right: Path of the second image of each pair.
        issame: bool [N], True where both images show the same identity.
        fold: int [N], the cross-validation fold of each pair (0-based).
    """

    left: tuple[str, ...]
    right: tuple[str, ...]
    issame: np.ndarray
    fold: np.ndarray

    def __len__(self) -> int:
        return len(self.left)

    @property
    def num_folds(self) -> int:
        """Number of folds (the largest fold index plus one)."""
        return int(self.fold.max()) + 1 if len(self.fold) else 0


def _parse_header(line: str, pairs_path: Path) -> tuple[int, int] | None:
    """Returns (nfolds, n) of a header line, or None if the line is a pair already."""
    tokens = line.split()
    if not tokens or not all(t.isdigit() for t in tokens):
        return None
    if len(tokens) > 2:
        raise DataError(
            f"{pairs_path}:1: header {line.strip()!r} must be '<nfolds> <pairs per class and fold>' "
            f"or '<pairs per class>' (one fold)"
        )
    nfolds, per_class = (1, int(tokens[0])) if len(tokens) == 1 else map(int, tokens)
    if nfolds < 1 or per_class < 1:
        raise DataError(f"{pairs_path}:1: header {line.strip()!r} promises no pairs; folds and "
                        f"pairs per class must be at least 1")
    return nfolds, per_class


class _ImageResolver:
    """Finds the file of `name k` under an image root, listing each identity folder once."""

    def __init__(self, image_root: Path) -> None:
        self.root = image_root
        self._listings: dict[str, frozenset[str]] = {}

    def _listing(self, name: str) -> frozenset[str]:
        if name not in self._listings:
            folder = self.root / name
            self._listings[name] = frozenset(os.listdir(folder)) if folder.is_dir() else frozenset()
        return self._listings[name]

    @staticmethod
    def stems(name: str, k: int) -> tuple[str, str]:
        """File names without extension that may hold image `k` of `name`, preferred first."""
        return str(k), f"{name}_{k:04d}"

    def find(self, name: str, k: int) -> str | None:
        """Returns the path of image `k` of `name`, or None if no candidate exists."""
        files = self._listing(name)
        for stem in self.stems(name, k):
            for ext in IMAGE_EXTENSIONS:
                if f"{stem}.{ext}" in files:
                    return os.path.join(self.root, name, f"{stem}.{ext}")
        return None


def read_pairs(pairs_path: str | os.PathLike, image_root: str | os.PathLike) -> Pairs:
    """Reads an LFW-format pairs file and resolves every image under `image_root`.

    Args:
        pairs_path: The pairs file.
        image_root: Directory holding one folder per identity name.

    Returns:
        The pairs, with folds taken from the file's layout.

    Raises:
        DataError: If the file is missing or malformed (the message names the line),
            or if images are missing (the message names the first and counts them all).
    """
    pairs_path, image_root = Path(pairs_path), Path(image_root)
    if not pairs_path.is_file():
        raise DataError(f"pairs file {pairs_path} not found; pass the LFW-format pairs.txt")
    if not image_root.is_dir():
        raise DataError(f"image root {image_root} of {pairs_path} is not a directory")
    lines = pairs_path.read_text().splitlines()
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if not numbered:
        raise DataError(f"pairs file {pairs_path} is empty")

    header = _parse_header(numbered[0][1], pairs_path)
    if header:
        body = numbered[1:]
        nfolds, per_class = header
        if len(body) != 2 * nfolds * per_class:
            raise DataError(
                f"{pairs_path}: header promises {nfolds} folds x {2 * per_class} pairs = "
                f"{2 * nfolds * per_class} lines, found {len(body)}"
            )
        fold_size = 2 * per_class
    else:
        # Without a header (some CFP/AgeDB exports) the whole file is one fold.
        body = numbered
        fold_size = len(body)

    resolver = _ImageResolver(image_root)
    left, right, issame, fold = [], [], [], []
    missing: list[tuple[int, str, int]] = []
    for position, (lineno, line) in enumerate(body):
        tokens = line.split()
        try:
            if len(tokens) == 3:
                refs = [(tokens[0], int(tokens[1])), (tokens[0], int(tokens[2]))]
            elif len(tokens) == 4:
                refs = [(tokens[0], int(tokens[1])), (tokens[2], int(tokens[3]))]
            else:
                raise ValueError(f"expected 3 or 4 fields, got {len(tokens)}")
        except ValueError as e:
            raise DataError(
                f"{pairs_path}:{lineno}: malformed pair {line.strip()!r} ({e}); expected "
                f"'name k1 k2' or 'name1 k1 name2 k2'"
            ) from e
        paths = []
        for name, k in refs:
            path = resolver.find(name, k)
            if path is None:
                missing.append((lineno, name, k))
            paths.append(path or "")
        left.append(paths[0])
        right.append(paths[1])
        issame.append(len(tokens) == 3)
        fold.append(position // fold_size)

    if missing:
        lineno, name, k = missing[0]
        tried = " or ".join(f"{name}/{stem}.*" for stem in resolver.stems(name, k))
        raise DataError(
            f"{pairs_path}: {len(missing)} image references missing under {image_root}; first at "
            f"line {lineno}: {name} {k} (looked for {tried}, * = {'/'.join(IMAGE_EXTENSIONS)}); "
            f"check the image root"
        )
    return Pairs(
        tuple(left), tuple(right), np.array(issame, dtype=bool), np.array(fold, dtype=np.int64)
    )


def write_pairs(
    path: str | os.PathLike,
    same: Sequence[SamePair],
    different: Sequence[DifferentPair],
    nfolds: int,
) -> None:
    """Writes pairs in the LFW format, atomically.

    Fold f holds `same[f*n:(f+1)*n]` followed by `different[f*n:(f+1)*n]`, where
    `n = len(same) / nfolds`.

    Args:
        path: Destination file.
        same: (name, k1, k2) pairs of one identity.
        different: (name1, k1, name2, k2) pairs of two identities.
        nfolds: Number of folds; must divide the number of pairs of each kind.

    Raises:
        ValueError: If the counts do not split into `nfolds` equal folds.
    """
    if nfolds < 1 or len(same) != len(different) or len(same) % nfolds:
        raise ValueError(
            f"need equally many same and different pairs divisible by nfolds={nfolds}; "
            f"got {len(same)} same and {len(different)} different"
        )
    n = len(same) // nfolds
    lines = [f"{nfolds} {n}"]
    for f in range(nfolds):
        lines += [f"{name}\t{k1}\t{k2}" for name, k1, k2 in same[f * n : (f + 1) * n]]
        lines += [f"{a}\t{ka}\t{b}\t{kb}" for a, ka, b, kb in different[f * n : (f + 1) * n]]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def unique_images(pairs: Pairs) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """De-duplicates the images of a protocol so each is embedded once.

    Args:
        pairs: The verification pairs.

    Returns:
        (paths in order of first appearance, index of each pair's left image into
        `paths`, index of each pair's right image into `paths`).
    """
    index: dict[str, int] = {}
    for left, right in zip(pairs.left, pairs.right, strict=True):
        index.setdefault(left, len(index))
        index.setdefault(right, len(index))
    index_left = np.array([index[p] for p in pairs.left], dtype=np.int64)
    index_right = np.array([index[p] for p in pairs.right], dtype=np.int64)
    return tuple(index), index_left, index_right


# InsightFace evaluates its .bin packs with 10 contiguous folds (KFold without shuffling).
BIN_FOLDS = 10


@dataclass(frozen=True, eq=False)
class BinPack:
    """An InsightFace verification pack in memory.

    Attributes:
        images: 2N encoded images; pair i is images 2i and 2i + 1.
        issame: bool [N].
        fold: int [N], contiguous folds as InsightFace's evaluation splits them.
    """

    images: tuple[bytes, ...]
    issame: np.ndarray
    fold: np.ndarray

    def __len__(self) -> int:
        return len(self.issame)


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles lists, tuples, bytes, bools and numbers only: no class is ever looked up.

    A pickle names callables (`os.system`, ...) through `find_class`; refusing
    every lookup means loading a .bin can build data but never run code.
    """

    def find_class(self, module: str, name: str) -> type:
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, and only plain data is "
                                     f"accepted")


def _contiguous_folds(n: int, nfolds: int) -> np.ndarray:
    fold = np.zeros(n, dtype=np.int64)
    for f, part in enumerate(np.array_split(np.arange(n), min(nfolds, max(n, 1)))):
        fold[part] = f
    return fold


def read_bin(path: str | os.PathLike, nfolds: int = BIN_FOLDS) -> BinPack:
    """Reads an InsightFace verification `.bin` without executing anything in it.

    Args:
        path: The pack (`lfw.bin`, `cfp_fp.bin`, ...).
        nfolds: Contiguous folds to split the pairs into.

    Raises:
        DataError: If the file is missing, is not a pickle, refers to any class
            or function, or does not hold `(list of bytes, list of bools)` with two
            images per pair.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"verification pack {path} not found")
    what = "an InsightFace verification .bin (a pickled (list of images, list of bools))"
    try:
        with open(path, "rb") as f:
            # encoding="bytes": packs written by Python 2 hold the images as str.
            data = _PlainDataUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError,
            AttributeError, ImportError, KeyError, MemoryError) as e:
        # One line: some pickle errors span several.
        raise DataError(f"{path} is not {what}: {' '.join(str(e).split())}") from e
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise DataError(f"{path} is not {what}: it holds a {type(data).__name__}")
    images, issame = data
    if not isinstance(images, (list, tuple)) or not all(
            isinstance(b, (bytes, bytearray)) for b in images):
        raise DataError(f"{path} is not {what}: its first element is not a list of bytes")
    if not isinstance(issame, (list, tuple)) or not all(
            isinstance(x, (bool, int)) and x in (0, 1) for x in issame):
        raise DataError(f"{path} is not {what}: its second element is not a list of bools")
    if len(images) != 2 * len(issame) or not issame:
        raise DataError(f"{path}: {len(images)} images for {len(issame)} pairs; a pack has "
                        f"two images per pair and at least one pair")
    return BinPack(tuple(bytes(b) for b in images), np.array(issame, dtype=bool),
                   _contiguous_folds(len(issame), nfolds))


def write_bin(path: str | os.PathLike, images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Writes a verification pack in InsightFace's layout, atomically.

    Args:
        path: Destination `.bin`.
        images: 2N encoded images, pair i being images 2i and 2i + 1.
        issame: N bools.

    Raises:
        ValueError: If there are not exactly two images per pair.
    """
    if len(images) != 2 * len(issame):
        raise ValueError(f"need two images per pair, got {len(images)} for {len(issame)}")
    buffer = io.BytesIO()
    # Protocol 4: readable by every Python 3 insightface loader.
    pickle.dump(([bytes(b) for b in images], [bool(x) for x in issame]), buffer, protocol=4)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def build_bin(pairs_path: str | os.PathLike, image_root: str | os.PathLike,
              output: str | os.PathLike) -> int:
    """Builds a `.bin` from a pairs file and the aligned images it refers to.

    Args:
        pairs_path: LFW-format pairs file.
        image_root: Aligned images, one folder per identity.
        output: Destination `.bin`.

    Returns:
        The number of pairs written.

    Raises:
        DataError: If the pairs file or an image is missing or malformed.
    """
    pairs = read_pairs(pairs_path, image_root)
    images = []
    for left, right in zip(pairs.left, pairs.right, strict=True):
        images += [Path(left).read_bytes(), Path(right).read_bytes()]
    write_bin(output, images, pairs.issame.tolist())
    return len(pairs)


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sparse_embed.data.verification`: verification-set tools."""
    from sparse_embed.cli import add_command, examples, make_parser, program

    parser = make_parser(f"Verification-set tools.\n\n{examples(__doc__)}", program(__name__))
    commands = parser.add_subparsers(dest="command", required=True, title="sub-commands")
    build = add_command(commands, "build-bin", "Pairs file + aligned images -> InsightFace .bin.",
                        prog=f"{parser.prog} build-bin")
    build.add_argument("--pairs", required=True, help="LFW-format pairs file.")
    build.add_argument("--images", required=True, help="Aligned images, one folder per identity.")
    build.add_argument("--output", required=True, help="The .bin to write.")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m sparse_embed.data.verification build-bin ...`.

    Args:
        argv: Arguments without the program name; None reads sys.argv.
    """
    from sparse_embed.cli import user_errors_exit

    @user_errors_exit
    def run(args: argparse.Namespace) -> None:
        count = build_bin(args.pairs, args.images, args.output)
        print(f"wrote {args.output}: {count} pairs, {2 * count} images")

    run(build_parser().parse_args(argv))


def run() -> None:
    """Console-script entry point."""
    main()


if __name__ == "__main__":
    run()
