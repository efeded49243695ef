"""Face detection and alignment: Umeyama, MTCNN on a real photo, policies, landmark files, the CLI.

The photo is scikit-image's `astronaut` (Eileen Collins, NASA, public domain).
The landmark fixture writers below follow each dataset's published layout
(SphereFace / OpenVINO `lfw_landmark.txt`, VGGFace2 `bb_landmark` CSVs,
MegaFace `<image>.json` as insightface reads it), not the readers under test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
from conftest import ROOT, assert_main_user_error, run_module

from sparse_embed.errors import DataError
from sparse_embed.faces import align_tree
from sparse_embed.faces.align import align, alignment_matrix, template, transform_points, umeyama
from sparse_embed.faces.aligner import (
    FALLBACK,
    FROM_DETECTION,
    FROM_EYES_NOSE,
    FROM_LANDMARKS,
    NO_FACE,
    align_faces,
    align_image,
)
from sparse_embed.faces.detect import Face, FaceDetector
from sparse_embed.faces.landmarks import (
    FaceAnnotation,
    detect_format,
    read_landmarks,
    read_megaface_json,
)

pytestmark = pytest.mark.unit

ALIGN = "sparse_embed.preprocessing.align_faces"
CROPS = ("112x112", "96x112")


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage.data.astronaut()


@pytest.fixture(scope="module")
def astronaut_face(detector: FaceDetector, astronaut: np.ndarray) -> Face:
    faces = detector.detect(astronaut)
    assert len(faces) == 1
    return faces[0]


def _save(path: Path, image_rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 98])


def _load(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def _two_faces(astronaut: np.ndarray) -> tuple[np.ndarray, int]:
    """[large face | small face | blank]: the small face is nearer the centre. Returns (image, small's x)."""
    large = astronaut[20:220, 140:310]
    small = cv2.resize(large, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    canvas = np.full((200, 510, 3), 255, np.uint8)
    canvas[:, :170] = large
    canvas[50:150, 170:255] = small
    return canvas, 170


# --- Umeyama ------------------------------------------------------------------------------------


def _similarity(rng: np.random.Generator) -> np.ndarray:
    angle, scale = rng.uniform(-np.pi, np.pi), rng.uniform(0.2, 5.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return np.hstack([scale * rotation, rng.uniform(-100, 100, (2, 1))])


@pytest.mark.parametrize("seed", range(5))
def test_umeyama_recovers_an_exact_similarity(seed: int) -> None:
    rng = np.random.default_rng(seed)
    matrix = _similarity(rng)
    source = rng.uniform(0, 200, (5, 2))
    np.testing.assert_allclose(umeyama(source, transform_points(matrix, source)), matrix, atol=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_umeyama_matches_linear_least_squares_on_noisy_points(seed: int) -> None:
    """A similarity is x' = a x - b y + tx, y' = b x + a y + ty: linear in (a, b, tx, ty).

    Its least-squares fit is the stacked linear system solved by NumPy; Umeyama's
    closed form must give the same (a, b, tx, ty).
    """
    rng = np.random.default_rng(seed)
    source = rng.uniform(0, 200, (7, 2))
    target = transform_points(_similarity(rng), source) + rng.normal(0, 3.0, (7, 2))
    x, y = source[:, 0], source[:, 1]
    one, zero = np.ones_like(x), np.zeros_like(x)
    system = np.concatenate([np.stack([x, -y, one, zero], 1), np.stack([y, x, zero, one], 1)])
    (a, b, tx, ty), *_ = np.linalg.lstsq(system, np.concatenate([target[:, 0], target[:, 1]]), rcond=None)
    np.testing.assert_allclose(umeyama(source, target), [[a, -b, tx], [b, a, ty]], atol=1e-8)


def test_umeyama_rejects_bad_shapes_and_coincident_points() -> None:
    with pytest.raises(ValueError, match="N>=2"):
        umeyama(np.zeros((5, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="coincide"):
        umeyama(np.ones((5, 2)), np.zeros((5, 2)))


# --- MTCNN on a real photo ----------------------------------------------------------------------


def test_mtcnn_finds_the_astronaut_with_landmarks_in_image_order(astronaut_face: Face) -> None:
    face = astronaut_face
    assert face.confidence > 0.95
    x, y, w, h = face.box
    points = face.landmarks
    assert points.shape == (5, 2)
    assert np.all((points[:, 0] > x) & (points[:, 0] < x + w) & (points[:, 1] > y) & (points[:, 1] < y + h))
    left_eye, right_eye, nose, mouth_left, mouth_right = points
    assert left_eye[0] < nose[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])


@pytest.mark.parametrize("crop", CROPS)
def test_aligned_crop_puts_the_landmarks_on_the_template(
    crop: str, detector: FaceDetector, astronaut: np.ndarray, astronaut_face: Face
) -> None:
    """The matrix maps the landmarks onto the template, and MTCNN re-run on the crop finds them there."""
    points, target = astronaut_face.landmarks, template(crop).array()
    moved = transform_points(alignment_matrix(points, crop), points)
    # A real face is not an exact similarity of the template: a few pixels of residual remain,
    # most at the mouth corners (the astronaut smiles); the eyes land closer.
    assert np.abs(moved - target).max() < 5 and np.abs(moved[:2] - target[:2]).max() < 3
    aligned = align(astronaut, points, crop)
    assert aligned.shape == (template(crop).height, template(crop).width, 3)
    # A crop filled by its face is padded so MTCNN sees some context around it.
    pad = 32
    faces = detector.detect(cv2.copyMakeBorder(aligned, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0))
    assert len(faces) == 1
    found = faces[0].landmarks - pad
    assert np.abs(found - moved).max() < 3
    assert np.abs(found - target).max() < 7 and np.abs(found - target).mean() < 4
    assert np.abs(found[:2] - target[:2]).max() < 4


@pytest.mark.integration
def test_project_model_and_mtcnn_share_one_keras_in_one_process(
    detector: FaceDetector, astronaut: np.ndarray
) -> None:
    from mtcnn.network.pnet import PNet

    from sparse_embed.keras import keras
    from sparse_embed.models import MODELS

    assert issubclass(PNet, keras.Model)
    keras.utils.set_random_seed(0)
    model = MODELS.get("mobilefacenet_tiny")(embedding_size=8)
    size = model.input_shape[1]
    crop = align_image(astronaut, detector)[0]
    batch = cv2.resize(crop, (size, size))[None].astype(np.float32) / 127.5 - 1.0
    embedding = model(batch, training=False).numpy()
    assert embedding.shape == (1, 8) and np.all(np.isfinite(embedding))
    assert len(detector.detect(astronaut)) == 1


# --- policies -----------------------------------------------------------------------------------


def test_policies_choose_largest_centre_or_all(detector: FaceDetector, astronaut: np.ndarray) -> None:
    image, small_x = _two_faces(astronaut)
    faces = detector.detect(image)
    assert len(faces) == 2

    largest = max(faces, key=lambda f: f.area)
    smallest = min(faces, key=lambda f: f.area)
    assert largest.box[0] < small_x <= smallest.box[0]
    for policy, expected in (("largest", largest), ("center", smallest)):
        crops = align_image(image, detector, policy=policy)
        assert len(crops) == 1
        np.testing.assert_array_equal(crops[0], align(image, expected.landmarks))
    every = align_faces(image, detector, policy="all")
    assert every.outcome == FROM_DETECTION and every.faces_found == 2 and len(every.crops) == 2
    assert all(crop.shape == (112, 112, 3) for crop in every.crops)


def test_blank_image_is_no_face_unless_a_fallback_is_asked(detector: FaceDetector) -> None:
    blank = np.full((200, 160, 3), 128, np.uint8)
    aligned = align_faces(blank, detector)
    assert aligned.outcome == NO_FACE and aligned.crops == () and aligned.faces_found == 0
    assert align_image(blank, detector) == []
    fallback = align_faces(blank, detector, crop="96x112", fallback="center_crop")
    assert fallback.outcome == FALLBACK and fallback.crops[0].shape == (112, 96, 3)


@pytest.mark.integration
def test_tree_counts_several_faces_no_face_and_fallback(tmp_path: Path, astronaut: np.ndarray) -> None:
    two, _ = _two_faces(astronaut)
    _save(tmp_path / "in" / "group" / "two.png", two)
    _save(tmp_path / "in" / "blank.jpg", np.full((120, 120, 3), 200, np.uint8))
    summary = align_tree(tmp_path / "in", tmp_path / "out", policy="all", fallback="center_crop")
    assert (summary["images"], summary["aligned"], summary["several_faces"]) == (2, 1, 1)
    assert (summary["no_face"], summary["fallback"], summary["crops"]) == (0, 1, 3)
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*")
                  if p.is_file()) == ["blank.jpg", "group/two.jpg", "group/two_1.jpg"]
    summary = align_tree(tmp_path / "in", tmp_path / "out2")
    assert (summary["no_face"], summary["fallback"], summary["no_face_examples"]) == (1, 0, ["blank.jpg"])
    assert not (tmp_path / "out2" / "blank.jpg").exists()


# --- dataset landmark files ---------------------------------------------------------------------


def _write_lfw(path: Path, entries: dict[str, np.ndarray]) -> None:
    """SphereFace's lfw_landmark.txt: `Name/Name_0001.jpg<TAB>x1<TAB>y1 ... y5`, integer pixels."""
    path.write_text("".join(
        name + "\t" + "\t".join(str(int(round(v))) for v in points.reshape(-1)) + "\n"
        for name, points in entries.items()))


def _write_vggface2(folder: Path, entries: dict[str, tuple[np.ndarray, tuple[float, ...]]]) -> Path:
    """bb_landmark/loose_landmark_test.csv and loose_bb_test.csv; NAME_ID quoted, no extension."""
    folder.mkdir(parents=True, exist_ok=True)
    points = ["NAME_ID,P1X,P1Y,P2X,P2Y,P3X,P3Y,P4X,P4Y,P5X,P5Y\n"]
    boxes = ["NAME_ID,X,Y,W,H\n"]
    for name, (landmarks, box) in entries.items():
        points.append(f'"{name}",' + ",".join(f"{v:.2f}" for v in landmarks.reshape(-1)) + "\n")
        boxes.append(f'"{name}",' + ",".join(str(int(v)) for v in box) + "\n")
    (folder / "loose_landmark_test.csv").write_text("".join(points))
    (folder / "loose_bb_test.csv").write_text("".join(boxes))
    return folder / "loose_landmark_test.csv"


def _write_megaface(path: Path, box: tuple[float, ...], landmarks: np.ndarray) -> None:
    """MegaFace <image>.json: bounding_box {x, y, width, height}; landmarks "0" right eye (image),
    "1" left eye, "2" nose."""
    left_eye, right_eye, nose = landmarks[:3]
    path.write_text(json.dumps({
        "bounding_box": dict(zip(("x", "y", "width", "height"), map(float, box), strict=True)),
        "landmarks": {key: {"x": float(p[0]), "y": float(p[1])}
                      for key, p in (("0", right_eye), ("1", left_eye), ("2", nose))},
        "id": 12345,
    }, indent=2))


def _mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _saved(path: Path, image: np.ndarray, detector: FaceDetector) -> tuple[np.ndarray, Face]:
    """Saves `image` as a JPEG in a tree; returns it as read back and MTCNN's face on it."""
    _save(path, image)
    source = _load(path)
    faces = detector.detect(source)
    assert len(faces) == 1
    return source, faces[0]


def test_lfw_landmark_file_aligns_like_detection(tmp_path: Path, astronaut: np.ndarray,
                                                 detector: FaceDetector) -> None:
    image_path = tmp_path / "lfw" / "Eileen_Collins" / "Eileen_Collins_0001.jpg"
    source, face = _saved(image_path, astronaut, detector)
    landmark_file = tmp_path / "lfw_landmark.txt"
    _write_lfw(landmark_file, {"Eileen_Collins/Eileen_Collins_0001.jpg": face.landmarks,
                               "Nobody_There/Nobody_There_0001.jpg": face.landmarks})
    assert detect_format(landmark_file) == "lfw"
    summary = align_tree(tmp_path / "lfw", tmp_path / "out", landmarks=landmark_file)
    assert (summary["aligned"], summary["from_landmarks"], summary["detected"]) == (1, 1, 0)
    assert (summary["missing"], summary["missing_examples"]) == (1, ["Nobody_There/Nobody_There_0001.jpg"])
    from_file = _load(tmp_path / "out" / "Eileen_Collins" / "Eileen_Collins_0001.jpg")
    # The same crop up to the JPEG coding of the output.
    assert _mean_abs(from_file, align_image(source, detector)[0]) < 3


def test_vggface2_csv_aligns_like_detection(tmp_path: Path, astronaut: np.ndarray,
                                            detector: FaceDetector) -> None:
    source, face = _saved(tmp_path / "test" / "n000002" / "0001_01.jpg", astronaut, detector)
    csv_path = _write_vggface2(tmp_path / "bb_landmark", {
        "n000002/0001_01": (face.landmarks, face.box),
        "n000002/0002_01": (face.landmarks, face.box),
    })
    assert detect_format(csv_path) == "vggface2"
    annotations = read_landmarks(csv_path)
    assert annotations["n000002/0001_01.jpg"].box == tuple(float(int(v)) for v in face.box)
    summary = align_tree(tmp_path / "test", tmp_path / "out", landmarks=csv_path, landmarks_format="vggface2")
    assert (summary["from_landmarks"], summary["missing"]) == (1, 1)
    assert summary["missing_examples"] == ["n000002/0002_01.jpg"]
    from_file = _load(tmp_path / "out" / "n000002" / "0001_01.jpg")
    assert _mean_abs(from_file, align_image(source, detector)[0]) < 3


def test_megaface_json_guides_detection(tmp_path: Path, astronaut: np.ndarray,
                                        detector: FaceDetector) -> None:
    image_path = tmp_path / "mega" / "000" / "123@N00" / "4567.jpg"
    source, face = _saved(image_path, astronaut, detector)
    _write_megaface(Path(f"{image_path}.json"), face.box, face.landmarks)
    _write_megaface(tmp_path / "mega" / "000" / "123@N00" / "gone.jpg.json", face.box, face.landmarks)
    annotation = read_megaface_json(f"{image_path}.json")
    assert annotation.box == face.box and annotation.landmarks is None
    np.testing.assert_allclose(annotation.eyes_nose, face.landmarks[:3])
    assert detect_format(tmp_path / "mega") == "megaface"
    summary = align_tree(tmp_path / "mega", tmp_path / "out", landmarks=tmp_path / "mega")
    assert (summary["images"], summary["detected"], summary["missing"]) == (1, 1, 1)
    assert summary["other_files"] == 2
    detected = align_image(source, detector)[0]
    assert _mean_abs(_load(tmp_path / "out" / "000" / "123@N00" / "4567.jpg"), detected) < 3


def test_megaface_box_without_a_detection_aligns_from_eyes_and_nose(
    astronaut: np.ndarray, astronaut_face: Face, detector: FaceDetector
) -> None:
    # The dataset's box is elsewhere: no detection overlaps it, its three points are used.
    annotation = FaceAnnotation(box=(0, 400, 60, 60), eyes_nose=astronaut_face.landmarks[:3])
    aligned = align_faces(astronaut, detector, annotation=annotation)
    assert aligned.outcome == FROM_EYES_NOSE and aligned.faces_found == 1
    moved = transform_points(alignment_matrix(astronaut_face.landmarks[:3]), astronaut_face.landmarks[:3])
    assert np.abs(moved - template("112x112").array()[:3]).max() < 4
    given = align_faces(astronaut, None, annotation=FaceAnnotation(landmarks=astronaut_face.landmarks))
    assert given.outcome == FROM_LANDMARKS


def test_bad_landmark_files_are_one_line_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        read_landmarks(tmp_path / "absent.txt", "lfw")
    bad = tmp_path / "lfw_landmark.txt"
    bad.write_text("A/A_0001.jpg 1 2 3 4 5 6 7 8 9 10\nB/B_0001.jpg 1 2 3 4 5 6 7 8 9\n")
    with pytest.raises(DataError, match=re.escape(f"{bad} line 2")):
        read_landmarks(bad)
    csv_path = tmp_path / "loose_landmark_train.csv"
    csv_path.write_text("NAME_ID,P1X,P1Y,P2X,P2Y,P3X,P3Y,P4X,P4Y,P5X,P5Y\n\"n1/01\",1,2,3,x,5,6,7,8,9,10\n")
    with pytest.raises(DataError, match="line 2"):
        read_landmarks(csv_path, "vggface2")
    broken = tmp_path / "a.jpg.json"
    broken.write_text('{"bounding_box": {"x": 1,\n "y": }')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_megaface_json(broken)
    junk = tmp_path / "junk.dat"
    junk.write_text("hello\n")
    with pytest.raises(DataError, match="--landmarks_format"):
        read_landmarks(junk)


# --- CLI and module boundary --------------------------------------------------------------------


@pytest.mark.integration
def test_cli_mirrors_the_tree_and_counts_unreadable(tmp_path: Path, astronaut: np.ndarray) -> None:
    _save(tmp_path / "raw" / "a" / "astro.jpg", astronaut)
    _save(tmp_path / "raw" / "b" / "c" / "astro.png", astronaut)
    (tmp_path / "raw" / "b" / "text.jpg").write_text("this is not an image\n")
    proc = run_module(ALIGN, f"--input={tmp_path / 'raw'}", f"--output={tmp_path / 'aligned'}",
                             "--workers=2", "--crop=96x112")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    rows = dict(re.findall(r"^(\S.*?)\s{2,}(\S.*)$", proc.stdout, re.M))
    assert (rows["images"], rows["aligned"], rows["unreadable"], rows["no face"]) == ("3", "2", "1", "0")
    written = sorted(p.relative_to(tmp_path / "aligned").as_posix()
                     for p in (tmp_path / "aligned").rglob("*") if p.is_file())
    assert written == ["a/astro.jpg", "b/c/astro.jpg"]
    assert _load(tmp_path / "aligned" / "a" / "astro.jpg").shape == (112, 96, 3)


def test_cli_bad_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """In this process (main(argv)); the command runs as a process in the test above."""
    from sparse_embed.preprocessing.align_faces import main

    assert_main_user_error(capsys, main, [f"--output={tmp_path / 'o'}"], "--input is required")
    assert_main_user_error(capsys, main, [f"--input={tmp_path / 'absent'}", f"--output={tmp_path / 'o'}"],
                           "absent", "not found")


def test_only_detect_imports_mtcnn() -> None:
    pattern = re.compile(r"^\s*(import mtcnn|from mtcnn)\b", re.M)
    importers = sorted(path.relative_to(ROOT).as_posix() for folder in ("sparse_embed", "preprocessing")
                       for path in (ROOT / folder).rglob("*.py") if pattern.search(path.read_text()))
    assert importers == ["sparse_embed/faces/detect.py"]
