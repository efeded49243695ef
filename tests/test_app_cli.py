"""`python -m sparse_embed.app` end to end: enrol, list, identify, calibrate, remove, with the smoke
run (Keras), its TFLite export (no TensorFlow in the process) and MTCNN on a real photograph.

The smoke run is trained for a few steps and does not tell synthetic identities apart reliably, so
the round trip enrols and queries the same aligned crops: each query's own embedding is in the
gallery with score 1, which proves the gallery, the per-person matching and the report, not the
model's accuracy. `unknown` for held-out people is checked at a threshold calibrated on pairs
that include every (held-out image, enrolled image) pair as a different pair: the calibrated
threshold is then above every score a held-out face can get.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import (
    ROOT,
    assert_main_user_error,
    assert_user_error,
    call_main,
    missing_dependency,
    run_module,
)
from skimage import data as skimage_data

from sparse_embed.app.__main__ import main
from sparse_embed.app.gallery import Gallery, ModelRecord

pytestmark = pytest.mark.integration

ENROLLED = ("id_00000", "id_00001", "id_00002", "id_00003")
IMAGES = 3  # enrolled per person
# Packages a device without TensorFlow lacks (as in test_edge).
BLOCKED = ("tensorflow", "tf_keras", "keras", "mtcnn")
BLOCKER = f"""
import importlib.abc
import sys


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is not installed on the device")
        return None


sys.meta_path.insert(0, _Blocker())
"""


@pytest.fixture(scope="module")
def people(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PEOPLE/<person>/k.jpg: the first IMAGES training crops of the ENROLLED identities."""
    root = tmp_path_factory.mktemp("people")
    for person in ENROLLED:
        (root / person).mkdir()
        for k in range(IMAGES):
            shutil.copy(tiny_data / "train" / person / f"{k}.jpg", root / person / f"{k}.jpg")
    return root


