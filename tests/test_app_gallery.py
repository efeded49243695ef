"""The app's gallery logic without a model: the dense store, per-person matching, one-to-one
assignment, calibration, atomic saves and the enrolment quality gate (sparse_embed.app.store,
gallery, identify, quality)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sparse_embed.app import gallery as gallery_module
from sparse_embed.app.gallery import Gallery, ModelRecord, RerankRecord, calibration_from_scores
from sparse_embed.app.identify import Settings, assign, match_faces
from sparse_embed.app.quality import QualityGate, landmark_problem
from sparse_embed.app.store import DenseIndex
from sparse_embed.errors import ConfigError, DataError

pytestmark = pytest.mark.unit

DIM = 8


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _record(index_type: str = "dense", fingerprint: str = "a" * 64) -> ModelRecord:
    return ModelRecord(fingerprint, "runs/model", None, 32, 32, DIM, "none", index_type)


def test_assignment_is_one_to_one_and_maximises_the_total() -> None:
    # Greedy by face would give face 0 its best (person 0, 0.9) and leave face 1 with 0.1 (below
    # the threshold): 0.9 in all. The assignment gives person 0 to face 1 and person 1 to face 0:
    # 0.95 + 0.8. Face 2 scores below the threshold everywhere: unknown.
    scores = np.array([[0.9, 0.8, 0.0],
                       [0.95, 0.1, 0.2],
                       [0.3, 0.4, 0.45]])
    assert assign(scores, 0.5) == [1, 0, None]
    # More faces than people: each person at most once.
    assert assign(np.array([[0.9], [0.8]]), 0.5) == [0, None]
    assert assign(np.zeros((0, 3)), 0.5) == [] and assign(np.zeros((2, 0)), 0.5) == [None, None]
    # Strictly above the threshold.
    assert assign(np.array([[0.5]]), 0.5) == [None]


def test_dense_index_is_exact_and_persists(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = _unit(rng.normal(size=(20, DIM)))
    index = DenseIndex(DIM)
    np.testing.assert_array_equal(index.add(rows[:10]), np.arange(10))
    np.testing.assert_array_equal(index.add(rows[10:]), np.arange(10, 20))
    index.remove([3, 7])
    queries = _unit(rng.normal(size=(5, DIM)))
    ids, scores = index.search(queries, 4)
    live = np.setdiff1d(np.arange(20), [3, 7])
    brute = queries @ rows[live].T
    np.testing.assert_array_equal(ids, live[np.argsort(-brute, axis=1, kind="stable")[:, :4]])
    np.testing.assert_allclose(scores, -np.sort(-brute, axis=1)[:, :4], rtol=1e-6)
    # More results than rows: padded; a threshold leaves rows out.
    ids, scores = index.search(queries[:1], 30, threshold=0.0)
    assert (ids[0, 18:] == -1).all() and np.isneginf(scores[0, 18:]).all()
    assert (scores[0][ids[0] >= 0] > 0).all()
    index.save(tmp_path / "dense")
    loaded = DenseIndex.load(tmp_path / "dense")
    np.testing.assert_array_equal(loaded.ids, live)
    np.testing.assert_array_equal(loaded.search(queries, 4)[0], index.search(queries, 4)[0])
    # Removed ids are never reused.
    assert loaded.add(rows[:1])[0] == 20
    with pytest.raises(ValueError, match="not in the index"):
        loaded.remove([3])
    with pytest.raises(DataError, match="no readable dense index"):
        DenseIndex.load(tmp_path / "missing")


@pytest.mark.parametrize("index_type", ["dense", "sparse"])
def test_person_scores_best_and_mean(tmp_path: Path, index_type: str) -> None:
    """Against a NumPy per-person maximum and mean of the top 2 of each person's embeddings."""
    rng = np.random.default_rng(1)
    # Non-negative rows, so the sparse index holds the same values as the dense one.
    rows = _unit(np.abs(rng.normal(size=(7, DIM))))
    owners = ["ann", "ann", "ann", "bob", "bob", "cy", "ann"]
    gallery = Gallery.create(tmp_path / "g", _record(index_type))
    for name in ("ann", "bob", "cy"):
        mine = [i for i, o in enumerate(owners) if o == name]
        gallery.enroll(name, rows[mine], [f"{name}/{i}.jpg" for i in mine])
    queries = _unit(np.abs(rng.normal(size=(3, DIM))))
    names, best = gallery.person_scores(queries, "best")
    _, mean = gallery.person_scores(queries, "mean", mean_of=2)
    assert names == ["ann", "bob", "cy"]
    full = queries @ rows.T
    for j, name in enumerate(names):
        mine = full[:, [i for i, o in enumerate(owners) if o == name]]
        np.testing.assert_allclose(best[:, j], mine.max(axis=1), rtol=1e-5)
        top = -np.sort(-mine, axis=1)[:, :2]
        np.testing.assert_allclose(mean[:, j], top.mean(axis=1), rtol=1e-5)
    with pytest.raises(ConfigError, match="matching must be one of"):
        gallery.person_scores(queries, "vote")


