"""Landnet and the landmarks task: size, loss, metric, data readers, a few training steps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sparse_embed.data.synthetic import (
    _face_outline,
    face_landmarks,
    render_face,
    sample_identity,
    sample_nuisance,
)
from sparse_embed.errors import ConfigError, DataError
from sparse_embed.landmarks import metrics
from sparse_embed.landmarks.config import LandmarksConfig, load_landmarks_config
from sparse_embed.landmarks.data import mirrored, read_celeba, to_crop_units
from sparse_embed.landmarks.real import five_from_ibug

pytestmark = pytest.mark.unit


def test_landnet_size_is_the_model_cards() -> None:
    """190,616 parameters (the card: 0.191M) and 10,339,456 multiply-adds (0.021 GFLOPs = 2 x MACs)."""
    from sparse_embed.models import LANDMARK_MODELS
    from sparse_embed.models.profile import count_macs, count_params

    model = LANDMARK_MODELS.get("landnet")()
    assert model.input_shape == (None, 48, 48, 3) and model.output_shape == (None, 10)
    assert count_params(model) == 190_616
    assert count_macs(model) == 10_339_456
    assert round(count_params(model) / 1e6, 3) == 0.191
    assert round(2 * count_macs(model) / 1e9, 3) == 0.021
    prelus = [layer for layer in model.layers if layer.__class__.__name__ == "PReLU"]
    assert len(prelus) == 8 and all(layer.alpha.shape == (1, 1, 1) for layer in prelus)
    out = model(np.random.default_rng(0).uniform(0, 1, (2, 48, 48, 3)).astype(np.float32)).numpy()
    assert np.all((out > 0) & (out < 1))


def test_landnet_refuses_an_input_it_cannot_reduce() -> None:
    from sparse_embed.models import LANDMARK_MODELS

    with pytest.raises(ConfigError, match="multiple of 8"):
        LANDMARK_MODELS.get("landnet")(input_size=50)


def _wing_numpy(x: np.ndarray, w: float, eps: float) -> np.ndarray:
    """Feng et al. 2018, eq. 5: w ln(1 + |x|/eps) for |x| < w, else |x| - C, C = w - w ln(1 + w/eps)."""
    c = w - w * math.log(1 + w / eps)
    a = np.abs(x)
    return np.where(a < w, w * np.log(1 + a / eps), a - c)


def test_wing_loss_is_the_papers_formula() -> None:
    from sparse_embed.keras import tf
    from sparse_embed.landmarks.losses import LANDMARK_LOSSES

    rng = np.random.default_rng(0)
    true = rng.uniform(0, 1, (8, 10)).astype(np.float32)
    predicted = np.clip(true + rng.normal(0, 0.2, true.shape), 0, 1).astype(np.float32)
    loss = LANDMARK_LOSSES.get("wing")(scale=48.0, width=10.0, epsilon=2.0)
    expected = _wing_numpy((predicted - true).astype(np.float64) * 48, 10.0, 2.0).mean()
    np.testing.assert_allclose(float(loss(true, predicted)), expected, rtol=1e-5)
    np.testing.assert_allclose(float(tf.function(loss)(true, predicted)), expected, rtol=1e-5)
    # Both branches are taken, and they meet at |x| = w: wing(w) = w ln(1 + w/eps) = w - C.
    errors = np.abs(predicted - true) * 48
    assert np.any(errors < 10) and np.any(errors > 10)
    at_w = _wing_numpy(np.array([10.0]), 10.0, 2.0)[0]
    assert at_w == pytest.approx(10 * math.log(6))
    # A perfect prediction costs nothing; L1 is the mean absolute error in the same units.
    assert float(loss(true, true)) == 0.0
    l1 = LANDMARK_LOSSES.get("l1")(scale=48.0)
    np.testing.assert_allclose(float(l1(true, predicted)), np.abs(predicted - true).mean() * 48, rtol=1e-5)


def test_normalised_error_by_hand() -> None:
    """Eyes 10 apart; the points off by 0, 0, 3-4-5 (5), 1, 4: mean 2, NME 0.2 (a failure at 0.1)."""
    true = np.array([[0, 0], [10, 0], [5, 5], [2, 10], [8, 10]], np.float64)
    predicted = true + [[0, 0], [0, 0], [3, 4], [1, 0], [0, -4]]
    good = true + [[0.5, 0], [0, 0], [0, 0], [0, 0], [0, 0]]
    assert metrics.normalised_errors(predicted[None], true[None])[0] == pytest.approx(0.2)
    summary = metrics.summary(np.stack([predicted, good]).reshape(2, 10), np.stack([true, true]))
    assert summary == {"nme": pytest.approx((0.2 + 0.01) / 2), "failure_rate": 0.5, "images": 2}
    with pytest.raises(ValueError, match="both true eyes"):
        metrics.normalised_errors(true[None], np.zeros((1, 5, 2)))


def test_synthetic_landmarks_sit_on_the_drawn_face() -> None:
    """The five points are inside the image and inside the drawn face outline, eyes above nose above mouth."""
    for identity_index, image_index in ((0, 0), (3, 5), (17, 2)):
        identity = sample_identity(0, identity_index)
        nuisance = sample_nuisance(0, identity_index, image_index)
        points = face_landmarks(identity, nuisance, 112)
        assert points.shape == (5, 2) and np.all((points > 0) & (points < 112))
        assert points[0, 0] < points[1, 0] and points[3, 0] < points[4, 0]
        # In face coordinates (before the pose), every point is inside the outline.
        outline = _face_outline(identity)
        from matplotlib.path import Path as Polygon

        local = np.array([[-identity.eye_dx, identity.eye_y], [identity.eye_dx, identity.eye_y],
                          [0, identity.nose_y + 0.04], [-identity.mouth_w, identity.mouth_y],
                          [identity.mouth_w, identity.mouth_y]])
        assert Polygon(outline).contains_points(local).all()
        # The rendered eye centre is darker-or-brighter than the skin around it: something is drawn there.
        pixels = render_face(identity, nuisance, 112).astype(np.float64)
        x, y = np.rint(points[0]).astype(int)
        assert pixels[y - 1:y + 2, x - 1:x + 2].std() > 0
    half = face_landmarks(sample_identity(0, 3), sample_nuisance(0, 3, 5), 56)
    np.testing.assert_allclose(half * 2, face_landmarks(sample_identity(0, 3), sample_nuisance(0, 3, 5), 112))


def test_generate_writes_the_points_only_when_asked(tmp_path) -> None:
    from sparse_embed.data.synthetic import LANDMARKS_FILE, generate, image_landmarks

    generate(tmp_path / "plain", 2, 2, 2, image_size=32, pairs_per_fold=1)
    generate(tmp_path / "marked", 2, 2, 2, image_size=32, pairs_per_fold=1, landmarks=True)
    plain = sorted(p.relative_to(tmp_path / "plain") for p in (tmp_path / "plain").rglob("*"))
    marked = sorted(p.relative_to(tmp_path / "marked") for p in (tmp_path / "marked").rglob("*"))
    assert sorted(set(marked) - set(plain)) == [type(plain[0])(LANDMARKS_FILE)]
    for name in plain:
        if (tmp_path / "plain" / name).is_file():
            assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "marked" / name).read_bytes()
    lines = (tmp_path / "marked" / LANDMARKS_FILE).read_text().splitlines()
    assert lines[0] == "image,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5" and len(lines) == 1 + 4 * 2
    name, *values = lines[-1].split(",")
    assert name == "test/id_00003/1.jpg"
    np.testing.assert_allclose(np.array(values, float), image_landmarks(0, 3, 1, 32).ravel(), atol=1e-3)


def _write_celeba(root, boxes: bool = True) -> None:
    (root / "list_landmarks_align_celeba.txt").write_text(
        "2\n"
        "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y "
        "rightmouth_x rightmouth_y\n"
        "000001.jpg 69  109  106  113   77  142   73  152  108  154\n"
        "000002.jpg 69  110  107  112   81  135   70  151  108  153\n")
    if boxes:
        (root / "list_bbox_celeba.txt").write_text(
            "2\nimage_id x_1 y_1 width height\n000001.jpg    95  71 226 313\n000002.jpg    72  94 221 306\n")


def test_celeba_reader_on_a_fixture(tmp_path) -> None:
    _write_celeba(tmp_path)
    faces = read_celeba(tmp_path / "list_landmarks_align_celeba.txt", tmp_path / "list_bbox_celeba.txt")
    assert sorted(faces) == ["000001.jpg", "000002.jpg"]
    np.testing.assert_array_equal(faces["000001.jpg"].landmarks,
                                  [[69, 109], [106, 113], [77, 142], [73, 152], [108, 154]])
    assert faces["000002.jpg"].box == (72.0, 94.0, 221.0, 306.0)
    assert read_celeba(tmp_path / "list_landmarks_align_celeba.txt")["000001.jpg"].box is None

    bad = tmp_path / "bad.txt"
    bad.write_text("3\n" + (tmp_path / "list_landmarks_align_celeba.txt").read_text().split("\n", 1)[1])
    with pytest.raises(DataError, match="line 1 says 3 images, the list has 2"):
        read_celeba(bad)
    bad.write_text("1\nlefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y "
                   "rightmouth_x rightmouth_y\n000001.jpg 69 109 106\n")
    with pytest.raises(DataError, match=r"bad.txt:3"):
        read_celeba(bad)


def test_celeba_examples_crop_to_their_boxes(tmp_path) -> None:
    from PIL import Image

    from sparse_embed.landmarks.data import load_crops, read_examples

    _write_celeba(tmp_path)
    (tmp_path / "img").mkdir()
    for name in ("000001.jpg", "000002.jpg"):
        Image.new("RGB", (400, 420), (200, 120, 80)).save(tmp_path / "img" / name)
    config = LandmarksConfig(data_format="celeba", landmarks_file="list_landmarks_align_celeba.txt",
                             bbox_file="list_bbox_celeba.txt", image_dir="img", test_fraction=0.5)
    train = read_examples(config, tmp_path, train=True)
    test = read_examples(config, tmp_path, train=False)
    assert [e.image.name for e in train] == ["000001.jpg"] and [e.image.name for e in test] == ["000002.jpg"]
    images, points = load_crops(train, 48)
    assert images.shape == (1, 48, 48, 3) and 0 <= images.min() and images.max() <= 1
    expected = to_crop_units(train[0].points, (95, 71, 226, 313)).ravel()
    np.testing.assert_allclose(points[0], expected, rtol=1e-6)


def test_mirror_swaps_left_and_right() -> None:
    points = np.array([[0.3, 0.4, 0.7, 0.4, 0.5, 0.6, 0.35, 0.8, 0.65, 0.8]], np.float32)
    images = np.arange(2 * 2 * 3, dtype=np.float32).reshape(1, 2, 2, 3)
    flipped_images, flipped = mirrored(images, points)
    np.testing.assert_allclose(flipped, points, atol=1e-6)  # a symmetric face is its own mirror image
    np.testing.assert_array_equal(flipped_images[0, :, 0], images[0, :, 1])


def test_five_points_from_ibug_68() -> None:
    points = np.zeros((68, 2))
    points[36:42] = [10, 20]
    points[42:48] = [30, 20]
    points[30], points[48], points[54] = [20, 30], [12, 40], [28, 40]
    np.testing.assert_array_equal(five_from_ibug(points), [[10, 20], [30, 20], [20, 30], [12, 40], [28, 40]])


def test_config_overrides_are_checked() -> None:
    config = load_landmarks_config("synthetic_landnet", ["steps=7", "loss=l1"])
    assert (config.steps, config.loss, config.model) == (7, "l1", "landnet")
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        load_landmarks_config("synthetic_landnet", ["stesp=7"])
    with pytest.raises(ConfigError, match="wing, l1"):
        load_landmarks_config(None, ["loss=mse"])
    with pytest.raises(ConfigError, match="synthetic_landnet"):
        load_landmarks_config("no_such_config")


@pytest.mark.integration
def test_a_few_training_steps_lower_the_loss(tmp_path) -> None:
    """Eight synthetic faces, 30 steps: the wing loss of the last steps is below the first's."""
    from sparse_embed.data.synthetic import generate
    from sparse_embed.landmarks.training import train

    generate(tmp_path / "data", 4, 2, 2, image_size=48, pairs_per_fold=1, landmarks=True)
    config = LandmarksConfig(steps=30, batch_size=8, learning_rate=3e-3)
    figures = train(config, tmp_path / "data", tmp_path / "run")
    assert figures["train_images"] == 16 and figures["images"] == 4
    assert figures["last_loss"] < figures["first_loss"]
    assert (tmp_path / "run" / "model.keras").is_file() and (tmp_path / "run" / "config.yaml").is_file()


