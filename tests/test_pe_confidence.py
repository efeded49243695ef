"""Confidence through the suite: `embed` writes it, `evaluate` scores pairs with the run's scorer
and judges the confidence, the in-training verification logs the same, `load_backbone` refuses a
config whose distribution does not fit the checkpoint, `export` writes it as a second output.

One HIB run (Gaussians in R^D, its own trained scorer, a confidence) trained once per module is
the subject; a copy of it read as SPE (the same Gaussians, scored with MLS) checks the MLS path
without a second training."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import assert_main_user_error, call_main, scalars

from sparse_embed.checkpoints import CHECKPOINT_DIR, variable_key
from sparse_embed.config import load_config
from sparse_embed.data.embeddings import read_hdf5
from sparse_embed.data.verification import read_pairs, unique_images
from sparse_embed.embed import main as embed_main
from sparse_embed.evaluate import main as evaluate_main
from sparse_embed.inference import (
    CONFIDENCE_METRICS,
    confidence_function,
    embedding_function,
    load_backbone,
    parameters_function,
    scoring_for,
    verify_pairs,
)
from sparse_embed.keras import tf
from sparse_embed.metrics.uncertainty import verification_confidence_metrics
from sparse_embed.training.trainer import train

pytestmark = pytest.mark.integration

# nin_tiny, 16-d, 16x16 input; two steps of batch 8 (as tests/test_pe_methods.py), verified in training.
HIB = ["model.name=nin_tiny", "model.input_size=16", "model.embedding_size=16", "train.steps=2",
       "train.batch_size=8", "train.checkpoint_every=1", "data.augment=false", "head.name=hib",
       "model.distribution.name=gaussian", "head.params.num_samples=2", "eval.every_steps=2",
       "eval.keep_best=lfw/accuracy"]
# Results that time the search, not the same from one run to the next.
TIMED = ("search_ms_per_query", "postings_per_query")


@pytest.fixture(scope="module")
def hib_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hib") / "run"
    train(load_config("smoke", HIB), tiny_data, out, verbose=0)
    return out


def _as(run: Path, target: Path, model: dict | None = None, head: dict | None = None,
        data: dict | None = None) -> Path:
    """A copy of `run` whose config.yaml has the given sections updated."""
    shutil.copytree(run, target)
    config = yaml.safe_load((target / "config.yaml").read_text())
    for section, values in (("model", model), ("head", head), ("data", data)):
        if values is not None:
            config[section] = {**config[section], **values}
    (target / "config.yaml").write_text(yaml.safe_dump(config))
    return target


def _pair_images(run: Path, tiny_data: Path) -> tuple[tf.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """(the distinct images of the run's pairs, left, right, issame), decoded as the suite decodes them."""
    from sparse_embed.data.pipeline import files_dataset

    pairs = read_pairs(tiny_data / "pairs.txt", tiny_data / "test")
    paths, left, right = unique_images(pairs)
    images = tf.concat([batch for batch, _, _ in files_dataset(list(paths), None, 64, (16, 16))], 0)
    return images, left, right, pairs.issame


def test_evaluate_scores_with_the_trained_hib_scorer_and_judges_the_confidence(
        hib_run: Path, tiny_data: Path, tmp_path: Path) -> None:
    """eval.json of a HIB run: its results are those of the library's verification with HIB's
    scorer at the checkpoint's trained scale and bias (not their initial 1 and 0); the confidence
    metrics are `verification_confidence_metrics` of those scores with the pair confidence the
    smaller of the two images' confidences; the risk-coverage plot is beside eval.json; the
    in-training verification logged the same confidence metrics at its last step, and the best
    backbone it kept comes with the scorer's weights of its step."""
    output = tmp_path / "eval.json"
    assert call_main(evaluate_main, f"--model_dir={hib_run}", f"--output={output}") == 0
    written = json.loads(output.read_text())
    assert (tmp_path / "eval.risk.png").stat().st_size > 0

    backbone, config = load_backbone(hib_run)
    scoring = scoring_for(backbone, config, hib_run)
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(hib_run / CHECKPOINT_DIR)))
    trained = [reader.get_tensor(variable_key(f"head/scorer/{w}")) for w in ("scale", "bias")]
    assert scoring.name == "hib"
    np.testing.assert_array_equal([scoring.scorer.scale.numpy(), scoring.scorer.bias.numpy()], trained)
    assert trained != [1.0, 0.0]
    best = json.loads((hib_run / "best" / "best.json").read_text())["step"]
    kept = tf.train.load_checkpoint(str(hib_run / "best" / CHECKPOINT_DIR / f"ckpt-{best}"))
    at_best = tf.train.load_checkpoint(str(hib_run / CHECKPOINT_DIR / f"ckpt-{best}"))
    for name in ("scale", "bias"):
        key = variable_key(f"head/scorer/{name}")
        assert kept.get_tensor(key) == at_best.get_tensor(key)
    verified = verify_pairs(backbone, config, read_pairs(tiny_data / "pairs.txt", tiny_data / "test"),
                            scoring=scoring)
    assert {k: v for k, v in written.items() if k not in TIMED} == {
        k: v for k, v in verified.results.items() if k not in TIMED}

    images, left, right, issame = _pair_images(hib_run, tiny_data)
    distribution = config.model.distribution.build(config.model.embedding_size)
    confidence = confidence_function(backbone, distribution)(images).numpy()
    pair_confidence = np.minimum(confidence[left], confidence[right])
    np.testing.assert_array_equal(verified.confidence, pair_confidence)
    expected = verification_confidence_metrics(verified.scores, issame, pair_confidence)
    for key in CONFIDENCE_METRICS:
        assert written[key] == pytest.approx(expected[key], rel=1e-12, nan_ok=True), key
        logged = scalars(hib_run, f"eval/lfw/{key}")
        assert logged[2] == pytest.approx(expected[key], rel=1e-6, nan_ok=True), key


