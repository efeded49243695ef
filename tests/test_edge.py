"""The edge script (sparse_embed.edge): the LFW protocol on TFLite without TensorFlow, MTCNN on TFLite.

The script runs in subprocesses where TensorFlow (and every other package the
device lacks) cannot be imported; its scores are compared with the Keras
model's flip-concatenated cosines, its accuracy with the NumPy protocol, and
the TFLite MTCNN's boxes and landmarks with TensorFlow MTCNN's on a photograph.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ROOT, assert_user_error, run_module
from skimage import data as skimage_data

from sparse_embed.config import ModelConfig
from sparse_embed.keras import tf
from sparse_embed.metrics.verification import verification_metrics
from sparse_embed.models import build_model

pytestmark = pytest.mark.integration

SIZE = 32
EMBEDDING = 16
IDENTITIES = 4
IMAGES_PER_IDENTITY = 3
# 2 folds x (3 same + 3 different); one same pair of fold 1 shows the undecodable image.
PAIRS = """2 3
id0 1 2
id1 1 3
id2 2 3
id0 1 id1 2
id2 1 id3 3
id1 2 id3 1
id3 1 2
id0 2 bad 1
id1 1 2
id0 3 id2 2
id1 3 id2 1
id3 2 id0 1
"""
SKIPPED = 7  # the line index (0-based, after the header) of the pair with the undecodable image
# Packages the device does not have; the edge script must run without them.
BLOCKED = ("tensorflow", "tf_keras", "keras", "absl", "tqdm", "mtcnn", "h5py", "PIL", "skimage")
BLOCKER = f"""
import importlib.abc
import sys

BLOCKED = {BLOCKED!r}


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not installed on the device")
        return None


