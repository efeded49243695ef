"""Export (TFLite in every quantization mode, SavedModel, ONNX) of a tiny trained run, and its parity gate.

The exported files are checked with their own runtimes (the `ai_edge_litert`
interpreter, onnxruntime, a reloaded SavedModel) against the Keras model
with a NumPy cosine, independently of the figures export.json reports.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_main_user_error, call_main, run_module

from sparse_embed.config import load_config, save_config
from sparse_embed.export import main as export_main
from sparse_embed.training.trainer import train

pytestmark = pytest.mark.integration

MODES = ("fp32", "fp16", "dynamic", "int8", "int8_full")
# The tiny protocol has 24 pairs: one pair that flips is 4.2 points of accuracy, so the
# default 0.5-point gate would judge noise; the accuracy gate is tested on closed forms below.
TINY_ACCURACY_DROP = "100"
REPRESENTATIVE = 16
HELD_OUT = 16


@pytest.fixture(scope="module")
def run_dir(smoke_run: Path) -> Path:
    """The session's smoke run (MobileFaceNet-tiny, PReLU, relu embedding: a sparse run), 6 steps."""
    return smoke_run


@pytest.fixture(scope="module")
def tflite_exports(run_dir: Path, tiny_data: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """Every TFLite mode, in one export command (one model load, one trace)."""
    proc = run_module("sparse_embed.export", f"--model_dir={run_dir}", f"--data_dir={tiny_data}",
                      "--format=tflite", f"--quantize={','.join(MODES)}",
                      f"--representative_count={REPRESENTATIVE}", f"--held_out={HELD_OUT}",
                      f"--max_accuracy_drop={TINY_ACCURACY_DROP}")
    return proc, run_dir / "export"


@pytest.fixture(scope="module")
def held_out(run_dir: Path, tiny_data: Path) -> tuple[np.ndarray, np.ndarray]:
    """(the held-out images the export did not calibrate on, their Keras embeddings)."""
    from sparse_embed.compression.images import load_images
    from sparse_embed.inference import load_backbone

    backbone, config = load_backbone(run_dir)
    images = load_images(str(tiny_data / config.data.train_files), HELD_OUT, config.model.input_shape,
                         start=REPRESENTATIVE)
    return images, backbone(images, training=False).numpy()


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _interpreter(path: Path, delegates: bool = True):  # noqa: ANN202 (the runtime's own type)
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.AUTO if delegates else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interpreter = Interpreter(model_path=str(path), experimental_op_resolver_type=resolver)
    interpreter.allocate_tensors()
    return interpreter


def _run_tflite(path: Path, images: np.ndarray) -> np.ndarray:
    """Runs a .tflite file image by image (batch 1, as on the device), quantizing int8 I/O by hand."""
    interpreter = _interpreter(path)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    rows = []
    for image in images:
        x = image[None]
        if inp["dtype"] == np.int8:
            scale, zero_point = inp["quantization"]
            x = np.clip(np.round(x / scale + zero_point), -128, 127).astype(np.int8)
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        y = interpreter.get_tensor(out["index"])[0]
        if out["dtype"] == np.int8:
            scale, zero_point = out["quantization"]
            y = (y.astype(np.float32) - zero_point) * scale
        rows.append(y)
    return np.stack(rows)


@pytest.mark.slow
def test_every_tflite_mode_runs_and_matches_keras(tflite_exports: tuple, held_out: tuple) -> None:
    proc, export_dir = tflite_exports
    assert proc.returncode == 0, proc.stderr[-3000:]
    images, keras_embeddings = held_out
    sizes = {}
    for mode in MODES:
        record = json.loads((export_dir / f"tflite_{mode}" / "export.json").read_text())
        assert record["passed"] and record["file"] == "model.tflite", record["reason"]
        exported = _run_tflite(export_dir / f"tflite_{mode}" / "model.tflite", images)
        cosine = _cosine(exported, keras_embeddings)
        assert cosine.mean() >= record["min_cosine"], (mode, cosine.mean())
        assert record["min_cosine"] == (0.999 if mode in ("fp32", "fp16") else 0.98)
        parity = record["parity"]
        assert parity["images"] > HELD_OUT and parity["mean_cosine"] >= record["min_cosine"]
        # The smoke run is sparse (relu embedding): nnz and FLOPs of both sides are reported.
        for side in ("keras", "exported"):
            assert 0 < parity[side]["mean_nnz"] <= 64 and 0 <= parity[side]["accuracy"] <= 1
        sizes[mode] = record["size_bytes"]
        assert sizes[mode] == (export_dir / f"tflite_{mode}" / "model.tflite").stat().st_size
        assert record["input"]["shape"] == [-1, 32, 32, 3] and record["output"]["shape"] == [-1, 64]
    # The float graph runs PRELU (XNNPACK takes it in float), the integer ones its rewrite.
    for mode in MODES:
        ops = {op["op_name"] for op in _interpreter(export_dir / f"tflite_{mode}" / "model.tflite",
                                                    delegates=False)._get_ops_details()}
        assert ("PRELU" in ops) == (mode in ("fp32", "fp16", "dynamic")), (mode, ops)
    # Weights take 4, 2 and 1 bytes; the graph itself is about the same in every mode.
    assert sizes["fp16"] < 0.75 * sizes["fp32"] and sizes["int8"] < 0.6 * sizes["fp32"]
    assert "tflite      int8_full" in proc.stdout and proc.stdout.count("PASS") == len(MODES)


@pytest.mark.slow
def test_int8_full_is_integer_only(tflite_exports: tuple) -> None:
    _, export_dir = tflite_exports
    record = json.loads((export_dir / "tflite_int8_full" / "export.json").read_text())
    assert record["float_ops"] == []
    interpreter = _interpreter(export_dir / "tflite_int8_full" / "model.tflite", delegates=False)
    dtypes = {np.dtype(d["dtype"]).name for d in interpreter.get_tensor_details()}
    assert dtypes <= {"int8", "int32"}, dtypes
    inp = interpreter.get_input_details()[0]
    # Inputs span [-1, 1]: 256 int8 steps of 2/255, the zero point at (or one step off) the middle.
    scale, zero_point = inp["quantization"]
    assert record["input"]["quantization"] == {"scale": pytest.approx(scale), "zero_point": zero_point}
    assert scale == pytest.approx(2 / 255, rel=0.01) and abs(zero_point) <= 1
    # int8 keeps float only at its two ends: the input, the output and their (de)quantize ops.
    interpreter = _interpreter(export_dir / "tflite_int8" / "model.tflite", delegates=False)
    ends = {d["index"] for d in (*interpreter.get_input_details(), *interpreter.get_output_details())}
    floats = {d["index"] for d in interpreter.get_tensor_details() if np.dtype(d["dtype"]).kind == "f"}
    assert floats == ends


@pytest.mark.slow
def test_failing_gate_keeps_the_onnx_model_as_failed(run_dir: Path, tiny_data: Path,
                                                     held_out: tuple, tmp_path: Path,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    """In this process (main(argv)), with file descriptors 1 and 2 captured."""
    import onnxruntime

    # No --data_dir: the run's own (run.json) gives the held-out images and the pairs.
    capfd.readouterr()
    code = call_main(export_main, f"--model_dir={run_dir}", "--format=onnx", f"--held_out={HELD_OUT}",
                     "--min_cosine=1.01", f"--output={tmp_path}")
    stdout, stderr = capfd.readouterr()
    assert code == 1, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "parity gate failed" in lines[0] and "--min_cosine=1.01" in lines[0]
    folder = tmp_path / "onnx_fp32"
    assert sorted(p.name for p in folder.iterdir()) == ["export.json", "model.failed.onnx"]
    record = json.loads((folder / "export.json").read_text())
    assert not record["passed"] and "mean cosine" in record["reason"]
    assert record["parity"]["mean_cosine"] > 0.99999 and record["input"]["name"] == "images"
    assert "FAIL" in stdout
    images, keras_embeddings = held_out
    session = onnxruntime.InferenceSession(str(folder / "model.failed.onnx"),
                                           providers=["CPUExecutionProvider"])
    exported = session.run(None, {"images": images})[0]
    np.testing.assert_allclose(exported, keras_embeddings, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_saved_model_with_flip_concat(run_dir: Path, held_out: tuple, tmp_path: Path) -> None:
    from sparse_embed.compression.exporter import export
    from sparse_embed.compression.parity import ParityData
    from sparse_embed.inference import load_backbone
    from sparse_embed.keras import tf

    backbone, config = load_backbone(run_dir)
    images, keras_embeddings = held_out
    (result,) = export(backbone, config, "saved_model", ["fp32"], tmp_path, ParityData(images),
                       flip_concat=True)
    assert result.passed and result.folder == tmp_path / "saved_model_fp32_flip"
    assert result.record["output"]["shape"] == [-1, 128] and result.record["flip_concat"]
    serve = tf.saved_model.load(str(result.model_path)).signatures["serving_default"]
    out = serve(images=tf.constant(images))["embedding"].numpy()
    # concat(e(x), e(flip(x))): the second half is the embedding of the mirror images.
    mirrored = backbone(images[:, :, ::-1], training=False).numpy()
    np.testing.assert_allclose(out, np.concatenate([keras_embeddings, mirrored], 1), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.unit
def test_prelu_forms_closed_forms() -> None:
    from sparse_embed.compression.rewrite import prelu_form
    from sparse_embed.keras import tf

    assert prelu_form(np.full((1, 1, 4), 0.25, np.float32)).name == "leaky"
    assert prelu_form(np.array([[[0.0, 0.3, 1.0]]], np.float32)).name == "leaky_residual"
    assert prelu_form(np.array([[[-0.2, 0.3, 1.5]]], np.float32)).name == "leaky_residual"
    # Each form against PReLU's definition, on the slopes it is chosen for and on both signs.
    x = np.array([[[[-2.0, -0.5, 3.0]]], [[[1.0, 4.0, -1.0]]]], np.float32)
    for alpha, quantized in (([0.25, 0.25, 0.25], False), ([-0.2, 0.3, 1.5], False), ([0.0, 0.3, 1.0], True),
                             ([-0.2, 0.3, 0.9], True), ([-0.2, 0.3, 1.5], True)):
        alpha = np.array([[alpha]], np.float32)
        out = prelu_form(alpha, quantized).compute(tf.constant(x), alpha, lambda t: t).numpy()
        np.testing.assert_allclose(out, np.where(x > 0, x, alpha * x), rtol=1e-6, atol=1e-7)
    # A quantization-aware PReLU: MUL + MAXIMUM while every slope is at most 1, else MINIMUM too.
    assert prelu_form(np.full((1, 1, 4), 0.25, np.float32), quantized=True).name == "maximum"
    assert prelu_form(np.array([[[-0.2, 0.3, 1.0]]], np.float32), quantized=True).name == "maximum"
    assert prelu_form(np.array([[[-0.2, 1.5]]], np.float32), quantized=True).name == "maximum_minimum"
    # Fake-quantized (monotone rounding to a grid of step 1/8 on [-1, 1)): `maximum` is the
    # quantized PReLU to the bit; `maximum_minimum` too where slopes are at most 1, and within one
    # step where they are above.
    def quantize(t: tf.Tensor) -> tf.Tensor:
        return tf.quantization.fake_quant_with_min_max_args(t, -1.0, 1.0 - 1 / 8, num_bits=4)

    x = np.linspace(-1.2, 1.2, 97, dtype=np.float32).reshape(-1, 1, 1, 1)
    for alpha in ([-0.3, 0.45, 1.0], [-0.3, 0.45, 1.7]):
        alpha = np.array([[alpha]], np.float32)
        form = prelu_form(alpha, quantized=True)
        out = quantize(form.compute(tf.constant(x), alpha, quantize)).numpy()
        expected = quantize(tf.constant(np.where(x > 0, x, alpha * x))).numpy()
        above_one = np.broadcast_to(alpha > 1, out.shape)
        np.testing.assert_array_equal(out[~above_one], expected[~above_one])
        assert np.abs(out - expected).max() <= 1 / 8 + 1e-7


@pytest.mark.slow
def test_prelu_rewrite_is_exact_and_int8_has_no_prelu(held_out: tuple, run_dir: Path, tiny_data: Path,
                                                      tmp_path: Path) -> None:
    from sparse_embed.compression.converter import convert
    from sparse_embed.compression.images import load_images
    from sparse_embed.compression.rewrite import IntegerPReLU, rewrite_prelu
    from sparse_embed.inference import load_backbone
    from sparse_embed.keras import keras

    backbone, config = load_backbone(run_dir)
    # Slopes of both forms: equal (as initialised), and per channel, in [0, 1] and outside it.
    rng = np.random.default_rng(0)
    prelus = [layer for layer in backbone.layers if isinstance(layer, keras.layers.PReLU)]
    for i, layer in enumerate(prelus):
        shape = layer.get_weights()[0].shape
        low, high = ((0.25, 0.25), (0.05, 0.6), (-0.3, 1.4))[i % 3]
        layer.set_weights([rng.uniform(low, high, shape).astype(np.float32)])
    images, _ = held_out
    keras_embeddings = backbone(images, training=False).numpy()
    rewritten = rewrite_prelu(backbone)
    forms = sorted({layer.form.name for layer in rewritten.layers if isinstance(layer, IntegerPReLU)})
    assert forms == ["leaky", "leaky_residual"]
    assert not any(isinstance(layer, keras.layers.PReLU) for layer in rewritten.layers)
    np.testing.assert_allclose(rewritten(images, training=False).numpy(), keras_embeddings,
                               rtol=1e-5, atol=1e-6)
    representative = load_images(str(tiny_data / config.data.train_files), REPRESENTATIVE,
                                 config.model.input_shape)
    content = convert(backbone, "int8", representative)
    path = tmp_path / "int8.tflite"
    path.write_bytes(content)
    ops = {op["op_name"] for op in _interpreter(path, delegates=False)._get_ops_details()}
    assert "PRELU" not in ops and {"LEAKY_RELU", "SUB"} <= ops and "MAXIMUM" not in ops, ops
    cosine = _cosine(_run_tflite(path, images), keras_embeddings)
    assert cosine.mean() >= 0.98, cosine.mean()


def test_unquantizable_op_is_named_and_leaves_no_file(held_out: tuple, tmp_path: Path) -> None:
    from sparse_embed.compression.exporter import export
    from sparse_embed.compression.parity import ParityData
    from sparse_embed.errors import ConfigError
    from sparse_embed.keras import keras
    from sparse_embed.models.embedding import SoftThreshold

    # Soft thresholding is relu(x - t) - relu(-x - t), and TFLite has no int8 NEG kernel.
    # The embedding layer alone, on a small Dense: the conversion of a backbone takes longer.
    inputs = keras.Input((32, 32, 3))
    outputs = SoftThreshold(name="embedding")(keras.layers.Dense(8)(keras.layers.Flatten()(inputs)))
    config = load_config("smoke", ["model.final_activation=soft_threshold"])
    images, _ = held_out
    with pytest.raises(ConfigError, match=r"int8_full: .*first: NEG \(.*embedding") as error:
        export(keras.Model(inputs, outputs), config, "tflite", ["int8_full"], tmp_path,
               ParityData(images), representative=images)
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_quantization_aware_run_exports_integer_only(run_dir: Path, tiny_data: Path, held_out: tuple,
                                                     tmp_path: Path) -> None:
    from sparse_embed.compression.exporter import export
    from sparse_embed.compression.parity import ParityData
    from sparse_embed.inference import load_backbone

    qat_dir = tmp_path / "qat"
    train(load_config("smoke", ["compression.type=qat", "train.steps=1", f"train.init_from={run_dir}"]),
          tiny_data, qat_dir, verbose=0)
    backbone, config = load_backbone(qat_dir)
    images, _ = held_out
    # No representative set: the fake-quant ranges learned in training are the int8 scales.
    (result,) = export(backbone, config, "tflite", ["int8_full"], tmp_path / "export", ParityData(images))
    assert result.passed and result.record["quantization_aware"], result.record["reason"]
    assert result.record["float_ops"] == [] and result.record["representative_count"] == 0
    interpreter = _interpreter(result.model_path, delegates=False)
    assert {np.dtype(d["dtype"]).name for d in interpreter.get_tensor_details()} <= {"int8", "int32"}
    # Every PReLU runs as MUL + MAXIMUM at its output fake-quant's range, with MUL + MINIMUM + ADD
    # where a slope is above 1; without those the rewritten Keras model is the fake-quantized one
    # to the bit.
    from sparse_embed.compression.rewrite import rewrite_prelu
    from sparse_embed.keras import keras

    slopes = [layer.layer.get_weights()[0] for layer in backbone.layers
              if isinstance(getattr(layer, "layer", None), keras.layers.PReLU)]
    above_one = sum(bool(np.any(a > 1)) for a in slopes)
    ops = Counter(op["op_name"] for op in interpreter._get_ops_details())
    assert ops["PRELU"] == 0 and ops["MAXIMUM"] == len(slopes) and ops["MINIMUM"] == above_one, ops
    rewritten = rewrite_prelu(backbone)(images, training=False).numpy()
    if above_one == 0:
        np.testing.assert_array_equal(rewritten, backbone(images, training=False).numpy())
    else:
        assert _cosine(rewritten, backbone(images, training=False).numpy()).min() > 0.999
    # The int8 file reproduces the fake-quantized Keras model it was converted from.
    cosine = _cosine(_run_tflite(result.model_path, images), backbone(images, training=False).numpy())
    assert cosine.mean() > 0.99, cosine.mean()


@pytest.mark.unit
def test_gate_failure_closed_forms() -> None:
    from sparse_embed.compression.parity import gate_failure

    def figures(cosine: float, keras_acc: float | None, exported_acc: float | None) -> dict:
        return {"mean_cosine": cosine, "keras": {"accuracy": keras_acc},
                "exported": {"accuracy": exported_acc}}

    assert gate_failure(figures(0.999, 0.99, 0.986), 0.999, 0.5) == ""
    assert "mean cosine" in gate_failure(figures(0.9989, 0.99, 0.99), 0.999, 0.5)
    # 0.99 -> 0.984 is 0.6 points.
    assert "drops 0.60 points" in gate_failure(figures(1.0, 0.99, 0.984), 0.999, 0.5)
    assert gate_failure(figures(1.0, 0.99, 0.999), 0.999, 0.5) == ""
    assert gate_failure(figures(1.0, None, None), 0.999, 0.5) == ""


@pytest.mark.unit
def test_not_an_onnx_file(tmp_path: Path) -> None:
    # A `.tflite` file that is not one: tests/test_edge.py (the TFLite runtime is sparse_embed.edge's).
    from sparse_embed.compression.onnx import ONNXModel
    from sparse_embed.errors import DataError

    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\x00" * 8)
    with pytest.raises(DataError, match="is not an ONNX model"):
        ONNXModel(fake)
    with pytest.raises(DataError, match="not found"):
        ONNXModel(tmp_path / "missing.onnx")


@pytest.mark.unit
def test_format_takes_only_its_modes() -> None:
    from sparse_embed.compression.formats import check_format
    from sparse_embed.errors import ConfigError

    assert check_format("tflite", "int8_full").filename == "model.tflite"
    with pytest.raises(ConfigError, match="--format=onnx takes --quantize=fp32, got int8"):
        check_format("onnx", "int8")
    with pytest.raises(ConfigError, match="unknown quantization"):
        check_format("tflite", "int4")


def test_model_dir_without_a_trained_model(tiny_data: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert_main_user_error(capsys, export_main, [f"--model_dir={tmp_path}", f"--data_dir={tiny_data}"],
                           "config.yaml not found")
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    save_config(load_config("smoke"), untrained / "config.yaml")
    assert_main_user_error(capsys, export_main, [f"--model_dir={untrained}", f"--data_dir={tiny_data}",
                                                 "--quantize=int8"], "no checkpoint", "train first")
    assert sorted(p.name for p in untrained.iterdir()) == ["config.yaml"]


def test_representative_set_of_the_wrong_size(run_dir: Path, tiny_data: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    array = tmp_path / "calibration.npy"
    np.save(array, np.zeros((4, 28, 28, 3), np.float32))
    assert_main_user_error(capsys, export_main, [f"--model_dir={run_dir}", f"--data_dir={tiny_data}",
                                                 "--quantize=int8", f"--representative={array}",
                                                 f"--output={tmp_path / 'out'}"],
                           "calibration.npy", "(4, 28, 28, 3)", "[N, 32, 32, 3]")
    assert not (tmp_path / "out").exists()