def test_evaluate_scores_mls_runs_with_the_mutual_likelihood(hib_run: Path, tiny_data: Path,
                                                             tmp_path: Path) -> None:
    """The same Gaussians read by an MLS-scored head (SPE): each pair's score is PFE's log MLS,
    -1/2 (D log 2 pi + |mu1 - mu2|^2 / (s1 + s2) + D log(s1 + s2)), computed here in NumPy from
    the exported mean and variance (sigma^2 = invlin(h) + exp(-10))."""
    run = _as(hib_run, tmp_path / "spe", head={"name": "spe", "params": {}},
              data={"sampler": "p_k", "classes_per_batch": 4, "samples_per_class": 2})
    backbone, config = load_backbone(run)
    verified = verify_pairs(backbone, config, read_pairs(tiny_data / "pairs.txt", tiny_data / "test"),
                            scoring=scoring_for(backbone, config, run))
    images, left, right, _ = _pair_images(run, tiny_data)
    parameters = parameters_function(backbone)(images).numpy().astype(np.float64)
    dim = config.model.embedding_size
    mu, hidden = parameters[:, :dim], parameters[:, dim]
    variance = np.where(hidden < 0, 1 / (1 - np.minimum(hidden, 0)), 1 + hidden) + math.exp(-10)
    total = variance[left] + variance[right]
    mls = -0.5 * (dim * math.log(2 * math.pi) + np.sum((mu[left] - mu[right]) ** 2, 1) / total
                  + dim * np.log(total))
    np.testing.assert_allclose(verified.scores, mls, rtol=1e-5)