sys.meta_path.insert(0, _Blocker())
"""


def _identity_image(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """A noisy, slightly shifted copy of an identity's base pattern, uint8 RGB in [128, 255].

    Bright images only: the int8 model's input range is then [0, 1], whose zero
    point (-128) is far from 0, so a quantization that ignored it would show.
    """
    shifted = np.roll(base, rng.integers(-2, 3, size=2), axis=(0, 1))
    return np.clip(shifted + rng.normal(0, 12, base.shape), 128, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny MobileFaceNet as float and integer-only TFLite, aligned 32x32 images, a pairs file."""
    root = tmp_path_factory.mktemp("edge")
    rng = np.random.default_rng(0)
    images: dict[str, np.ndarray] = {}
    for identity in range(IDENTITIES):
        base = cv2.resize(rng.uniform(140, 240, (4, 4, 3)), (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
        folder = root / "images" / f"id{identity}"
        folder.mkdir(parents=True)
        for k in range(1, IMAGES_PER_IDENTITY + 1):
            image = _identity_image(rng, base)
            path = folder / f"{k}.png"
            cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            images[str(path)] = image
    (root / "images" / "bad").mkdir()
    (root / "images" / "bad" / "1.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "pairs.txt").write_text(PAIRS)

    model = build_model(ModelConfig(name="mobilefacenet_tiny", input_size=SIZE, embedding_size=EMBEDDING))
    (root / "model.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    stack = np.stack(list(images.values())).astype(np.float32) / 127.5 - 1
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([x[None]] for x in stack)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    with warnings.catch_warnings():
        # The converter's notice that int8 inputs come without statistics: they get the calibrated ones.
        warnings.filterwarnings("ignore", "Statistics for quantized inputs", UserWarning)
        (root / "int8.tflite").write_bytes(converter.convert())

    blocker = root / "device_site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    return {"root": root, "images": images, "model": model, "blocker": blocker}


def _reference_scores(model, crops_a: list[np.ndarray], crops_b: list[np.ndarray]) -> np.ndarray:
    """Keras: cosine of [f(A), f(mirror A)] and [f(B), f(mirror B)], inputs x / 127.5 - 1."""

    def embed(crops: list[np.ndarray]) -> np.ndarray:
        x = np.stack(crops).astype(np.float32) / 127.5 - 1
        return np.concatenate([model(x, training=False).numpy(),
                               model(x[:, :, ::-1], training=False).numpy()], axis=1).astype(np.float64)

    a, b = embed(crops_a), embed(crops_b)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _pairs(edge: dict) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(left paths, right paths, issame, fold) of PAIRS, as the image root resolves them."""
    left, right, issame, fold = [], [], [], []
    for i, line in enumerate(PAIRS.splitlines()[1:]):
        tokens = line.split()
        refs = ([(tokens[0], tokens[1]), (tokens[0], tokens[2])] if len(tokens) == 3
                else [(tokens[0], tokens[1]), (tokens[2], tokens[3])])
        paths = [str(edge["root"] / "images" / name / f"{k}.{'jpg' if name == 'bad' else 'png'}")
                 for name, k in refs]
        left.append(paths[0])
        right.append(paths[1])
        issame.append(len(tokens) == 3)
        fold.append(i // 6)
    return left, right, np.array(issame), np.array(fold)


def _dataset(edge: dict, model: str = "model.tflite") -> tuple[str, str, str]:
    """--model, --pairs and --images of the fixture's data set."""
    root = edge["root"]
    return f"--model={root / model}", f"--pairs={root / 'pairs.txt'}", f"--images={root / 'images'}"


def _edge_run(edge: dict, *args: str) -> subprocess.CompletedProcess:
    """The edge script in a process where the BLOCKED packages cannot be imported."""
    return run_module("sparse_embed.edge.lfw", *args, pythonpath=(edge["blocker"],))


def test_the_device_process_cannot_import_tensorflow(edge: dict) -> None:
    # What makes the runs below proof that the script needs none of BLOCKED.
    for package in BLOCKED:
        proc = subprocess.run([sys.executable, "-c", f"import {package}"], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=str(edge["blocker"])))
        assert proc.returncode == 1 and "not installed on the device" in proc.stderr, package


def test_no_edge_module_imports_tensorflow() -> None:
    # Every module of the package, not only those the script reaches: a plain interpreter where
    # TensorFlow is installed, so an import that would succeed shows too.
    code = """
import importlib, pkgutil, sys
import sparse_embed.edge as edge
for module in pkgutil.iter_modules(edge.__path__):
    importlib.import_module(f"sparse_embed.edge.{module.name}")
print(sorted({name.split(".")[0] for name in sys.modules} & {"tensorflow", "tf_keras", "keras"}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]", proc.stdout


def _imports_of(module: str, root: Path) -> list[str]:
    """The Python files under `root` that import `module` (any form of the statement)."""
    pattern = re.compile(rf"^\s*(?:from|import)\s+{re.escape(module)}\b", re.MULTILINE)
    return sorted(str(path.relative_to(ROOT)) for path in root.rglob("*.py")
                  if pattern.search(path.read_text()))


@pytest.mark.unit
def test_litert_is_imported_in_one_module() -> None:
    # One TFLite runtime: the export's parity gate, the benchmarks and the edge script all run
    # `.tflite` files through sparse_embed.edge.runtime, never an interpreter of their own
    # (tests check the files with their own interpreter, independently).
    importers = [path for folder in ("sparse_embed", "benchmarks", "preprocessing")
                 for path in _imports_of("ai_edge_litert", ROOT / folder)]
    assert importers == ["sparse_embed/edge/runtime.py"]
    tf_interpreters = [path for folder in ("sparse_embed", "benchmarks", "preprocessing")
                       for path in (ROOT / folder).rglob("*.py") if "lite.Interpreter" in path.read_text()]
    assert tf_interpreters == []


@pytest.mark.unit
def test_a_file_that_is_not_a_tflite_model_is_one_data_error(tmp_path: Path) -> None:
    from sparse_embed.edge.model import EmbeddingModel
    from sparse_embed.edge.runtime import TFLiteModel, load_interpreter
    from sparse_embed.errors import DataError

    fake = tmp_path / "model.tflite"
    for load in (TFLiteModel.from_path, EmbeddingModel, load_interpreter):
        fake.write_bytes(b"\x00" * 64)
        with pytest.raises(DataError, match="is not a TFLite model") as error:
            load(fake)
        assert "\n" not in str(error.value)
        # The right identifier on a truncated file: the interpreter refuses it.
        fake.write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\x00" * 8)
        with pytest.raises(DataError, match="the TFLite interpreter cannot load it") as error:
            load(fake)
        assert "\n" not in str(error.value)
        with pytest.raises(DataError, match="not found"):
            load(tmp_path / "missing.tflite")


def test_float_model_matches_keras_without_tensorflow(edge: dict, tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    proc = _edge_run(edge, *_dataset(edge), "--aligned", "--num_threads=1", f"--output={output}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for phase in ("pre-process", "inference", "post-process", "ms per inference"):
        assert any(line.startswith(phase) for line in proc.stdout.splitlines()), proc.stdout
    assert "11 of 12 evaluated, 1 skipped: 1 image could not be decoded" in proc.stdout
    result = json.loads(output.read_text())
    assert result["undecodable"] == [str(edge["root"] / "images" / "bad" / "1.jpg")]
    assert result["pair_index"] == [i for i in range(12) if i != SKIPPED]
    assert result["inferences"] == 44 and result["embedding_size"] == EMBEDDING

    left, right, issame, fold = _pairs(edge)
    kept = result["pair_index"]
    reference = _reference_scores(edge["model"], [edge["images"][left[i]] for i in kept],
                                  [edge["images"][right[i]] for i in kept])
    np.testing.assert_allclose(result["scores"], reference, atol=1e-5)
    expected = verification_metrics(reference, issame[kept], folds=fold[kept])
    assert result["accuracy"] == pytest.approx(expected["accuracy"])
    assert result["accuracy_protocol"] == expected["accuracy_protocol"]


def test_integer_only_model_quantizes_its_input_and_dequantizes_its_output(edge: dict,
                                                                          tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    proc = _edge_run(edge, *_dataset(edge, "int8.tflite"), "--aligned", "--first=6",
                     "--verification_threshold=0.5", f"--output={output}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(output.read_text())
    assert result["input_dtype"] == "int8" and result["pairs"] == 6
    left, right, issame, _ = _pairs(edge)
    reference = _reference_scores(edge["model"], [edge["images"][p] for p in left[:6]],
                                  [edge["images"][p] for p in right[:6]])
    np.testing.assert_allclose(result["scores"], reference, atol=0.05)
    scores = np.array(result["scores"])
    assert result["accuracy"] == pytest.approx(np.mean((scores > 0.5) == issame[:6]))
    assert result["accuracy_protocol"] == "given threshold (--verification_threshold)"


def test_integer_io_uses_the_zero_points_of_input_and_output(edge: dict, tmp_path: Path) -> None:
    """A model whose input ([0, 1]) and output ([2, 4]) ranges put both zero points near -128."""
    from sparse_embed.edge.model import EmbeddingModel
    from sparse_embed.edge.runtime import TFLiteModel

    keras = tf.keras
    inputs = keras.Input((SIZE, SIZE, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    dense = keras.layers.Dense(EMBEDDING, kernel_initializer="zeros",
                               bias_initializer=keras.initializers.Constant(3.0))
    model = keras.Model(inputs, dense(pooled))
    dense.kernel.assign(np.random.default_rng(1).uniform(-1, 1, (3, EMBEDDING)))
    images = list(edge["images"].values())
    x = np.stack(images).astype(np.float32) / 127.5 - 1
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([v[None]] for v in x)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Statistics for quantized inputs", UserWarning)
        (tmp_path / "dense.tflite").write_bytes(converter.convert())

    edge_model = EmbeddingModel(tmp_path / "dense.tflite", num_threads=1)
    assert edge_model.integer_io
    out = np.stack([edge_model.run(edge_model.prepare(image)) for image in images])
    np.testing.assert_allclose(out, model(x).numpy(), rtol=0.02)
    # The parity gate's batches run on the same runtime: the same int8 codes, the same output.
    batch = TFLiteModel.from_path(tmp_path / "dense.tflite", num_threads=1)(x)
    np.testing.assert_allclose(batch, out, rtol=1e-6, atol=1e-6)


def test_no_decodable_pair_is_one_line(edge: dict, tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("1 1\nid0 1 2\nbad 1 id0 1\n")
    (tmp_path / "images").mkdir()
    for name in ("id0", "bad"):
        (tmp_path / "images" / name).mkdir()
        (tmp_path / "images" / name / "1.jpg").write_bytes(b"not an image")
    (tmp_path / "images" / "id0" / "2.jpg").write_bytes(b"")
    proc = _edge_run(edge, f"--model={edge['root'] / 'model.tflite'}", f"--pairs={pairs}",
                     f"--images={tmp_path / 'images'}", "--aligned")
    assert_user_error(proc, "no pair left to evaluate", "all 2 pairs skipped",
                      "3 images could not be decoded")


def test_bad_model_and_flags_are_one_line(edge: dict) -> None:
    _, pairs, images = _dataset(edge)
    assert_user_error(_edge_run(edge, f"--model={edge['root'] / 'pairs.txt'}", pairs, images, "--aligned"),
                      "is not a TFLite model")
    assert_user_error(_edge_run(edge, *_dataset(edge)), "one of the arguments --align --aligned is required")


@pytest.mark.unit
@pytest.mark.parametrize("width, height", [(112, 112), (96, 112), (SIZE, SIZE)])
def test_alignment_puts_the_landmarks_on_the_template_of_the_input_size(width: int, height: int) -> None:
    from sparse_embed.edge.preprocess import align_face, crop_points
    from sparse_embed.faces.align import TEMPLATES

    template = crop_points(width, height)
    name = f"{width}x{height}"
    expected = (TEMPLATES.get(name).array() if name in TEMPLATES.names()
                else TEMPLATES.get("112x112").array() * [width / 112, height / 112])
    np.testing.assert_allclose(template, expected)
    # Five dots where a face 2.5x the crop, turned 20 degrees, has its landmarks.
    angle, scale, shift = np.deg2rad(20), 2.5 * 112 / width, np.array([60.0, 40.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = template @ (scale * rotation).T + shift
    image = np.zeros((400, 400, 3), np.uint8)
    for x, y in landmarks:
        cv2.circle(image, (round(x), round(y)), 6, (255, 255, 255), -1)
    crop = align_face(image, landmarks, width, height)
    assert crop.shape == (height, width, 3)
    for x, y in template:
        # Each dot's brightness-weighted centre in a window around its template point.
        x0, y0 = int(x) - 4, int(y) - 4
        window = crop[max(y0, 0):y0 + 9, max(x0, 0):x0 + 9, 0].astype(float)
        ys, xs = np.mgrid[max(y0, 0):y0 + 9, max(x0, 0):x0 + 9]
        centre = np.array([np.sum(xs * window), np.sum(ys * window)]) / window.sum()
        np.testing.assert_allclose(centre, (x, y), atol=1.0)


@pytest.fixture(scope="module")
def mtcnn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """P-, R- and O-Net exported to TFLite by the export command's library function."""
    from sparse_embed.faces.mtcnn_tflite import export_mtcnn

    out = tmp_path_factory.mktemp("mtcnn")
    export_mtcnn(out)
    return out


def _group_photo() -> np.ndarray:
    """The astronaut, her mirror image and a half-size copy side by side: three faces of three sizes."""
    astronaut = skimage_data.astronaut()
    half = cv2.resize(astronaut, (256, 256), interpolation=cv2.INTER_AREA)
    column = np.concatenate([half, np.full_like(half, 255)], axis=0)
    return np.ascontiguousarray(np.concatenate([astronaut, astronaut[:, ::-1], column], axis=1))


@pytest.mark.parametrize("photo", ["astronaut", "group"])
def test_tflite_mtcnn_matches_tensorflow_mtcnn(mtcnn_dir: Path, photo: str) -> None:
    import mtcnn

    from sparse_embed.edge.mtcnn import TFLiteMTCNN
    from sparse_embed.faces.detect import MIN_FACE_SIZE, FaceDetector

    image = skimage_data.astronaut() if photo == "astronaut" else _group_photo()
    expected = FaceDetector().detect(image)
    found = TFLiteMTCNN(mtcnn_dir, num_threads=1).detect(image)
    assert len(found) == len(expected) == (1 if photo == "astronaut" else 3)
    # The package's unrounded figures (`detect` rounds boxes and landmarks to whole pixels), one row
    # per face: image, x, y, w, h, confidence, the five landmarks' x, then their y.
    raw = mtcnn.MTCNN(device="CPU:0").detect_faces(image, min_face_size=MIN_FACE_SIZE,
                                                     output_type="numpy", box_format="xywh")
    raw = raw[np.argsort(raw[:, 1])]
    for mine, theirs, exact in zip(sorted(found, key=lambda f: f.box[0]),
                                   sorted(expected, key=lambda f: f.box[0]), raw, strict=True):
        # Within 1e-3 px of the package (float32 arithmetic in two runtimes), so within half a pixel
        # (plus that) of its rounded figures.
        np.testing.assert_allclose(mine.box, exact[1:5], rtol=0, atol=1e-3)
        np.testing.assert_allclose(mine.landmarks, exact[6:16].reshape(2, 5).T, rtol=0, atol=1e-3)
        np.testing.assert_allclose(mine.box, theirs.box, rtol=0, atol=0.5 + 1e-3)
        assert mine.confidence == pytest.approx(theirs.confidence, abs=1e-4)


def test_align_detects_skips_faceless_images_and_matches_the_library(edge: dict, mtcnn_dir: Path,
                                                                     tmp_path: Path) -> None:
    from sparse_embed.edge.mtcnn import TFLiteMTCNN
    from sparse_embed.edge.preprocess import central_face, face_crop

    photos = {"astro/1.png": skimage_data.astronaut(), "astro/2.png": _group_photo(),
              "cup/1.png": skimage_data.coffee()}
    for name, image in photos.items():
        (tmp_path / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "images" / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    (tmp_path / "pairs.txt").write_text("1 1\nastro 1 2\nastro 1 cup 1\n")
    output = tmp_path / "results.json"
    proc = _edge_run(edge, f"--model={edge['root'] / 'model.tflite'}", f"--pairs={tmp_path / 'pairs.txt'}",
                     f"--images={tmp_path / 'images'}", f"--align={mtcnn_dir}",
                     "--verification_threshold=0.5", f"--output={output}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 image without a face MTCNN finds" in proc.stdout
    result = json.loads(output.read_text())
    assert result["no_face"] == [str(tmp_path / "images" / "cup" / "1.png")]
    assert result["pair_index"] == [0]

    detector = TFLiteMTCNN(mtcnn_dir)
    group = photos["astro/2.png"]
    # The group photo's central face is the mirrored astronaut.
    assert central_face(detector.detect(group), *group.shape[:2]).box[0] > 512
    crops = [face_crop(photos[name], SIZE, SIZE, detector) for name in ("astro/1.png", "astro/2.png")]
    reference = _reference_scores(edge["model"], crops[:1], crops[1:])
    np.testing.assert_allclose(result["scores"], reference, atol=1e-5)


def test_run_script_runs_the_protocol(edge: dict) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(edge["blocker"]), str(ROOT)]),
               PYTHON=sys.executable, MODEL=str(edge["root"] / "model.tflite"),
               PAIRS=str(edge["root"] / "pairs.txt"), LFW_DIR=str(edge["root"] / "images"), ALIGNED="1",
               THREADS="1")
    proc = subprocess.run(["bash", str(ROOT / "run_scripts" / "edge" / "inference_lfw.sh")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LFW verification (MLPerf edge protocol): model.tflite" in proc.stdout
    assert "11 of 12 evaluated, 1 skipped" in proc.stdout
