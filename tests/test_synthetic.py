"""Synthetic identities: determinism, layout, pairs, and an identity signal that is not trivial."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, assert_main_user_error, run_module
from PIL import Image

from sparse_embed.data import synthetic
from sparse_embed.data.synthetic import (
    OCCLUDERS,
    generate,
    render_face,
    render_image,
    sample_identity,
    sample_nuisance,
    sample_pairs,
)
from sparse_embed.data.verification import read_pairs
from sparse_embed.errors import ConfigError, DataError

pytestmark = pytest.mark.unit


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_render_is_deterministic_and_seed_dependent() -> None:
    image = render_image(0, 3, 1, image_size=64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, render_image(0, 3, 1, image_size=64))
    assert not np.array_equal(image, render_image(1, 3, 1, image_size=64))
    assert not np.array_equal(image, render_image(0, 3, 2, image_size=64))
    assert image.std() > 10, "a rendered face has structure, not a flat colour"


def test_every_occluder_renders() -> None:
    identity = sample_identity(0, 0)
    plain = dataclasses.replace(sample_nuisance(0, 0, 0), blur=0.0, noise=0.0, occluder=None)
    clean = render_face(identity, plain, 64)
    assert len(OCCLUDERS.names()) >= 4
    for name in OCCLUDERS.names():
        occluded = render_face(identity, dataclasses.replace(plain, occluder=name), 64)
        assert (occluded != clean).any(axis=-1).mean() > 0.02, name


def test_generate_layout_determinism_and_workers(tmp_path: Path) -> None:
    kwargs = dict(seed=5, image_size=48, pairs_folds=2, pairs_per_fold=4)
    summary = generate(tmp_path / "a", 3, 3, 4, workers=1, **kwargs)
    generate(tmp_path / "b", 3, 3, 4, workers=2, **kwargs)
    generate(tmp_path / "c", 3, 3, 4, workers=1, **{**kwargs, "seed": 6})
    a, b, c = (_tree(tmp_path / name) for name in "abc")
    assert a == b, "the worker count must not change a single byte"
    assert a.keys() == c.keys() and a != c
    assert all(a[k] != c[k] for k in a if k.endswith(".jpg")), "another seed, other images"

    out = tmp_path / "a"
    train = sorted(p.name for p in (out / "train").iterdir())
    test = sorted(p.name for p in (out / "test").iterdir())
    assert train == ["id_00000", "id_00001", "id_00002"]
    assert test == ["id_00003", "id_00004", "id_00005", "id_00006"]
    for split, names in (("train", train), ("test", test)):
        for name in names:
            assert sorted(p.name for p in (out / split / name).iterdir()) == [
                "0.jpg",
                "1.jpg",
                "2.jpg",
            ]
    with Image.open(out / "test" / "id_00004" / "2.jpg") as image:
        assert image.format == "JPEG" and image.size == (48, 48) and image.mode == "RGB"
    meta = json.loads((out / "synthetic.json").read_text())
    assert meta["seed"] == 5 and meta["num_identities"] == 3 and meta["num_test_identities"] == 4
    assert meta["images_per_identity"] == 3 and meta["image_size"] == 48
    assert summary["images"] == 21 and summary["images_per_second"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary leftovers"

    pairs = read_pairs(out / "pairs.txt", out / "test")
    assert len(pairs) == 2 * 2 * 4 and pairs.num_folds == 2
    used = {Path(p).parent.name for p in pairs.left + pairs.right}
    assert used <= set(test) and not used & set(train)


def test_regenerating_replaces_a_synthetic_dir_but_nothing_else(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    generate(out, 2, 2, 2, seed=0, image_size=32, pairs_folds=1, pairs_per_fold=1)
    (out / "tfrecords").mkdir()
    generate(out, 3, 2, 2, seed=0, image_size=32, pairs_folds=1, pairs_per_fold=1)
    assert json.loads((out / "synthetic.json").read_text())["num_identities"] == 3
    assert not (out / "tfrecords").exists(), "derived data of the old set goes with it"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="synthetic.json"):
        generate(other, 2, 2, 2, image_size=32)
    assert (other / "notes.txt").read_text() == "keep me"


def test_sample_pairs_folds_are_identity_disjoint_and_scaled_down() -> None:
    names = [f"id_{i:05d}" for i in range(10)]
    same, different, nfolds, per_fold = sample_pairs(names, 3, nfolds=2, pairs_per_fold=300, seed=0)
    # 5 identities per fold with 3 images: 5 * C(3, 2) = 15 distinct same pairs at most.
    assert (nfolds, per_fold) == (2, 15)
    assert len(same) == len(different) == 30
    assert len(set(same)) == len(same) and len(set(different)) == len(different)
    folds = []
    for f in range(nfolds):
        fold_same = same[f * per_fold : (f + 1) * per_fold]
        fold_diff = different[f * per_fold : (f + 1) * per_fold]
        assert all(k1 < k2 < 3 for _, k1, k2 in fold_same)
        assert all(a != b and 0 <= ka < 3 and 0 <= kb < 3 for a, ka, b, kb in fold_diff)
        folds.append(
            {s[0] for s in fold_same} | {d[0] for d in fold_diff} | {d[2] for d in fold_diff}
        )
    assert not folds[0] & folds[1]
    assert sample_pairs(names, 3, 2, 300, seed=0) == (same, different, nfolds, per_fold)
    assert sample_pairs(names, 3, 2, 300, seed=1)[0] != same

    # 5 identities cannot fill 10 identity-disjoint folds of 2+ identities: 2 folds.
    assert sample_pairs(names[:5], 4, nfolds=10, pairs_per_fold=3, seed=0)[2:] == (2, 3)
    with pytest.raises(ConfigError):
        sample_pairs(names[:1], 4, 10, 3, seed=0)


def test_identity_signal_is_real_but_not_trivial_in_pixel_space() -> None:
    """Raw pixels carry some identity (skin, hair) but the nuisances defeat a pixel matcher."""
    ids, per = 16, 6
    x = np.stack(
        [
            render_image(0, i, k, image_size=48).astype(np.float32).ravel()
            for i in range(ids)
            for k in range(per)
        ]
    )
    y = np.repeat(np.arange(ids), per)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    upper = np.triu_indices(len(y), 1)
    dist, same = d[upper], (y[:, None] == y[None, :])[upper]
    assert dist[same].mean() < 0.9 * dist[~same].mean()

    # Nearest neighbour in pixel space: better than chance (1/16), far from perfect.
    np.fill_diagonal(d, np.inf)
    rank1 = (y[d.argmin(1)] == y).mean()
    assert 2 / ids < rank1 < 0.6, rank1

    # Verification with the best possible distance threshold on balanced pairs.
    rng = np.random.default_rng(0)
    negatives = rng.choice(dist[~same], size=same.sum(), replace=False)
    scores = np.concatenate([dist[same], negatives])
    labels = np.concatenate([np.ones(same.sum()), np.zeros(same.sum())])
    best = max(((scores <= t) == labels).mean() for t in np.unique(scores))
    assert 0.55 < best < 0.8, best


def _run_cli(*args: str):
    return run_module("sparse_embed.data.synthetic", *args)


@pytest.mark.integration
def test_cli_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    proc = _run_cli(
        f"--output={out}",
        "--identities=2",
        "--images_per_identity=2",
        "--test_identities=2",
        "--image_size=32",
        "--workers=1",
        "--seed=3",
    )
    assert proc.returncode == 0, proc.stderr
    assert "images_per_second" in proc.stdout and "synthetic identities" in proc.stdout
    assert json.loads((out / "synthetic.json").read_text())["seed"] == 3
    assert len(list(out.glob("*/*/*.jpg"))) == 8
    read_pairs(out / "pairs.txt", out / "test")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--test_identities=1"], "--test_identities must be at least 2"),
        (["--images_per_identity=1"], "--images_per_identity must be at least 2"),
    ],
)
def test_cli_bad_arguments_exit_2(tmp_path: Path, args: list[str], fragment: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "synth"
    assert_main_user_error(capsys, synthetic.main,
                           [f"--output={out}", "--identities=2", "--image_size=32", *args], fragment)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.integration
def test_cli_occupied_output_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("x")
    assert_main_user_error(capsys, synthetic.main, [f"--output={tmp_path}", "--identities=2",
                                                    "--images_per_identity=2", "--test_identities=2"],
                           "synthetic.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    # The old spellings still work, each with a deprecation line, for one release.
    proc = _run_cli(f"--out={tmp_path}", "--identities=2", "--images=2", "--test_identities=2")
    assert proc.returncode == 2 and "--out is deprecated" in proc.stderr and "synthetic.json" in proc.stderr


@pytest.mark.integration
def test_generator_does_not_import_tensorflow() -> None:
    """The generator runs (and its workers start) without paying for a TensorFlow import."""
    code = "import sys, sparse_embed.data.synthetic; print('tensorflow' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=120,
    )
    assert proc.stdout.strip() == "False", proc.stderr