def test_embed_writes_the_mean_and_the_confidence_of_both_views(hib_run: Path, tiny_data: Path,
                                                                tmp_path: Path) -> None:
    """With --flip=sum: the embedding is the normalised sum of both views' means, and the
    confidence the smaller of the two views' confidences."""
    output = tmp_path / "pairs.hdf5"
    assert call_main(embed_main, f"--model_dir={hib_run}", f"--output={output}", "--flip=sum") == 0
    written = read_hdf5(output)
    backbone, config = load_backbone(hib_run)
    images, _, _, _ = _pair_images(hib_run, tiny_data)
    distribution = config.model.distribution.build(config.model.embedding_size)
    confidence = confidence_function(backbone, distribution)
    both = np.minimum(confidence(images).numpy(), confidence(tf.image.flip_left_right(images)).numpy())
    assert written.confidence is not None and written.confidence.dtype == np.float32
    np.testing.assert_allclose(written.confidence, both, rtol=1e-6)
    np.testing.assert_allclose(written.embedding, embedding_function(backbone, "sum")(images).numpy(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model, fragments", [
    ({"distribution": {"name": "dirac"}},
     ["has 9 layers with weights", "8 with model.distribution.name=dirac (16 parameters per image)"]),
    ({"distribution": {"name": "gaussian", "covariance": "diagonal"}},
     ["model.distribution.name=gaussian (32 parameters per image)", "incompatible tensor with shape (1,)",
      "extra/bias"]),
])
def test_config_distribution_that_does_not_fit_the_checkpoint_is_one_line(
        hib_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], model: dict,
        fragments: list[str]) -> None:
    head = {"name": "arcface", "params": {}} if model["distribution"]["name"] == "dirac" else None
    run = _as(hib_run, tmp_path / "run", model=model, head=head)
    assert_main_user_error(capsys, evaluate_main, [f"--model_dir={run}", f"--output={tmp_path / 'e.json'}"],
                           "does not fit" if head is None else "trained with another model", *fragments)
    assert not (tmp_path / "e.json").exists()


# --- export and the edge script -----------------------------------------------------------------