def test_landnet_detector_puts_landnet_points_on_the_detectors_faces(monkeypatch) -> None:
    """`--landmarks=landnet`: the detector's boxes stay, the points are Landnet's, mapped from its crop."""
    import dataclasses

    from sparse_embed.app.embedder import LandnetDetector
    from sparse_embed.landmarks.data import from_crop_units
    from sparse_embed.landmarks.predict import Landmarker, landnet_box

    @dataclasses.dataclass(frozen=True)
    class FakeFace:
        box: tuple[float, float, float, float]
        confidence: float
        landmarks: np.ndarray

    class FakeDetector:
        def detect(self, image: np.ndarray) -> list[FakeFace]:
            return [FakeFace((40.0, 30.0, 60.0, 80.0), 0.99, np.zeros((5, 2)))]

    crop_points = np.array([[0.3, 0.4, 0.7, 0.4, 0.5, 0.6, 0.35, 0.8, 0.65, 0.8]], np.float32)
    seen = []

    def network(crops: np.ndarray) -> np.ndarray:
        seen.append(crops.shape)
        return crop_points

    monkeypatch.setattr(Landmarker, "load", classmethod(lambda cls, path: cls(network, 48, str(path))))
    faces = LandnetDetector(FakeDetector(), "landnet.tflite").detect(np.zeros((200, 160, 3), np.uint8))
    assert seen == [(1, 48, 48, 3)] and faces[0].box == (40.0, 30.0, 60.0, 80.0)
    x, y, side, _ = landnet_box((40.0, 30.0, 60.0, 80.0))
    assert side == pytest.approx(1.3 * 60) and x + side / 2 == pytest.approx(70)
    np.testing.assert_allclose(faces[0].landmarks, from_crop_units(crop_points, (x, y, side, side))[0])


def test_folded_batch_norms_compute_the_same_function() -> None:
    """QAT of Landnet folds each BN (they follow PReLUs) into a 1x1 depthwise convolution first."""
    from sparse_embed.compression.quantize import fold_batch_norms
    from sparse_embed.keras import keras
    from sparse_embed.models import LANDMARK_MODELS

    model = LANDMARK_MODELS.get("landnet")()
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.1, n).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 2, n).astype(np.float32))
            layer.gamma.assign(rng.uniform(0.5, 2, n).astype(np.float32))
    folded = fold_batch_norms(model)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    images = rng.uniform(0, 1, (2, 48, 48, 3)).astype(np.float32)
    np.testing.assert_allclose(folded(images).numpy(), model(images, training=False).numpy(), atol=1e-5)