def test_dense_index_breaks_ties_by_id_at_the_cut() -> None:
    # Five equal rows around the k-th place: the lower ids win, whatever order they were added in.
    index = DenseIndex(2)
    index.add(np.array([[1, 0], [0.6, 0.8], [0.6, 0.8], [0, 1], [0.6, 0.8]], np.float32), ids=[9, 4, 7, 2, 5])
    ids, scores = index.search(np.array([[0.6, 0.8]], np.float32), 3)
    np.testing.assert_array_equal(ids, [[4, 5, 7]])
    ids, scores = index.search(np.array([[0.6, 0.8]], np.float32), 7, threshold=0.7)
    np.testing.assert_array_equal(ids, [[4, 5, 7, 2, -1, -1, -1]])
    assert np.isneginf(scores[0, 4:]).all()


@pytest.mark.parametrize("index_type", ["dense", "sparse"])
def test_matching_ranks_few_rows_and_answers_as_all_rows_do(tmp_path: Path, index_type: str) -> None:
    """`match_faces` ranks (F - 1) x R + 1 rows per face (F faces, at most R rows per person), not
    every row: its names and scores equal the assignment over every person's full score."""
    rng = np.random.default_rng(4)
    gallery = Gallery.create(tmp_path / index_type, _record(index_type))
    centres = np.abs(rng.normal(size=(30, DIM))) if index_type == "sparse" else rng.normal(size=(30, DIM))
    for person in range(30):
        count = 1 + person % 4  # 1 to 4 rows a person: R = 4
        rows = centres[person] + 0.6 * rng.normal(size=(count, DIM))
        gallery.enroll(f"p{person}", _unit(np.maximum(rows, 0) if index_type == "sparse" else rows),
                       ["x.jpg"] * count)
    assert gallery.most_rows_per_person() == 4
    for faces in (1, 3, 5):
        queries = centres[rng.choice(30, faces, replace=False)] + 0.6 * rng.normal(size=(faces, DIM))
        queries = _unit(np.maximum(queries, 0) if index_type == "sparse" else queries)
        names, full = gallery.person_scores(queries, "best", candidates=len(gallery.rows))
        for threshold in (-2.0, 0.3, 0.6):
            chosen = assign(full, threshold)
            got = match_faces(queries, gallery, Settings(threshold=threshold))
            for i, person in enumerate(chosen):
                free = np.ones(len(names), bool)
                free[[c for c in chosen if c is not None]] = False
                expected = full[i, person] if person is not None else full[i, free].max()
                assert got[i]["name"] == (names[person] if person is not None else "unknown")
                assert got[i]["score"] == pytest.approx(float(expected), abs=1e-6)


def test_calibration_threshold_and_far_of_a_score() -> None:
    # 4 different pairs (0.1, 0.2, 0.3, 0.6) and 3 same ones (0.5, 0.7, 0.9).
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.5, 0.7, 0.9])
    issame = np.array([False] * 4 + [True] * 3)
    calibration = calibration_from_scores(scores, issame, 0.25, "pairs.txt")
    # FAR <= 0.25 accepts at most one different pair: the lowest such threshold lies between 0.3
    # and the next score, 0.5 (the ROC curve's thresholds lie midway), accepting 0.6 only, and the
    # three same pairs (0.5, 0.7, 0.9) all score above it.
    assert calibration.threshold == pytest.approx(0.4)
    assert calibration.far == pytest.approx(0.25) and calibration.tar == 1.0
    # A score's FAR: the fraction of different pairs scoring at least as high.
    np.testing.assert_allclose(calibration.far_of([0.05, 0.1, 0.25, 0.6, 0.65, 1.0]),
                               [1.0, 1.0, 0.5, 0.25, 0.0, 0.0])
    # A FAR the pairs cannot measure: above every different pair.
    strict = calibration_from_scores(scores, issame, 1e-3, "pairs.txt")
    assert strict.threshold >= 0.6 and strict.far == 0.0
    with pytest.raises(ConfigError, match="--far must lie in"):
        calibration_from_scores(scores, issame, 0.0, "pairs.txt")