@pytest.fixture(scope="module")
def hib_tflite(hib_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HIB run exported to float TFLite (two outputs), through the parity gate."""
    from sparse_embed.export import main as export_main

    output = tmp_path_factory.mktemp("hib_export")
    assert call_main(export_main, f"--model_dir={hib_run}", f"--output={output}", "--format=tflite",
                     "--quantize=fp32", "--held_out=8") == 0
    return output / "tflite_fp32"


def test_exported_tflite_confidence_equals_keras_within_the_gate(hib_run: Path, hib_tflite: Path,
                                                                 tiny_data: Path) -> None:
    """The .tflite file has an embedding and a confidence output; on the pairs' images, run by
    LiteRT, its confidence is the Keras confidence and its embedding the Keras mean, within the
    float gate (relative difference <= 1 - 0.999); export.json records both outputs and passed."""
    from sparse_embed.edge.runtime import TFLiteModel

    record = json.loads((hib_tflite / "export.json").read_text())
    assert record["passed"] and record["output"]["shape"] == [-1, 16]
    assert record["confidence_output"]["shape"] == [-1]
    assert record["parity"]["confidence_max_rel_diff"] <= 1e-3

    model = TFLiteModel.from_path(hib_tflite / "model.tflite")
    backbone, config = load_backbone(hib_run)
    images, _, _, _ = _pair_images(hib_run, tiny_data)
    embedding, confidence = model.call_with_confidence(images.numpy())
    distribution = config.model.distribution.build(config.model.embedding_size)
    keras_confidence = confidence_function(backbone, distribution)(images).numpy()
    scale = max(np.ptp(keras_confidence), np.abs(keras_confidence).max())
    assert np.abs(confidence - keras_confidence).max() <= 1e-3 * scale
    np.testing.assert_allclose(embedding, backbone(images).numpy()[:, :16], rtol=1e-4, atol=1e-5)


def test_integer_export_of_a_confidence_is_one_line(hib_run: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from sparse_embed.export import main as export_main

    assert_main_user_error(capsys, export_main, [f"--model_dir={hib_run}", f"--output={tmp_path}",
                                                 "--quantize=int8_full"],
                           "--quantize=int8_full", "(LOG, NEG), which has no int8 kernel",
                           "--quantize=fp32, fp16 or dynamic")
    assert not list(tmp_path.iterdir())


def test_edge_script_reports_the_confidence_and_rejects_the_least_confident_pairs(
        hib_run: Path, hib_tflite: Path, tiny_data: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A pair's confidence is the smallest of its four runs' (the Keras confidences of both images
    and their mirror images); --reject_fraction=0.25 drops the 6 least confident of the 24 pairs
    and the kept accuracy is the protocol's accuracy on the other 18."""
    from sparse_embed.edge import lfw

    output = tmp_path / "edge.json"
    assert call_main(lfw.main, f"--model={hib_tflite / 'model.tflite'}", f"--pairs={tiny_data / 'pairs.txt'}",
                     f"--images={tiny_data / 'test'}", "--aligned", "--reject_fraction=0.25",
                     "--num_threads=1", f"--output={output}") == 0
    report = capsys.readouterr().out
    assert "pair confidence" in report and "accuracy kept" in report
    result = json.loads(output.read_text())

    backbone, config = load_backbone(hib_run)
    images, left, right, issame = _pair_images(hib_run, tiny_data)
    distribution = config.model.distribution.build(config.model.embedding_size)
    # The edge script resizes the 112x112 crops with OpenCV, the suite with TensorFlow: the
    # confidences agree to the resampling, not bit for bit.
    image_confidence = confidence_function(backbone, distribution, "sum")(images).numpy()
    expected = np.minimum(image_confidence[left], image_confidence[right])
    np.testing.assert_allclose(result["pair_confidences"], expected, rtol=0.05)
    confidences = np.array(result["pair_confidences"])
    assert result["confidence"]["mean"] == pytest.approx(confidences.mean())
    assert result["rejected_pairs"] == 6 and result["kept_pairs"] == 18
    kept = np.sort(np.argsort(-confidences, kind="stable")[:18])
    scores, same = np.array(result["scores"]), np.array(result["issame"])
    pairs = read_pairs(tiny_data / "pairs.txt", tiny_data / "test")
    assert result["kept_accuracy"] == lfw.accuracy(scores[kept], same[kept], pairs.fold[kept])["accuracy"]
    assert result["kept_min_confidence"] == confidences[kept].min()


def test_edge_reject_fraction_without_a_confidence_output_is_one_line(
        tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sparse_embed.edge import lfw
    from sparse_embed.keras import keras

    inputs = keras.Input((16, 16, 3))
    model = keras.Model(inputs, keras.layers.Dense(4)(keras.layers.Flatten()(inputs)))
    path = tmp_path / "dirac.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    args = [f"--model={path}", f"--pairs={tiny_data / 'pairs.txt'}", f"--images={tiny_data / 'test'}",
            "--aligned"]
    assert_main_user_error(capsys, lfw.main, [*args, "--reject_fraction=0.1"],
                           "--reject_fraction needs a model with a confidence output")
    assert_main_user_error(capsys, lfw.main, [*args, "--reject_fraction=1"],
                           "--reject_fraction must be in [0, 1), got 1.0")


def test_app_enrol_refuses_faces_below_the_predicted_confidence(hib_run: Path, tiny_data: Path,
                                                                tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m sparse_embed.app enroll --min_confidence`: the crops whose confidence (the
    run's, as confidence_function gives it with the run's flip mode) is below the bar are
    reported with it and skipped; the others are enrolled."""
    from sparse_embed.app.__main__ import main as app_main
    from sparse_embed.app.embedder import load_embedder
    from sparse_embed.app.gallery import Gallery
    from sparse_embed.edge.preprocess import decode, resize_crop

    people = tmp_path / "people"
    shutil.copytree(tiny_data / "train" / "id_00000", people / "ann")
    paths = sorted(str(p) for p in (people / "ann").iterdir())
    embedder = load_embedder(hib_run)
    confidence = embedder.confidence([resize_crop(decode(p), embedder.width, embedder.height) for p in paths])
    bar = float(np.median(confidence))
    capsys.readouterr()
    assert call_main(app_main, "enroll", f"--gallery={tmp_path / 'g'}", f"--model={hib_run}",
                     f"--images={people}", "--aligned", f"--min_confidence={bar}") == 0
    out = capsys.readouterr().out
    enrolled = Gallery.load(tmp_path / "g").people["ann"]["images"]
    assert enrolled == [p for p, c in zip(paths, confidence, strict=True) if c >= bar]
    assert 0 < len(enrolled) < len(paths)
    for path, value in zip(paths, confidence, strict=True):
        assert (path in out) == (path not in enrolled)
        if path not in enrolled:
            assert f"confidence {value:.3f}, below --min_confidence={bar:g}" in out
