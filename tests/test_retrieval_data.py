"""CUB-200-2011, Cars196, SOP and In-shop list files, written in their published layouts, to TFRecords."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from conftest import assert_main_user_error, call_main, run_module
from PIL import Image

from sparse_embed.data.pipeline import eval_dataset
from sparse_embed.data.retrieval import DATASETS, split_dir
from sparse_embed.data.tfrecord import read_label_map
from sparse_embed.preprocessing.build_retrieval_tfrecords import main as build_main

pytestmark = pytest.mark.unit

SCRIPT = "sparse_embed.preprocessing.build_retrieval_tfrecords"


def _jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


def _cub(root: Path) -> dict[str, set[str]]:
    """images.txt `<id> <class dir>/<file>`, image_class_labels.txt `<id> <class>`, classes 1..200."""
    images, labels = [], []
    for i, label in enumerate((1, 1, 100, 101, 150, 200), start=1):
        rel = f"{label:03d}.Bird_{label}/Bird_{label}_{i:04d}.jpg"
        _jpeg(root / "images" / rel, i)
        images.append(f"{i} {rel}")
        labels.append(f"{i} {label}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return {"train": {"1", "100"}, "test": {"101", "150", "200"}}


def _cars(root: Path) -> dict[str, set[str]]:
    """cars_annos.mat: a struct array `annotations` (relative_im_path, bbox_*, class, test)."""
    fields = [("relative_im_path", "O"), ("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"),
              ("bbox_y2", "O"), ("class", "O"), ("test", "O")]
    rows = []
    for i, label in enumerate((1, 98, 99, 196), start=1):
        rel = f"car_ims/{i:06d}.jpg"
        _jpeg(root / rel, i)
        rows.append((rel, 1, 1, 20, 24, label, i % 2))
    annotations = np.array(rows, dtype=fields).reshape(1, -1)
    names = np.array([f"Make {c}" for c in range(1, 197)], dtype=object).reshape(1, -1)
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": names})
    return {"train": {"1", "98"}, "test": {"99", "196"}}


def _sop(root: Path) -> dict[str, set[str]]:
    """Ebay_{train,test}.txt: header `image_id class_id super_class_id path`."""
    expected = {}
    for split, classes in (("train", (1, 1, 2)), ("test", (11319, 11320))):
        lines = ["image_id class_id super_class_id path"]
        for i, label in enumerate(classes, start=1):
            rel = f"bicycle_final/{label}_{i}.JPG"
            _jpeg(root / rel, label * 10 + i)
            lines.append(f"{i} {label} 1 {rel}")
        (root / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
        expected[split] = {str(c) for c in classes}
    return expected


def _inshop(root: Path) -> dict[str, set[str]]:
    """list_eval_partition.txt: a count line, a header line, then `image_name item_id status`."""
    rows = [("id_00000001", "train"), ("id_00000001", "train"), ("id_00000002", "query"),
            ("id_00000002", "gallery"), ("id_00000003", "gallery")]
    lines = [str(len(rows)), "image_name item_id evaluation_status"]
    for i, (item, status) in enumerate(rows):
        rel = f"img/WOMEN/Dresses/{item}/{i:02d}_1_front.jpg"
        _jpeg(root / rel, i)
        lines.append(f"{rel}    {item}    {status}")
    (root / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return {"train": {"id_00000001"}, "query": {"id_00000002"},
            "gallery": {"id_00000002", "id_00000003"}}


WRITERS = {"cub": _cub, "cars": _cars, "sop": _sop, "inshop": _inshop}
# The class each fixture image belongs to, read off the name the fixture gave it.
CLASS_OF = {
    "cub": lambda f: str(int(f.split("/")[1].split(".")[0])),
    "cars": lambda f: str((1, 98, 99, 196)[int(Path(f).stem) - 1]),
    "sop": lambda f: Path(f).stem.split("_")[0],
    "inshop": lambda f: f.split("/")[3],
}


def test_every_registered_dataset_has_a_fixture() -> None:
    assert sorted(WRITERS) == DATASETS.names()


@pytest.mark.integration
@pytest.mark.parametrize("dataset", sorted(WRITERS))
def test_open_set_splits_to_tfrecords(dataset: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """In this process (main(argv)); the command runs as a process in the test below."""
    root = tmp_path / dataset
    expected = WRITERS[dataset](root)
    out = tmp_path / "out"
    assert call_main(build_main, f"--dataset={dataset}", f"--root={root}", f"--output={out}",
                     "--shards=1", "--workers=1") == 0
    capsys.readouterr()
    for split, classes in expected.items():
        directory = split_dir(out, split)
        names = read_label_map(directory / "labels.txt")
        assert set(names) == classes, split
        seen = {}
        for _, labels, files in eval_dataset(str(directory / f"{split}-*"), 8, 16):
            for label, name in zip(labels.numpy(), files.numpy(), strict=True):
                seen[name.decode()] = names[label]
        assert set(seen.values()) == classes
        for file, label in seen.items():
            assert (root / file).is_file()
            assert CLASS_OF[dataset](file) == label, (file, label)
    assert (out / "tfrecords" / "train-00000-of-00001").is_file()


@pytest.mark.integration
def test_missing_list_file_and_missing_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_main_user_error(capsys, build_main, ["--dataset=cub", f"--root={tmp_path / 'none'}",
                                                f"--output={tmp_path / 'o'}"], "images.txt not found")
    root = tmp_path / "cub"
    _cub(root)
    next((root / "images").rglob("*.jpg")).unlink()
    proc = run_module(SCRIPT, "--dataset=cub", f"--root={root}",
                             f"--output={tmp_path / 'o'}", "--shards=1", "--workers=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("  skipped ")]
    assert len(skipped) == 1 and "unreadable" in skipped[0], proc.stdout