def _snapshot(directory: Path) -> dict:
    g = Gallery.load(directory)
    return {"manifest": g.manifest(), "rows": g.rows.tolist(), "ids": g.index.ids.tolist()}


@pytest.mark.parametrize("index_type", ["dense", "sparse"])
def test_gallery_round_trip_incremental_remove_and_atomic_failure(tmp_path: Path, index_type: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    directory = tmp_path / "g"
    gallery = Gallery.create(directory, _record(index_type))
    gallery.enroll("ann", _unit(np.abs(rng.normal(size=(2, DIM)))), ["a1.jpg", "a2.jpg"])
    gallery.save()
    gallery = Gallery.load(directory)
    gallery.enroll("bob", _unit(np.abs(rng.normal(size=(1, DIM)))), ["b1.jpg"])
    gallery.enroll("ann", _unit(np.abs(rng.normal(size=(1, DIM)))), ["a3.jpg"])
    gallery.save()
    assert Gallery.load(directory).counts() == {"ann": 3, "bob": 1}
    assert Gallery.load(directory).people["ann"]["images"] == ["a1.jpg", "a2.jpg", "a3.jpg"]
    before = _snapshot(directory)
    assert len(list(directory.glob("state-*"))) == 1

    # A failure in the middle of writing the new state (after the index, before the rows):
    # the previous state stays current and loads unchanged; the partial state is gone.
    gallery = Gallery.load(directory)
    gallery.enroll("cy", _unit(np.abs(rng.normal(size=(2, DIM)))), ["c1.jpg", "c2.jpg"])

    def broken(path: Path, array: np.ndarray) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(gallery_module, "_save_npy", broken)
    with pytest.raises(OSError, match="disk full"):
        gallery.save()
    monkeypatch.undo()
    assert _snapshot(directory) == before
    assert len(list(directory.glob("state-*"))) == 1

    # A crash that left a complete but unreferenced state behind: ignored, cleaned by the next save.
    (directory / "state-deadbeef0000").mkdir()
    assert _snapshot(directory) == before
    gallery = Gallery.load(directory)
    assert gallery.remove("ann") == 3
    gallery.save()
    assert Gallery.load(directory).counts() == {"bob": 1}
    assert [p.name for p in directory.glob("state-*")] == [json.loads(
        (directory / "gallery.json").read_text())["state"]]
    with pytest.raises(DataError, match="no person 'zed'"):
        Gallery.load(directory).remove("zed")


@pytest.mark.parametrize("index_type", ["dense", "sparse"])
def test_person_means_follow_enrolment_removal_and_reload(tmp_path: Path, index_type: str) -> None:
    """Each kept mean is the NumPy mean of the person's stored rows, renormalised, through
    incremental enrolments, a removal and reloads; `centroid` scores are the cosines to it."""
    rng = np.random.default_rng(5)
    directory = tmp_path / "g"
    gallery = Gallery.create(directory, _record(index_type), keep_means=True)
    stored: dict[str, list[np.ndarray]] = {}

    def enrol(name: str, n: int) -> None:
        rows = _unit(np.abs(rng.normal(size=(n, DIM))))
        gallery.enroll(name, rows, [f"{name}{k}.jpg" for k in range(n)])
        stored.setdefault(name, []).extend(rows)

    def expected(name: str) -> np.ndarray:
        mean = np.mean(stored[name], axis=0)
        return mean / np.linalg.norm(mean)

    def check(g: Gallery) -> None:
        assert sorted(g.means.sums) == sorted(g.people[name]["id"] for name in stored)
        for name in stored:
            np.testing.assert_allclose(g.means.mean(g.people[name]["id"]), expected(name), atol=1e-6)
        queries = _unit(np.abs(rng.normal(size=(3, DIM))))
        names, scores = g.person_scores(queries, "centroid")
        assert names == [n for n in sorted(stored, key=lambda n: g.people[n]["id"])]
        oracle = queries @ np.stack([expected(n) for n in names]).T
        np.testing.assert_allclose(scores, oracle, atol=1e-5)

    enrol("ann", 3)
    enrol("bob", 2)
    check(gallery)
    gallery.save()
    gallery = Gallery.load(directory)
    check(gallery)
    enrol("ann", 2)  # incremental: ann's mean moves, bob's stays
    enrol("cy", 1)
    check(gallery)
    gallery.save()
    gallery = Gallery.load(directory)
    gallery.remove("bob")
    del stored["bob"]
    check(gallery)
    gallery.save()
    gallery = Gallery.load(directory)
    check(gallery)
    assert sorted(gallery.means.index.ids) == sorted(gallery.people[n]["id"] for n in stored)
    # An image's faces matched on the means: each face named after its person's mean.
    faces = np.stack([expected("cy"), expected("ann")])
    assert [m["name"] for m in match_faces(faces, gallery, Settings(matching="centroid", threshold=0.5))] \
        == ["cy", "ann"]
    # A gallery that keeps no means refuses centroid matching in one line.
    plain = Gallery.create(tmp_path / "plain", _record(index_type))
    plain.enroll("ann", _unit(np.abs(rng.normal(size=(1, DIM)))), ["a.jpg"])
    assert plain.means is None and plain.manifest()["means"] is None
    with pytest.raises(ConfigError, match="--keep_means"):
        plain.person_scores(faces, "centroid")


def test_dense_rerank_vectors_are_kept_and_rank_the_people(tmp_path: Path) -> None:
    """A sparse gallery with a re-rank model keeps each row's dense vector by row id (through
    incremental enrolment, removal and reloads) and scores people by the dense cosines, against
    a NumPy per-person maximum and top-2 mean of them (every row is a candidate here)."""
    rng = np.random.default_rng(7)
    dense_dim = 6
    directory = tmp_path / "g"
    rerank = RerankRecord("d" * 64, "runs/dense", dense_dim, "none")
    gallery = Gallery.create(directory, _record("sparse"), rerank=rerank)
    stored: dict[str, list[np.ndarray]] = {}

    def faces(n: int) -> np.ndarray:
        return np.concatenate([_unit(np.abs(rng.normal(size=(n, DIM)))),
                               _unit(rng.normal(size=(n, dense_dim)))], axis=1)

    def enrol(name: str, n: int) -> None:
        rows = faces(n)
        gallery.enroll(name, rows, [f"{name}{k}.jpg" for k in range(n)])
        stored.setdefault(name, []).extend(rows)

    def check(g: Gallery) -> None:
        for name, rows in stored.items():
            ids = g.rows[g.rows[:, 1] == g.people[name]["id"], 0]
            np.testing.assert_array_equal(g.dense[ids], np.asarray(rows)[:, DIM:])
        queries = faces(4)
        names, best = g.person_scores(queries, "best")
        _, mean = g.person_scores(queries, "mean", mean_of=2)
        for column, name in enumerate(names):
            cosines = queries[:, DIM:] @ np.asarray(stored[name])[:, DIM:].T
            np.testing.assert_allclose(best[:, column], cosines.max(axis=1), atol=1e-5)
            top2 = -np.sort(-cosines, axis=1)[:, :2]
            np.testing.assert_allclose(mean[:, column], top2.mean(axis=1), atol=1e-5)

    enrol("ann", 3)
    enrol("bob", 2)
    check(gallery)
    gallery.save()
    gallery = Gallery.load(directory)
    assert gallery.rerank == rerank
    enrol("ann", 1)
    enrol("cy", 2)
    check(gallery)
    gone = gallery.rows[gallery.rows[:, 1] == gallery.people["bob"]["id"], 0]
    gallery.remove("bob")
    del stored["bob"]
    assert not gallery.dense[gone].any()  # a removed person's vectors do not stay behind
    gallery.save()
    gallery = Gallery.load(directory)
    check(gallery)
    # An image's face named by the dense model: its dense part is one of cy's rows, its sparse
    # part another person's.
    face = np.concatenate([np.asarray(stored["ann"])[0, :DIM], np.asarray(stored["cy"])[1, DIM:]])[None]
    (match,) = match_faces(face, gallery, Settings(threshold=0.5))
    assert match["name"] == "cy" and match["score"] == pytest.approx(1.0, abs=1e-5)
    a, b = faces(3), faces(3)
    np.testing.assert_allclose(gallery.pair_scores(a, b), np.sum(a[:, DIM:] * b[:, DIM:], axis=1), atol=1e-6)
    with pytest.raises(ValueError, match=f"shape \\[n, {DIM + dense_dim}\\]"):
        gallery.enroll("dee", faces(1)[:, :DIM], ["d.jpg"])
    with pytest.raises(ConfigError, match="index is dense"):
        Gallery.create(tmp_path / "d", _record("dense"), rerank=rerank)
    with pytest.raises(ConfigError, match="do not go together"):
        Gallery.create(tmp_path / "m", _record("sparse"), keep_means=True, rerank=rerank)


def test_a_gallery_refuses_another_model(tmp_path: Path) -> None:
    gallery = Gallery.create(tmp_path / "g", _record(fingerprint="a" * 64))
    gallery.check_model("a" * 64, "runs/model")
    with pytest.raises(ConfigError) as error:
        gallery.check_model("b" * 64, "other.tflite")
    message = str(error.value)
    assert "\n" not in message and "a" * 16 in message and "b" * 16 in message and "other.tflite" in message


def test_what_is_not_a_gallery(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a gallery"):
        Gallery.load(tmp_path)
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "x.txt").write_text("x")
    with pytest.raises(DataError, match="exists and is not a gallery"):
        Gallery.create(tmp_path / "occupied", _record())


# A frontal face in the box (0, 0, 100, 120): eyes, nose tip, mouth corners (image order).
FRONTAL = np.array([[30.0, 45.0], [70.0, 45.0], [50.0, 65.0], [35.0, 90.0], [65.0, 90.0]])


@pytest.mark.parametrize(("change", "problem"), [
    (None, None),
    ({0: (-30.0, 45.0)}, "outside the face box"),
    ({0: (75.0, 45.0)}, "left-right order"),
    ({2: (50.0, 95.0)}, "eyes above nose above mouth"),
    ({0: (45.0, 45.0), 1: (55.0, 45.0)}, "turned aside"),
])
def test_landmark_check(change: dict | None, problem: str | None) -> None:
    points = FRONTAL.copy()
    for row, point in (change or {}).items():
        points[row] = point
    found = landmark_problem(points, (0.0, 0.0, 100.0, 120.0))
    assert found is None if problem is None else problem in found


def test_quality_gate_bars_and_their_reasons() -> None:
    box = (10.0, 20.0, 50.0, 70.0)  # 40 x 50: the shorter side is 40
    assert QualityGate().face_problem(box, FRONTAL, 0.5) is None
    assert QualityGate(min_face_px=40).face_problem(box, FRONTAL, 0.5) is None
    assert "face 40 px, below --min_face_px=41" in QualityGate(min_face_px=41).face_problem(box, FRONTAL, 0.5)
    low = QualityGate(min_detector_score=0.9).face_problem(box, FRONTAL, 0.5)
    assert "detector score 0.500, below --min_detector_score=0.9" in low
    big = (0.0, 0.0, 100.0, 120.0)
    assert QualityGate(check_landmarks=True).face_problem(big, FRONTAL, 1.0) is None
    assert "outside" in QualityGate(check_landmarks=True).face_problem(box, FRONTAL + 200, 1.0)
    gate = QualityGate(min_confidence=-1.5)
    assert gate.confidence_problem(-1.5) is None
    assert "confidence -2.000, below --min_confidence=-1.5" in gate.confidence_problem(-2.0)
    assert gate.confidence_problem(float("nan")) is not None  # no confidence never passes a bar
    for bad, match in (({"min_face_px": 0}, "--min_face_px must be > 0"),
                       ({"min_detector_score": 1.5}, r"--min_detector_score must lie in \[0, 1\]"),
                       ({"min_confidence": float("inf")}, "--min_confidence must be finite")):
        with pytest.raises(ConfigError, match=match):
            QualityGate(**bad)
