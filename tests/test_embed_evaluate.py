"""Embedding export to HDF5 and verification evaluation of a trained tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import assert_main_user_error, call_main, run_module

from sparse_embed.embed import main as embed_main
from sparse_embed.evaluate import main as evaluate_main

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model_dir(smoke_run: Path) -> Path:
    """The session's smoke run: the tests only read it and write elsewhere."""
    return smoke_run


def test_embed_folder_to_hdf5_round_trip(tiny_data: Path, model_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The real command once; the --flip=concat run in this process (main(argv))."""
    from sparse_embed.data.embeddings import read_hdf5
    from sparse_embed.data.tfrecord import image_folder

    out = tmp_path / "emb.hdf5"
    proc = run_module("sparse_embed.embed", f"--model_dir={model_dir}",
                      f"--images={tiny_data / 'test'}", f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    paths, labels, _ = image_folder(tiny_data / "test")
    with h5py.File(out) as f:
        assert f["embedding"].shape == (len(paths), 64) and f["embedding"].dtype == np.float32
    emb = read_hdf5(out)
    np.testing.assert_array_equal(emb.label, labels)
    assert [Path(p).name for p in emb.filename] == [Path(p).name for p in paths]
    np.testing.assert_allclose(np.linalg.norm(emb.embedding, axis=1), 1.0, rtol=1e-5)
    assert (emb.embedding >= 0).all(), "the smoke model's final activation is relu"

    concat = tmp_path / "concat.hdf5"
    assert call_main(embed_main, f"--model_dir={model_dir}",
                     f"--tfrecords={tiny_data / 'tfrecords' / 'train-*'}", f"--output={concat}",
                     "--flip=concat") == 0
    capsys.readouterr()
    assert read_hdf5(concat).embedding.shape == (48, 128)


def test_flip_sum_is_the_sum_of_both_views(tiny_data: Path, model_dir: Path) -> None:
    from sparse_embed.data.pipeline import files_dataset
    from sparse_embed.data.tfrecord import image_folder
    from sparse_embed.inference import embed_dataset, load_backbone
    from sparse_embed.keras import tf

    backbone, config = load_backbone(model_dir)
    paths, labels, _ = image_folder(tiny_data / "test")
    dataset = files_dataset(paths[:8], labels[:8], 8, config.model.input_size)
    summed = embed_dataset(backbone, dataset, "sum").embedding
    images = next(iter(dataset))[0]
    both = backbone(images).numpy() + backbone(tf.image.flip_left_right(images)).numpy()
    np.testing.assert_allclose(summed, both / np.linalg.norm(both, axis=1, keepdims=True),
                               atol=1e-5)


def test_evaluate_writes_metrics(tiny_data: Path, model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    proc = run_module("sparse_embed.evaluate", f"--model_dir={model_dir}",
                      f"--data_dir={tiny_data}", f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    for key in ("accuracy", "accuracy_std", "auc", "eer", "mean_nnz", "flops_per_pair", "r_sub",
                "search_ms_per_query"):
        assert np.isfinite(results[key]), key
    assert 0.0 <= results["accuracy"] <= 1.0 and results["embedding_size"] == 64
    assert results["mean_nnz"] <= 64 and results["flops_per_pair"] <= results["mean_nnz"] + 1e-6
    assert "accuracy" in proc.stdout
    assert (tmp_path / "eval.roc.png").is_file()


def test_pairs_with_missing_images_exit_2(tiny_data: Path, model_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "images"
    shutil.copytree(tiny_data / "test", images)
    victim = next(images.iterdir())
    shutil.rmtree(victim)
    out = tmp_path / "never.json"
    assert_main_user_error(capsys, evaluate_main, [f"--model_dir={model_dir}",
                                                   f"--pairs={tiny_data / 'pairs.txt'}",
                                                   f"--pairs_images={images}", f"--output={out}"],
                           "missing")
    assert not out.exists()
    assert_main_user_error(capsys, embed_main, [f"--model_dir={tmp_path / 'nope'}", f"--images={images}",
                                                f"--output={out}"], "config.yaml")


@pytest.mark.unit
def test_roc_plot_is_a_png(tmp_path: Path) -> None:
    from sparse_embed.plots import plot_roc

    rng = np.random.default_rng(0)
    issame = np.arange(200) % 2 == 0
    scores = rng.normal(size=200) + issame
    plot_roc({"a": (scores, issame), "b": (-scores, issame)}, tmp_path / "roc.png")
    assert (tmp_path / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["roc.png"]


def test_unreadable_images_are_skipped_and_reported(tiny_data: Path, model_dir: Path, tmp_path: Path,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    """In this process (main(argv)), with file descriptors 1 and 2 captured: libjpeg writes to 2 itself."""
    images = tmp_path / "images"
    shutil.copytree(tiny_data / "test", images)
    first, second = sorted(images.rglob("*.jpg"))[:2]
    first.write_text("not an image\n")
    second.write_bytes(second.read_bytes()[:200])
    total = len(list(images.rglob("*.jpg")))
    out = tmp_path / "emb.hdf5"
    capfd.readouterr()
    code = call_main(embed_main, f"--model_dir={model_dir}", f"--images={images}", f"--output={out}")
    stdout, stderr = capfd.readouterr()
    assert code == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    # libjpeg's own report of the truncated JPEG ("Improper call to JPEG library") stays off the terminal.
    assert "JPEG" not in stderr, stderr
    for bad in (first, second):
        assert f"skipped {bad}" in stdout, stdout
    with h5py.File(out) as f:
        assert f["embedding"].shape[0] == total - 2
        names = [n.decode() for n in f["filename"][:]]
    assert str(first) not in names and str(second) not in names

    # Evaluation needs every image of the pairs: one line naming the first unreadable one.
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tiny_data / "pairs.txt", data / "pairs.txt")
    shutil.copytree(tiny_data / "test", data / "test")
    from sparse_embed.data.verification import read_pairs, unique_images

    pairs_image = Path(unique_images(read_pairs(data / "pairs.txt", data / "test"))[0][0])
    pairs_image.write_bytes(pairs_image.read_bytes()[:200])  # truncated: libjpeg complains itself
    assert_main_user_error(capfd, evaluate_main, [f"--model_dir={model_dir}", f"--data_dir={data}"],
                           "do not decode", str(pairs_image))


def test_run_dir_records_its_data_dir(tiny_data: Path, model_dir: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The trainer records the data directory in run.json; evaluate and embed take the run's own
    pairs from it without --data_dir (in this process: main(argv))."""
    from sparse_embed import embed, evaluate
    from sparse_embed.data.embeddings import read_hdf5
    from sparse_embed.data.verification import read_pairs, unique_images
    from sparse_embed.run_record import recorded_data_dir

    assert recorded_data_dir(model_dir) == tiny_data.resolve()
    evaluate.main([f"--model_dir={model_dir}", f"--output={tmp_path / 'eval.json'}"])
    evaluate.main([f"--model_dir={model_dir}", f"--data_dir={tiny_data}",
                   f"--output={tmp_path / 'flag.json'}"])
    results = json.loads((tmp_path / "eval.json").read_text())
    flag = json.loads((tmp_path / "flag.json").read_text())
    assert (results["accuracy"], results["auc"]) == (flag["accuracy"], flag["auc"])
    embed.main([f"--model_dir={model_dir}", f"--output={tmp_path / 'pairs.hdf5'}"])
    paths = unique_images(read_pairs(tiny_data / "pairs.txt", tiny_data / "test"))[0]
    assert len(read_hdf5(tmp_path / "pairs.hdf5").embedding) == len(paths)
    capsys.readouterr()


def _view1_files(pairs_txt: Path, out: Path) -> tuple[Path, Path]:
    """Folds 0 and 1 of a `<nfolds> <n>` pairs file as LFW View 1 files (header `n`, one fold)."""
    lines = pairs_txt.read_text().splitlines()
    per_class = int(lines[0].split()[1])
    files = []
    for fold, name in enumerate(("pairsDevTrain.txt", "pairsDevTest.txt")):
        body = lines[1 + 2 * per_class * fold: 1 + 2 * per_class * (fold + 1)]
        (out / name).write_text("\n".join([str(per_class), *body]) + "\n")
        files.append(out / name)
    return files[0], files[1]


def test_evaluate_lfw_view1(tiny_data: Path, model_dir: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    """View 1: threshold from pairsDevTrain applied to pairsDevTest, checked against a brute force
    (the commands in this process: main(argv))."""
    from sparse_embed.data.verification import read_pairs
    from sparse_embed.inference import evaluate_verification, load_backbone
    from sparse_embed.metrics.verification import PROTOCOLS

    dev_train, dev_test = _view1_files(tiny_data / "pairs.txt", tmp_path)
    images = tiny_data / "test"
    out = tmp_path / "view1.json"
    capsys.readouterr()
    assert call_main(evaluate_main, f"--model_dir={model_dir}", f"--pairs={dev_test}",
                     f"--threshold_pairs={dev_train}", f"--pairs_images={images}", f"--output={out}") == 0
    stdout = capsys.readouterr().out
    assert f"accuracy_protocol: {PROTOCOLS['threshold pairs']}" in stdout, stdout
    cli = json.loads(out.read_text())
    assert cli["accuracy_protocol"] == PROTOCOLS["threshold pairs"] and "accuracy_std" not in cli

    # Oracle: every threshold between the training scores, the best (lowest on ties) on the test.
    backbone, config = load_backbone(model_dir)
    train_pairs, test_pairs = read_pairs(dev_train, images), read_pairs(dev_test, images)
    _, train_scores = evaluate_verification(backbone, config, train_pairs)
    results, test_scores = evaluate_verification(backbone, config, test_pairs, train_pairs)
    values = np.unique(train_scores)
    candidates = np.concatenate([[values[0] - 1], (values[:-1] + values[1:]) / 2, [values[-1]]])
    correct = [np.sum((train_scores > t) == train_pairs.issame) for t in candidates]
    threshold = candidates[int(np.argmax(correct))]
    assert results["accuracy"] == np.mean((test_scores > threshold) == test_pairs.issame)
    for key in ("accuracy", "auc", "eer"):
        assert cli[key] == pytest.approx(results[key], rel=1e-6), key

    # Without training pairs, the one fold chooses its own threshold, and the table says so.
    own = tmp_path / "own.json"
    assert call_main(evaluate_main, f"--model_dir={model_dir}", f"--pairs={dev_test}",
                     f"--pairs_images={images}", f"--output={own}") == 0
    stdout = capsys.readouterr().out
    assert "threshold chosen on the test fold itself (no held-out fold)" in stdout, stdout
    own_results = json.loads(own.read_text())
    assert own_results["accuracy"] >= cli["accuracy"]
    assert own_results["auc"] == pytest.approx(cli["auc"], rel=1e-6)

    assert_main_user_error(capsys, evaluate_main, [f"--model_dir={model_dir}", f"--pairs={dev_test}",
                                                   f"--pairs_images={images}",
                                                   f"--threshold_pairs={tmp_path / 'nope.txt'}"],
                           "nope.txt not found")
