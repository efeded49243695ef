"""InsightFace `.bin` verification packs: the published layout, a safe loader, build-bin, --bin."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_main_user_error, call_main, run_module

from sparse_embed.data.verification import main as verification_main
from sparse_embed.data.verification import read_bin, read_pairs
from sparse_embed.errors import DataError

pytestmark = pytest.mark.unit


def _insightface_pack(path: Path, images: list[bytes], issame: list[bool]) -> None:
    """Writes a pack the way insightface's lfw2pack does: pickle.dump((bins, issame_list))."""
    with open(path, "wb") as f:
        pickle.dump((images, issame), f, protocol=pickle.HIGHEST_PROTOCOL)


def _pair_images(tiny_data: Path) -> tuple[list[bytes], list[bool]]:
    pairs = read_pairs(tiny_data / "pairs.txt", tiny_data / "test")
    images = []
    for left, right in zip(pairs.left, pairs.right, strict=True):
        images += [Path(left).read_bytes(), Path(right).read_bytes()]
    return images, pairs.issame.tolist()


def test_read_bin_of_the_published_layout(tiny_data: Path, tmp_path: Path) -> None:
    images, issame = _pair_images(tiny_data)
    _insightface_pack(tmp_path / "lfw.bin", images, issame)
    pack = read_bin(tmp_path / "lfw.bin")
    assert pack.images == tuple(images)
    np.testing.assert_array_equal(pack.issame, issame)
    # 24 pairs in InsightFace's 10 contiguous folds: sizes 3,3,3,3,2,2,2,2,2,2.
    assert np.bincount(pack.fold).tolist() == [3, 3, 3, 3, 2, 2, 2, 2, 2, 2]
    assert (np.diff(pack.fold) >= 0).all()


def test_read_bin_never_runs_code(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "evil.bin").write_bytes(pickle.dumps(([Payload()], [True])))
    with pytest.raises(DataError, match=r"only plain data is accepted"):
        read_bin(tmp_path / "evil.bin")
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n" + bytes(40), "is not an InsightFace verification .bin"),
    (pickle.dumps({"a": 1}), "it holds a dict"),
    (pickle.dumps(([b"x", b"y", b"z"], [True])), "3 images for 1 pairs"),
    (pickle.dumps(([b"x", b"y"], ["yes"])), "second element is not a list of bools"),
    (pickle.dumps(([b"x", b"y"], [True]))[:-5], "is not an InsightFace verification .bin"),
])
def test_read_bin_rejects_other_files(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "x.bin").write_bytes(content)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_bin(tmp_path / "x.bin")


@pytest.mark.integration
def test_build_bin_is_readable_by_insightface_and_evaluates_like_the_pairs(
        tiny_data: Path, smoke_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """build-bin as a process; evaluate and the user errors in this process (main(argv))."""
    from sparse_embed.evaluate import main as evaluate_main

    out = tmp_path / "my.bin"
    proc = run_module("sparse_embed.data.verification", "build-bin",
                      f"--pairs={tiny_data / 'pairs.txt'}", f"--images={tiny_data / 'test'}",
                      f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "24 pairs" in proc.stdout
    # insightface's loader: bins, issame_list = pickle.load(f, encoding='bytes').
    with open(out, "rb") as f:
        bins, issame_list = pickle.load(f, encoding="bytes")
    images, issame = _pair_images(tiny_data)
    assert bins == images and issame_list == issame

    model = smoke_run
    results = {}
    for name, args in (("pairs", [f"--data_dir={tiny_data}"]), ("bin", [f"--bin={out}"])):
        assert call_main(evaluate_main, f"--model_dir={model}", *args,
                         f"--output={tmp_path / name}.json") == 0
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    # Same images, same pairs, same order: the fold-free metrics agree (the sparsity
    # statistics do not: the pairs path embeds each distinct image once, a pack
    # holds an image once per pair it is in).
    for key in ("auc", "eer"):
        assert results["bin"][key] == pytest.approx(results["pairs"][key], rel=1e-6), key

    (tmp_path / "fake.bin").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    assert_main_user_error(capsys, evaluate_main, [f"--model_dir={model}", f"--bin={tmp_path / 'fake.bin'}"],
                           "fake.bin is not an InsightFace verification .bin")
    assert_main_user_error(capsys, verification_main,
                           ["build-bin", f"--pairs={tmp_path / 'none.txt'}", f"--images={tiny_data}",
                            f"--output={tmp_path / 'x.bin'}"], "not found")
    assert not (tmp_path / "x.bin").exists()
