"""`identify` on videos: the IoU tracker, one identity per track, the annotated video, the timeline.

The clip is synthetic: two faces of the synthetic generator (drawn at 112 pixels, a size MTCNN
finds them at) pasted onto a grey background and moving a few pixels per frame, one of them only
in part of the clip. The gallery enrols each face from a still of it (detected and aligned as the
video's frames are), beside decoy people enrolled from aligned crops. The smoke run is trained for
a few steps and does not tell identities apart reliably, so what the round trip proves is the
video path: decoding, detection per frame, tracking (one track id per face across frames),
per-track naming (a face's own still scores near 1), the report's frame/track fields, the
annotated video and the timeline's times; not the model's accuracy.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import call_main

from sparse_embed.app.__main__ import main
from sparse_embed.app.video import IoUTracker, assign_tracks, iou
from sparse_embed.data.synthetic import render_image

pytestmark = pytest.mark.integration

FPS = 8.0
FRAMES = 16
SIZE = (320, 240)  # width, height
FACE = 112
# (name, synthetic identity, image index, first frame, last frame, x of frame 0, y, x step per frame)
PEOPLE = (("alice", 5, 0, 0, 15, 20, 40, 3), ("bob", 6, 1, 4, 13, 200, 60, -3))


def _face(identity: int, image: int) -> np.ndarray:
    return render_image(0, identity, image, FACE)


def _frame(index: int) -> np.ndarray:
    """RGB frame `index` of the clip."""
    frame = np.full((SIZE[1], SIZE[0], 3), 90, np.uint8)
    for _, identity, image, first, last, x, y, step in PEOPLE:
        if first <= index <= last:
            left = x + step * index
            frame[y:y + FACE, left:left + FACE] = _face(identity, image)
    return frame


def _write(path: Path, fourcc: str, frames: list[np.ndarray]) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), FPS, SIZE)
    assert writer.isOpened()
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


def _frame_count(path: Path) -> int:
    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clip")
    _write(root / "door.avi", "MJPG", [_frame(i) for i in range(FRAMES)])
    return root / "door.avi"


@pytest.fixture(scope="module")
def video_gallery(smoke_run: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """alice and bob from a still each (detected), and two decoys from aligned crops."""
    root = tmp_path_factory.mktemp("video_people")
    for name, identity, image, *_ in PEOPLE:
        (root / "stills" / name).mkdir(parents=True)
        still = np.full((SIZE[1], SIZE[0], 3), 90, np.uint8)
        still[60:60 + FACE, 100:100 + FACE] = _face(identity, image)
        cv2.imwrite(str(root / "stills" / name / "0.png"), cv2.cvtColor(still, cv2.COLOR_RGB2BGR))
    for decoy in ("id_00000", "id_00001"):
        shutil.copytree(tiny_data / "train" / decoy, root / "decoys" / decoy)
    gallery = root / "g"
    assert call_main(main, "enroll", f"--gallery={gallery}", f"--model={smoke_run}",
                     f"--images={root / 'stills'}") == 0
    assert call_main(main, "enroll", f"--gallery={gallery}", f"--images={root / 'decoys'}", "--aligned") == 0
    return gallery


def test_video_round_trip(video_gallery: Path, clip: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert call_main(main, "identify", f"--gallery={video_gallery}", f"--output={out}", clip) == 0
    assert "tracks" in capsys.readouterr().out
    (entry,) = json.loads((out / "report.json").read_text())
    assert entry["input"] == str(clip) and entry["frames"] == FRAMES and entry["fps"] == FPS
    tracks: dict[int, list[dict]] = {}
    for face in entry["faces"]:
        assert set(face) >= {"box", "name", "score", "far", "frame", "track"}
        tracks.setdefault(face["track"], []).append(face)
    # Two tracks, one per person, in order of appearance; each face keeps its track in every frame
    # it is found in, and that track's one name.
    assert sorted(tracks) == [0, 1]
    for track, (name, _, _, first, last, x, y, step) in zip((0, 1), PEOPLE, strict=True):
        faces = tracks[track]
        assert {face["name"] for face in faces} == {name}
        frames = [face["frame"] for face in faces]
        assert frames == sorted(set(frames)) and set(frames) <= set(range(first, last + 1))
        assert len(frames) >= (last - first + 1) - 2, frames
        for face in faces:  # the box follows the face
            x1, y1, x2, y2 = face["box"]
            assert abs((x1 + x2) / 2 - (x + step * face["frame"] + FACE / 2)) < FACE / 4
            assert abs((y1 + y2) / 2 - (y + FACE / 2)) < FACE / 4
        assert min(face["score"] for face in faces) > 0.9
    # One person at most once per frame.
    for frame in range(FRAMES):
        names = [face["name"] for face in entry["faces"] if face["frame"] == frame]
        assert len(names) == len(set(names))
    # The timeline: first and last times of the frames the faces are found in.
    timeline = {row["track"]: row for row in entry["timeline"]}
    with open(out / entry["timeline_csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert entry["timeline_csv"] == "door.timeline.csv" and len(rows) == 2
    for row in rows:
        track = int(row["track"])
        frames = [face["frame"] for face in tracks[track]]
        assert row["name"] == timeline[track]["name"] == PEOPLE[track][0]
        assert float(row["first_s"]) == timeline[track]["first_s"] == pytest.approx(min(frames) / FPS)
        assert float(row["last_s"]) == timeline[track]["last_s"] == pytest.approx(max(frames) / FPS)
        assert int(row["faces"]) == len(frames) and float(row["score"]) > 0.9
    assert tracks[0][0]["frame"] == 0 and tracks[0][-1]["frame"] == FRAMES - 1
    # The annotated video: the input's container, every frame, boxes drawn on the faces' frames.
    assert entry["annotated"] == "annotated/door.avi"
    assert _frame_count(out / entry["annotated"]) == FRAMES
    capture = cv2.VideoCapture(str(out / entry["annotated"]))
    first = cv2.cvtColor(capture.read()[1], cv2.COLOR_BGR2RGB).astype(int)
    capture.release()
    assert np.abs(first - _frame(0)).max() > 100


def test_every_nth_frame_an_mp4_and_a_corrupt_video(video_gallery: Path, clip: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`--every=2` processes the even frames and still writes every frame; an MPEG-4 `.mp4` gives an
    `.mp4`; a video the decoder cannot open is an entry with an error (as a file that is not an
    image is), named in the summary, and the other inputs are identified."""
    mp4 = tmp_path / "door.mp4"
    _write(mp4, "mp4v", [_frame(i) for i in range(FRAMES)])
    corrupt = tmp_path / "broken.mkv"
    corrupt.write_bytes(b"\x1aE\xdf\xa3 not a video" * 50)
    out = tmp_path / "out"
    assert call_main(main, "identify", f"--gallery={video_gallery}", f"--output={out}", "--every=2",
                     mp4, corrupt) == 0
    captured = capsys.readouterr()
    assert "broken.mkv" in captured.out and "not a decodable video" in captured.out
    video, broken = json.loads((out / "report.json").read_text())
    assert broken == {"input": str(corrupt), "faces": [], "error": "not a decodable video"}
    assert video["every"] == 2 and video["annotated"] == "annotated/door.mp4"
    assert {face["frame"] % 2 for face in video["faces"]} == {0}
    assert {(face["track"], face["name"]) for face in video["faces"]} == {(0, "alice"), (1, "bob")}
    assert _frame_count(out / video["annotated"]) == FRAMES
    assert not list(out.rglob(".*"))  # no temporary file left behind


