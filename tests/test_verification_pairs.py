"""Verification pairs: LFW-format reading and writing, image resolution, de-duplication."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sparse_embed.data.verification import read_pairs, unique_images, write_pairs
from sparse_embed.errors import DataError

pytestmark = pytest.mark.unit


def _touch(root: Path, *relative: str) -> None:
    for rel in relative:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"not decoded by read_pairs")


def test_round_trip_synthetic_layout(tmp_path: Path) -> None:
    images = tmp_path / "images"
    _touch(images, *(f"{name}/{k}.jpg" for name in ("a", "b", "c", "d") for k in range(3)))
    same = [("a", 0, 1), ("b", 1, 2), ("c", 0, 2), ("d", 0, 1)]
    different = [("a", 0, "b", 2), ("a", 1, "c", 0), ("c", 2, "d", 1), ("b", 0, "d", 0)]
    write_pairs(tmp_path / "pairs.txt", same, different, nfolds=2)
    lines = (tmp_path / "pairs.txt").read_text().splitlines()
    assert lines[0] == "2 2" and len(lines) == 9
    assert lines[1].split() == ["a", "0", "1"] and lines[3].split() == ["a", "0", "b", "2"]

    pairs = read_pairs(tmp_path / "pairs.txt", images)
    assert len(pairs) == 8 and pairs.num_folds == 2
    np.testing.assert_array_equal(pairs.issame, [1, 1, 0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(pairs.fold, [0, 0, 0, 0, 1, 1, 1, 1])
    assert pairs.left[0] == str(images / "a" / "0.jpg")
    assert pairs.right[0] == str(images / "a" / "1.jpg")
    assert pairs.left[2] == str(images / "a" / "0.jpg")
    assert pairs.right[2] == str(images / "b" / "2.jpg")
    assert pairs.right[7] == str(images / "d" / "0.jpg")


def test_lfw_layout_single_number_header_and_png(tmp_path: Path) -> None:
    images = tmp_path / "lfw"
    _touch(images, "Ann_Lee/Ann_Lee_0001.jpg", "Ann_Lee/Ann_Lee_0002.jpg", "Bo_Xu/Bo_Xu_0003.png")
    (tmp_path / "pairs.txt").write_text("1\nAnn_Lee\t1\t2\nAnn_Lee\t2\tBo_Xu\t3\n")
    pairs = read_pairs(tmp_path / "pairs.txt", images)
    assert pairs.left == (
        str(images / "Ann_Lee/Ann_Lee_0001.jpg"),
        str(images / "Ann_Lee/Ann_Lee_0002.jpg"),
    )
    assert pairs.right == (
        str(images / "Ann_Lee/Ann_Lee_0002.jpg"),
        str(images / "Bo_Xu/Bo_Xu_0003.png"),
    )
    np.testing.assert_array_equal(pairs.issame, [True, False])
    np.testing.assert_array_equal(pairs.fold, [0, 0])


def _view1_file(path: Path, same: list[tuple[str, int, int]],
                different: list[tuple[str, int, str, int]]) -> None:
    """Writes a pairs file as LFW's View 1 README specifies pairsDevTrain/pairsDevTest.

    Line 1: the number N of pairs per class; then N lines `name i j` (two
    images of one person), then N lines `name1 i name2 j` (two people),
    tab-separated, image numbers without padding.
    """
    assert len(same) == len(different)
    lines = [str(len(same))]
    lines += ["\t".join(map(str, pair)) for pair in same]
    lines += ["\t".join(map(str, pair)) for pair in different]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("name", ["pairsDevTrain.txt", "pairsDevTest.txt"])
def test_lfw_view1_files_are_one_fold(tmp_path: Path, name: str) -> None:
    images = tmp_path / "lfw"
    people = {"Aaron_Peirsol": 4, "Abdullah_Gul": 16, "Zico": 3}
    _touch(images, *(f"{p}/{p}_{k:04d}.jpg" for p, n in people.items() for k in range(1, n + 1)))
    same = [("Aaron_Peirsol", 1, 2), ("Abdullah_Gul", 13, 14), ("Zico", 1, 3)]
    different = [("Aaron_Peirsol", 4, "Zico", 2), ("Abdullah_Gul", 16, "Zico", 1),
                 ("Aaron_Peirsol", 3, "Abdullah_Gul", 1)]
    _view1_file(tmp_path / name, same, different)
    assert (tmp_path / name).read_text().splitlines()[0] == "3"

    pairs = read_pairs(tmp_path / name, images)
    assert len(pairs) == 6 and pairs.num_folds == 1
    np.testing.assert_array_equal(pairs.fold, np.zeros(6))
    np.testing.assert_array_equal(pairs.issame, [True] * 3 + [False] * 3)
    assert pairs.left[1] == str(images / "Abdullah_Gul" / "Abdullah_Gul_0013.jpg")
    assert pairs.right[1] == str(images / "Abdullah_Gul" / "Abdullah_Gul_0014.jpg")
    assert pairs.left[4] == str(images / "Abdullah_Gul" / "Abdullah_Gul_0016.jpg")
    assert pairs.right[4] == str(images / "Zico" / "Zico_0001.jpg")

    # View 1 is N same then N different lines: a count off by one names the header's promise.
    _view1_file(tmp_path / "short.txt", same, different)
    text = (tmp_path / "short.txt").read_text().splitlines()
    (tmp_path / "short.txt").write_text("\n".join(text[:-1]) + "\n")
    with pytest.raises(DataError, match="header promises 1 folds x 6 pairs = 6 lines, found 5"):
        read_pairs(tmp_path / "short.txt", images)


def test_file_without_header_is_one_fold(tmp_path: Path) -> None:
    _touch(tmp_path / "im", "x/1.png", "x/2.png", "y/1.png")
    (tmp_path / "p.txt").write_text("x 1 2\nx 1 y 1\nx 2 y 1\n")
    pairs = read_pairs(tmp_path / "p.txt", tmp_path / "im")
    np.testing.assert_array_equal(pairs.fold, [0, 0, 0])
    np.testing.assert_array_equal(pairs.issame, [True, False, False])


def test_unique_images_maps_back(tmp_path: Path) -> None:
    images = tmp_path / "images"
    _touch(images, *(f"{name}/{k}.jpg" for name in ("a", "b") for k in range(2)))
    (tmp_path / "pairs.txt").write_text("1 2\na 0 1\nb 0 1\na 0 b 1\nb 0 a 1\n")
    pairs = read_pairs(tmp_path / "pairs.txt", images)
    paths, left, right = unique_images(pairs)
    assert len(paths) == 4 == len(set(paths))
    assert [paths[i] for i in left] == list(pairs.left)
    assert [paths[i] for i in right] == list(pairs.right)
    assert paths[0] == pairs.left[0]


@pytest.mark.parametrize(
    "body, fragment",
    [
        ("1 1\na 0 1\na zero b 1\n", ":3: malformed"),
        ("1 1\na 0 1\na 0 b\nextra\n", "found 3"),
        ("1 1\na 0 1\na 0 b 1 c\n", ":3: malformed"),
        ("1 2 3\na 0 1\n", ":1: header"),
        ("0\n", ":1: header '0' promises no pairs"),
        ("0 5\n", ":1: header '0 5' promises no pairs"),
    ],
)
def test_malformed_files_name_the_line(tmp_path: Path, body: str, fragment: str) -> None:
    _touch(tmp_path / "im", "a/0.jpg", "a/1.jpg", "b/1.jpg")
    (tmp_path / "pairs.txt").write_text(body)
    with pytest.raises(DataError, match=fragment) as info:
        read_pairs(tmp_path / "pairs.txt", tmp_path / "im")
    assert "pairs.txt" in str(info.value)


def test_missing_images_counted_and_first_named(tmp_path: Path) -> None:
    _touch(tmp_path / "im", "a/0.jpg", "a/1.jpg")
    (tmp_path / "pairs.txt").write_text("1 1\na 0 1\na 1 ghost 4\n")
    (tmp_path / "more.txt").write_text("1 1\na 0 7\nghost 1 ghost 2\n")
    with pytest.raises(DataError, match=r"1 image references missing.*line 3: ghost 4"):
        read_pairs(tmp_path / "pairs.txt", tmp_path / "im")
    with pytest.raises(DataError, match=r"3 image references missing.*line 2: a 7"):
        read_pairs(tmp_path / "more.txt", tmp_path / "im")


def test_missing_file_and_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        read_pairs(tmp_path / "nope.txt", tmp_path)
    (tmp_path / "pairs.txt").write_text("1 1\na 0 1\na 0 b 1\n")
    with pytest.raises(DataError, match="not a directory"):
        read_pairs(tmp_path / "pairs.txt", tmp_path / "no_images")


def test_write_pairs_rejects_uneven_folds(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nfolds=2"):
        write_pairs(tmp_path / "p.txt", [("a", 0, 1)] * 3, [("a", 0, "b", 1)] * 3, nfolds=2)
    assert not (tmp_path / "p.txt").exists()