@pytest.fixture(scope="module")
def gallery(smoke_run: Path, people: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ENROLLED people in a gallery of the smoke run (sparse: a relu embedding)."""
    out = tmp_path_factory.mktemp("gallery") / "g"
    assert call_main(main, "enroll", f"--gallery={out}", f"--model={smoke_run}", f"--images={people}",
                     "--aligned") == 0
    return out


@pytest.fixture(scope="module")
def tflite_model(smoke_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sparse_embed.inference import load_backbone
    from sparse_embed.keras import tf

    backbone, _ = load_backbone(smoke_run)
    path = tmp_path_factory.mktemp("tflite") / "model.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(backbone).convert())
    return path


def _report(out: Path) -> list[dict]:
    return json.loads((out / "report.json").read_text())


def test_enrol_and_identify_round_trip(gallery: Path, people: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    loaded = Gallery.load(gallery)
    assert loaded.counts() == {person: IMAGES for person in ENROLLED}
    assert loaded.model.index_type == "sparse" and loaded.calibration is None
    assert call_main(main, "list", f"--gallery={gallery}") == 0
    assert "4 people, 12 embeddings" in capsys.readouterr().out
    out = tmp_path / "out"
    assert call_main(main, "identify", f"--gallery={gallery}", f"--output={out}", "--aligned",
                     "--score_threshold=0.99", people) == 0
    report = _report(out)
    assert len(report) == len(ENROLLED) * IMAGES
    for entry in report:
        assert set(entry) == {"input", "faces", "annotated"}
        (face,) = entry["faces"]
        assert face["name"] == Path(entry["input"]).parent.name
        assert face["score"] == pytest.approx(1.0, abs=1e-4) and face["far"] is None
        assert len(face["box"]) == 4 and np.shape(face["landmarks"]) == (5, 2)
        assert (out / entry["annotated"]).is_file()
    # Mean of the top embeddings: the query's own (1.0) and two others of the person, so lower.
    assert call_main(main, "identify", f"--gallery={gallery}", f"--output={tmp_path / 'mean'}", "--aligned",
                     "--matching=mean", "--score_threshold=-1", people / ENROLLED[0] / "0.jpg") == 0
    (face,) = _report(tmp_path / "mean")[0]["faces"]
    assert face["name"] == ENROLLED[0] and face["score"] < 1.0


def test_calibrated_threshold_names_enrolled_people_and_not_held_out_ones(
        gallery: Path, people: Path, tiny_data: Path, tmp_path: Path) -> None:
    held_out = sorted(p.name for p in (tiny_data / "test").iterdir())[:2]
    root = tmp_path / "calib"
    same, different = [], []
    for person in ENROLLED:
        shutil.copytree(people / person, root / person)
        shutil.copy(people / person / "0.jpg", root / person / "9.jpg")  # an identical copy
    for person in held_out:
        shutil.copytree(tiny_data / "test" / person, root / person)
    for stranger in held_out:
        for k in range(IMAGES):
            for person in ENROLLED:
                for j in range(IMAGES):
                    different.append(f"{stranger}\t{k}\t{person}\t{j}")
    same = [f"{ENROLLED[i % len(ENROLLED)]}\t0\t9" for i in range(len(different))]
    (tmp_path / "pairs.txt").write_text("\n".join([f"1 {len(same)}", *same, *different]) + "\n")
    g = tmp_path / "g"
    shutil.copytree(gallery, g)
    assert call_main(main, "calibrate", f"--gallery={g}", f"--pairs={tmp_path / 'pairs.txt'}",
                     f"--images={root}", "--far=1e-3", "--aligned") == 0
    calibration = Gallery.load(g).calibration
    assert calibration.different_pairs == len(different) and calibration.far == 0.0
    out = tmp_path / "out"
    strangers = [tiny_data / "test" / person for person in held_out]
    assert call_main(main, "identify", f"--gallery={g}", f"--output={out}", "--aligned",
                     people / ENROLLED[1] / "2.jpg", *strangers) == 0
    report = _report(out)
    (known,) = report[0]["faces"]
    assert known["name"] == ENROLLED[1] and known["far"] == 0.0
    faces = [face for entry in report[1:] for face in entry["faces"]]
    assert len(faces) == 2 * len(list((tiny_data / "test" / held_out[0]).iterdir()))
    assert all(face["name"] == "unknown" for face in faces)
    # A held-out face scores at most the highest different pair: its FAR is at least 1/n.
    assert all(face["far"] >= 1 / calibration.different_pairs for face in faces)


def test_incremental_enrol_remove_and_an_interrupted_enrol(
        gallery: Path, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    g = tmp_path / "g"
    shutil.copytree(gallery, g)
    more = tmp_path / "more"
    for person in ("id_00004", "id_00005"):
        shutil.copytree(tiny_data / "train" / person, more / person)
    (tmp_path / "list.csv").write_text(f"image,name\n{tiny_data / 'train' / ENROLLED[0] / '5.jpg'},"
                                       f"{ENROLLED[0]}\n")
    assert call_main(main, "enroll", f"--gallery={g}", f"--images={more}", "--aligned") == 0
    assert call_main(main, "enroll", f"--gallery={g}", f"--list={tmp_path / 'list.csv'}", "--aligned") == 0
    counts = Gallery.load(g).counts()
    assert counts[ENROLLED[0]] == IMAGES + 1 and counts["id_00004"] == 6 and len(counts) == 6
    assert call_main(main, "remove", f"--gallery={g}", "--name=id_00004") == 0
    assert "id_00004" not in Gallery.load(g).counts()

    # A failure in the middle of an enrol (after the first person's embeddings went in): the
    # gallery on disk is the previous one, loadable and unchanged.
    before = Gallery.load(g).manifest()
    calls = []

    def enroll_then_fail(self: Gallery, *args: object) -> None:
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        original(self, *args)

    original = Gallery.enroll
    monkeypatch.setattr(Gallery, "enroll", enroll_then_fail)
    with pytest.raises(KeyboardInterrupt):
        call_main(main, "enroll", f"--gallery={g}", f"--images={more}", "--aligned")
    monkeypatch.undo()
    assert len(calls) == 2 and Gallery.load(g).manifest() == before
    assert_main_user_error(capsys, main, ["remove", f"--gallery={g}", "--name=nobody"], "no person 'nobody'")


def test_person_means_enrolled_and_matched_by_centroid(
        gallery: Path, smoke_run: Path, people: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # One image per person: each mean is that image's embedding, so its own query scores 1.
    firsts = [people / person / "0.jpg" for person in ENROLLED]
    (tmp_path / "list.csv").write_text("".join(f"{path},{path.parent.name}\n" for path in firsts))
    g = tmp_path / "g"
    assert call_main(main, "enroll", f"--gallery={g}", f"--model={smoke_run}",
                     f"--list={tmp_path / 'list.csv'}", "--aligned", "--keep_means") == 0
    loaded = Gallery.load(g)
    assert sorted(loaded.means.sums) == sorted(p["id"] for p in loaded.people.values())
    assert call_main(main, "list", f"--gallery={g}") == 0
    assert "sparse index with person means" in capsys.readouterr().out
    out = tmp_path / "out"
    assert call_main(main, "identify", f"--gallery={g}", f"--output={out}", "--aligned",
                     "--matching=centroid", "--score_threshold=0.99", *firsts) == 0
    for entry in _report(out):
        (face,) = entry["faces"]
        assert face["name"] == Path(entry["input"]).parent.name
        assert face["score"] == pytest.approx(1.0, abs=1e-4)
    # A gallery without means: centroid matching and --keep_means are one line each.
    assert_main_user_error(capsys, main, ["identify", f"--gallery={gallery}", f"--output={out}", "--aligned",
                                          "--matching=centroid", *firsts], "--keep_means")
    assert_main_user_error(capsys, main, ["enroll", f"--gallery={gallery}", f"--list={tmp_path / 'list.csv'}",
                                          "--aligned", "--keep_means"], "keeps no person means")


def test_dense_rerank_model_enrolled_and_used(gallery: Path, smoke_run: Path, people: Path,
                                              tflite_model: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """--rerank_model keeps a second model's embeddings (here the run's .tflite export, flip
    concat: 2 x 64-d) beside the sparse index and scores faces by them."""
    g, out = tmp_path / "g", tmp_path / "out"
    assert call_main(main, "enroll", f"--gallery={g}", f"--model={smoke_run}", f"--images={people}",
                     "--aligned", f"--rerank_model={tflite_model}") == 0
    loaded = Gallery.load(g)
    assert loaded.rerank.model == str(tflite_model) and loaded.rerank.embedding_size == 128
    assert loaded.dense.shape == (len(ENROLLED) * IMAGES, 128)
    np.testing.assert_allclose(np.linalg.norm(loaded.dense, axis=1), 1.0, atol=1e-5)
    capsys.readouterr()
    assert call_main(main, "list", f"--gallery={g}") == 0
    assert f"re-ranked by {tflite_model}" in capsys.readouterr().out
    assert call_main(main, "identify", f"--gallery={g}", f"--output={out}", "--aligned",
                     "--score_threshold=0.99", people / ENROLLED[1]) == 0
    for entry in _report(out):
        (face,) = entry["faces"]
        assert face["name"] == ENROLLED[1] and face["score"] == pytest.approx(1.0, abs=1e-4)
    assert_main_user_error(capsys, main, ["enroll", f"--gallery={gallery}", f"--images={people}", "--aligned",
                                          f"--rerank_model={tflite_model}"], "a new gallery's choice")


def test_bad_inputs_are_reported_or_one_line(gallery: Path, people: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    # A file that is not an image: skipped and named at enrol, an entry with an error at identify.
    bad = tmp_path / "bad"
    (bad / "zoe").mkdir(parents=True)
    (bad / "zoe" / "notes.txt").write_text("not an image")
    g = tmp_path / "g"
    shutil.copytree(gallery, g)
    assert_main_user_error(capsys, main, ["enroll", f"--gallery={g}", f"--images={bad}", "--aligned"],
                           "nothing to enrol", "notes.txt: not a decodable image")
    shutil.copy(people / ENROLLED[0] / "0.jpg", bad / "zoe" / "1.jpg")
    capsys.readouterr()
    assert call_main(main, "enroll", f"--gallery={g}", f"--images={bad}", "--aligned") == 0
    out = capsys.readouterr().out
    assert "skipped images" in out and "notes.txt" in out and "not a decodable image" in out
    assert Gallery.load(g).counts()["zoe"] == 1
    assert call_main(main, "identify", f"--gallery={g}", f"--output={tmp_path / 'out'}", "--aligned",
                     bad / "zoe" / "notes.txt") == 0
    assert _report(tmp_path / "out") == [{"input": str(bad / "zoe" / "notes.txt"), "faces": [],
                                          "error": "not a decodable image"}]
    # Pairs that name missing images; a gallery that does not exist; a missing input.
    (tmp_path / "pairs.txt").write_text("1 1\nzoe 1 2\nzoe 1 ann 1\n")
    assert_main_user_error(capsys, main, ["calibrate", f"--gallery={g}", f"--pairs={tmp_path / 'pairs.txt'}",
                                          f"--images={bad}", "--aligned"], "missing")
    assert_main_user_error(capsys, main, ["list", f"--gallery={tmp_path / 'none'}"], "is not a gallery")
    assert_main_user_error(capsys, main, ["identify", f"--gallery={g}", f"--output={tmp_path / 'o'}",
                                          tmp_path / "nothing.jpg"], "does not exist")


def test_tflite_model_without_tensorflow_and_the_fingerprint_refusal(
        gallery: Path, people: Path, tflite_model: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    g = tmp_path / "g"
    assert call_main(main, "enroll", f"--gallery={g}", f"--model={tflite_model}", f"--images={people}",
                     "--aligned", "--index_type=dense") == 0
    keras_fp, tflite_fp = Gallery.load(gallery).model.fingerprint, Gallery.load(g).model.fingerprint
    assert keras_fp != tflite_fp
    # The line names both models and both fingerprints (the .tflite one with the gallery's flip mode).
    assert_main_user_error(capsys, main, ["calibrate", f"--gallery={gallery}", f"--model={tflite_model}",
                                          f"--pairs={tmp_path / 'p.txt'}", f"--images={people}"], "not found")
    (tmp_path / "p.txt").write_text(f"1 1\n{ENROLLED[0]} 0 1\n{ENROLLED[0]} 0 {ENROLLED[1]} 0\n")
    assert_main_user_error(capsys, main, ["calibrate", f"--gallery={gallery}", f"--model={tflite_model}",
                                          f"--pairs={tmp_path / 'p.txt'}", f"--images={people}", "--aligned"],
                           f"fingerprint {keras_fp[:16]}", "model.tflite (fingerprint ")
    # The entry point as a process in which TensorFlow cannot be imported: identify with the
    # gallery's .tflite model.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    out = tmp_path / "out"
    proc = run_module("sparse_embed.app", "identify", f"--gallery={g}", f"--output={out}", "--aligned",
                      str(people / ENROLLED[2]), pythonpath=(site,))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(entry["faces"][0]["name"] == ENROLLED[2] for entry in _report(out))
    proc = run_module("sparse_embed.app", "identify", f"--gallery={g}", f"--output={out}",
                      str(people / ENROLLED[2]), pythonpath=(site,))
    assert_user_error(proc, "--mtcnn=DIR")


def test_astronaut_is_detected_enrolled_and_identified(smoke_run: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A real photograph through the mtcnn package's MTCNN: one face, passing the quality gate's
    detection bars, enrolled and found again; a photograph without a face in the person's folder
    is reported and skipped; a size bar above the face refuses it."""
    folder = tmp_path / "people" / "eileen"
    folder.mkdir(parents=True)
    cv2.imwrite(str(folder / "astronaut.png"), cv2.cvtColor(skimage_data.astronaut(), cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(folder / "coffee.png"), cv2.cvtColor(skimage_data.coffee(), cv2.COLOR_RGB2BGR))
    g, out = tmp_path / "g", tmp_path / "out"
    # Every detection bar of the quality gate, set below the astronaut's face but above a bad one.
    assert call_main(main, "enroll", f"--gallery={g}", f"--model={smoke_run}",
                     f"--images={tmp_path / 'people'}", "--min_face_px=40", "--min_detector_score=0.9",
                     "--check_landmarks") == 0
    assert Gallery.load(g).people["eileen"]["images"] == [str(folder / "astronaut.png")]
    assert call_main(main, "identify", f"--gallery={g}", f"--output={out}", folder / "astronaut.png") == 0
    (face,) = _report(out)[0]["faces"]
    assert face["name"] == "eileen" and face["score"] == pytest.approx(1.0, abs=1e-4)
    x1, y1, x2, y2 = face["box"]
    # The face of the 512x512 photograph is near (170-260, 80-200) (test_edge's detections).
    assert 150 < x1 < x2 < 300 and 50 < y1 < y2 < 250
    # A face smaller than the bar: refused with the reason, nothing enrolled.
    assert_main_user_error(capsys, main, ["enroll", f"--gallery={tmp_path / 'g2'}", f"--model={smoke_run}",
                                          f"--images={tmp_path / 'people'}", "--min_face_px=400"],
                           "nothing to enrol", "below --min_face_px=400")
    assert not (tmp_path / "g2" / "gallery.json").exists()


def test_identify_aligns_on_landnet_points(gallery: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`identify --landmarks=landnet` on the astronaut photograph: MTCNN's box, and the five
    points of a Landnet (trained two steps on synthetic faces) on that box, which the face's
    alignment uses, are what the report gives."""
    from sparse_embed.data.synthetic import generate
    from sparse_embed.errors import ConfigError
    from sparse_embed.landmarks.config import LandmarksConfig
    from sparse_embed.landmarks.predict import Landmarker
    from sparse_embed.landmarks.training import train

    generate(tmp_path / "data", 4, 2, 2, image_size=48, pairs_per_fold=1, landmarks=True)
    landnet = tmp_path / "landnet"
    train(LandmarksConfig(steps=2, batch_size=8), tmp_path / "data", landnet)
    photo = tmp_path / "astronaut.png"
    cv2.imwrite(str(photo), cv2.cvtColor(skimage_data.astronaut(), cv2.COLOR_RGB2BGR))
    out = tmp_path / "out"
    assert call_main(main, "identify", f"--gallery={gallery}", f"--output={out}", "--landmarks=landnet",
                     f"--landnet={landnet}", photo) == 0
    (face,) = _report(out)[0]["faces"]
    x1, y1, x2, y2 = face["box"]
    # The face of the 512x512 photograph is near (170-260, 80-200) (test_edge's detections).
    assert 150 < x1 < x2 < 300 and 50 < y1 < y2 < 250
    expected = Landmarker.load(landnet)(skimage_data.astronaut(), (x1, y1, x2 - x1, y2 - y1))
    np.testing.assert_allclose(face["landmarks"], expected, atol=0.05)
    assert (out / _report(out)[0]["annotated"]).is_file()
    # Landnet without a network is one line; a network path that is neither kind is refused.
    assert_main_user_error(capsys, main, ["identify", f"--gallery={gallery}", f"--output={out}",
                                          "--landmarks=landnet", photo], "needs --landnet")
    with pytest.raises(ConfigError, match="neither a landmarks run directory nor a .tflite file"):
        Landmarker.load(tmp_path / "none")


def test_quality_gate_on_aligned_crops(gallery: Path, people: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """An aligned crop's face is the whole image (112 px here): a size bar refuses it with the
    reason in the summary; --min_confidence needs a model that predicts one (the smoke run does not)."""
    g = tmp_path / "g"
    shutil.copytree(gallery, g)
    mixed = tmp_path / "mixed"
    (mixed / "zoe").mkdir(parents=True)
    shutil.copy(people / ENROLLED[0] / "0.jpg", mixed / "zoe" / "big.jpg")
    cv2.imwrite(str(mixed / "zoe" / "small.jpg"), cv2.resize(cv2.imread(str(people / ENROLLED[0] / "1.jpg")),
                                                               (48, 48)))
    capsys.readouterr()
    assert call_main(main, "enroll", f"--gallery={g}", f"--images={mixed}", "--aligned",
                     "--min_face_px=64") == 0
    out = capsys.readouterr().out
    assert "small.jpg" in out and "face 48 px, below --min_face_px=64" in out and "big.jpg" not in out
    assert Gallery.load(g).people["zoe"]["images"] == [str(mixed / "zoe" / "big.jpg")]
    enroll = ["enroll", f"--gallery={g}", f"--images={mixed}", "--aligned"]
    assert_main_user_error(capsys, main, [*enroll, "--min_confidence=0"],
                           "--min_confidence needs a model that predicts")
    assert_main_user_error(capsys, main, [*enroll, "--min_detector_score=2"],
                           "--min_detector_score must lie in [0, 1]")


def _snapshot(directory: Path) -> dict:
    """What a reader of the gallery sees: its manifest, (row, person) table and index row ids."""
    loaded = Gallery.load(directory)
    return {"manifest": loaded.manifest(), "rows": loaded.rows.tolist(), "ids": loaded.index.ids.tolist()}


@pytest.mark.slow
def test_kill_9_during_an_enrol_leaves_the_previous_or_the_new_gallery(
        people: Path, tiny_data: Path, tflite_model: Path, tmp_path: Path) -> None:
    """`enroll` as a real process, killed with SIGKILL at random moments: once anywhere in its run,
    and several times while it writes the new state. Each time the gallery loads and equals the
    previous state or the completed enrol's, never a part of the enrol. The .tflite model keeps
    TensorFlow out of the process, so it starts fast and the kills land in the enrol."""
    base = tmp_path / "base"
    assert call_main(main, "enroll", f"--gallery={base}", f"--model={tflite_model}", f"--images={people}",
                     "--aligned") == 0
    # Filler rows (sparse, as a relu embedding's) make the state worth writing: the window a kill
    # must not tear.
    filler = Gallery.load(base)
    rng = np.random.default_rng(0)
    rows = np.zeros((5000, filler.model.embedding_size), np.float32)
    rows[np.arange(len(rows))[:, None], rng.integers(0, rows.shape[1], (len(rows), 8))] = 1.0
    filler.enroll("filler", rows / np.linalg.norm(rows, axis=1, keepdims=True), ["filler.jpg"] * len(rows))
    filler.save()
    more = tmp_path / "more"
    for person in sorted(p.name for p in (tiny_data / "train").iterdir())[4:]:
        for copy in range(8):  # each image eight times: an enrol that lasts
            for image in (tiny_data / "train" / person).iterdir():
                (more / person).mkdir(parents=True, exist_ok=True)
                shutil.copy(image, more / person / f"{copy}-{image.name}")
    command = [sys.executable, "-m", "sparse_embed.app", "enroll", "--images", str(more), "--aligned"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def start(gallery: Path) -> subprocess.Popen:
        shutil.copytree(base, gallery)
        return subprocess.Popen([*command, f"--gallery={gallery}"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    started = time.monotonic()
    done = start(tmp_path / "done")
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err[-3000:]
    duration = time.monotonic() - started
    before, after = _snapshot(base), _snapshot(tmp_path / "done")
    assert before != after

    def kill_and_check(gallery: Path, proc: subprocess.Popen) -> None:
        proc.kill()
        proc.wait(timeout=60)
        assert _snapshot(gallery) in (before, after)

    # Anywhere in the run.
    gallery = tmp_path / "anywhere"
    proc = start(gallery)
    time.sleep(rng.uniform(0.1, 0.9) * duration)
    kill_and_check(gallery, proc)
    # While the new state is written: from when its directory appears to a random moment after.
    for trial in range(2):
        gallery = tmp_path / f"saving{trial}"
        proc = start(gallery)
        states = {p.name for p in gallery.glob("state-*")}
        while proc.poll() is None and {p.name for p in gallery.glob("state-*")} == states:
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.2))
        kill_and_check(gallery, proc)
        # The interrupted gallery takes the next enrol (a leftover state is cleaned away).
        if trial == 0:
            assert call_main(main, "enroll", f"--gallery={gallery}", f"--images={people}", "--aligned") == 0
            assert len(list(gallery.glob("state-*"))) == 1


def _insightface_photo(name: str) -> Path:
    """A photograph the insightface wheel ships (installed with --no-deps by `make install`)."""
    spec = importlib.util.find_spec("insightface")
    path = None if spec is None else Path(spec.submodule_search_locations[0]) / "data" / "images" / name
    if path is None or not path.is_file():
        missing_dependency("insightface's photographs are not installed; run `make install` "
                           "(pip install --no-deps insightface==2.1)")
    return path


def test_six_people_photograph(smoke_run: Path, tmp_path: Path) -> None:
    """insightface's t1.jpg, six people: six faces found, all `unknown` in a gallery with nobody in
    it; one face enrolled from a crop of the photograph (found again by detection in the crop) is
    then named, on that face only. MTCNN also scores a 14x17-pixel patch at about 0.82, which the
    size and score bars leave out. The smoke run is not trained on real faces: this checks
    detection, alignment and the gallery, not the model."""
    from sparse_embed.app.embedder import load_embedder

    photo = _insightface_photo("t1.jpg")
    g, empty_out = tmp_path / "g", tmp_path / "empty"
    embedder = load_embedder(smoke_run)
    Gallery.create(g, ModelRecord(embedder.fingerprint, str(smoke_run), None, embedder.width, embedder.height,
                                  embedder.embedding_size, embedder.flip, "sparse")).save()
    bars = ["--min_face_px=40", "--min_detector_score=0.9"]
    assert call_main(main, "identify", f"--gallery={g}", f"--output={empty_out}", *bars, photo) == 0
    faces = _report(empty_out)[0]["faces"]
    assert len(faces) == 6 and all(face["name"] == "unknown" for face in faces)
    # Six distinct faces: no two boxes overlap.
    boxes = np.array([face["box"] for face in faces])
    for i in range(6):
        for j in range(i + 1, 6):
            assert _iou(boxes[i], boxes[j]) == 0.0
    # Enrol the left-most face from a crop around it (twice its box, within the photograph).
    target = int(np.argmin(boxes[:, 0]))
    x1, y1, x2, y2 = boxes[target]
    image = cv2.imread(str(photo))
    w, h = x2 - x1, y2 - y1
    top, left = max(0, int(y1 - h / 2)), max(0, int(x1 - w / 2))
    crop = image[top:int(y2 + h / 2), left:int(x2 + w / 2)]
    (tmp_path / "people" / "kim").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "people" / "kim" / "crop.png"), crop)
    assert call_main(main, "enroll", f"--gallery={g}", f"--images={tmp_path / 'people'}") == 0
    out = tmp_path / "out"
    assert call_main(main, "identify", f"--gallery={g}", f"--output={out}", "--score_threshold=0.9", *bars,
                     photo) == 0
    faces = _report(out)[0]["faces"]
    named = [face for face in faces if face["name"] != "unknown"]
    assert len(faces) == 6 and len(named) == 1 and named[0]["name"] == "kim"
    assert _iou(np.array(named[0]["box"]), boxes[target]) > 0.9


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