@pytest.mark.unit
def test_tracker_keeps_a_face_through_short_gaps_and_ends_it_after_max_missed() -> None:
    tracker = IoUTracker(iou_threshold=0.3, max_missed=2)

    def box(t: int) -> list[float]:
        return [10 + 2 * t, 10, 50 + 2 * t, 50]

    seen = {t: tracker.update([box(t)] if t not in (3, 4, 9, 10, 11) else []) for t in range(14)}
    # Missed in frames 3-4 (two frames: kept, and found where its velocity predicts it), then in
    # 9-11 (three frames: ended, the face comes back as a new track).
    assert [seen[t] for t in (0, 1, 2, 5, 6, 7, 8)] == [[0]] * 7
    assert seen[12] == seen[13] == [1]


@pytest.mark.unit
def test_tracker_follows_two_crossing_faces() -> None:
    """Two faces moving through each other: IoU with the last boxes alone would swap them where they
    overlap; matching to each track's constant-velocity prediction keeps them."""
    tracker = IoUTracker(iou_threshold=0.3, max_missed=1)
    ids = []
    for t in range(12):
        a = [4 * t, 0, 4 * t + 20, 20]
        b = [44 - 4 * t, 3, 64 - 4 * t, 23]
        ids.append(tracker.update([b, a]) if t % 2 else tracker.update([a, b]))
    assert all(frame == ([1, 0] if t % 2 else [0, 1]) for t, frame in enumerate(ids))
    assert iou(np.array([[0, 0, 20, 20]]), np.array([[10, 0, 30, 20], [40, 0, 60, 20]])) == \
        pytest.approx(np.array([[1 / 3, 0.0]]))


@pytest.mark.unit
def test_track_identities_are_one_to_one_among_tracks_that_meet() -> None:
    # Tracks 0 and 1 share frames: one person each, by the best sum (Hungarian), though both score
    # highest for person 0; track 2 meets track 0 (person 1) only: person 2, not its best.
    scores = np.array([[0.9, 0.8, 0.1], [0.85, 0.2, 0.1], [0.3, 0.7, 0.6]])
    frames = [set(range(0, 20)), set(range(5, 10)), set(range(15, 25))]
    assert assign_tracks(scores[:2], frames[:2], 0.5) == [1, 0]
    assert assign_tracks(scores, frames, 0.5) == [1, 0, 2]
    # A person leaving and coming back while another stays: tracks 0 and 2 never meet, both are
    # person 0; track 1 meets both and is person 1.
    scores = np.array([[0.9, 0.6], [0.8, 0.7], [0.95, 0.1]])
    frames = [set(range(0, 10)), set(range(0, 30)), set(range(20, 30))]
    assert assign_tracks(scores, frames, 0.5) == [0, 1, 0]
    # Below the threshold: unknown.
    assert assign_tracks(scores, frames, 0.96) == [None, None, None]
