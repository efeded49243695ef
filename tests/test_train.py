"""Training on tiny data: steps, checkpoints, exact resume, summaries, the non-finite guard."""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import assert_main_user_error, call_main, op_determinism, run_module

from sparse_embed.checkpoints import CHECKPOINT_DIR, checkpoint_for
from sparse_embed.config import load_config
from sparse_embed.errors import TrainingError
from sparse_embed.keras import tf
from sparse_embed.train import main as train_main
from sparse_embed.training.schedules import LearningRateSchedule
from sparse_embed.training.trainer import build_networks, train

pytestmark = pytest.mark.integration

SMOKE = ["data.augment=true", "train.batch_size=8", "train.log_every=5"]


def _weights(model_dir: Path, config) -> list[np.ndarray]:
    backbone, head = build_networks(config, 8)
    latest = tf.train.latest_checkpoint(str(model_dir / CHECKPOINT_DIR))
    checkpoint_for(backbone, head).restore(latest).expect_partial()
    return [w.numpy() for w in backbone.weights + head.weights]


def _scalars(logdir: Path) -> dict[str, list[int]]:
    steps: dict[str, list[int]] = {}
    for path in glob.glob(str(logdir / "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
    return steps


def test_twenty_steps_then_exact_resume(tiny_data: Path, tmp_path: Path) -> None:
    config20 = load_config("smoke", SMOKE + ["train.steps=20"])
    with op_determinism():
        straight = train(config20, tiny_data, tmp_path / "straight", verbose=0)
        assert (straight.step, straight.resumed_from) == (20, 0)
        assert np.isfinite(straight.metrics["loss"])

        # An interrupted run: stop at step 10, then the same command with the full length.
        first = train(load_config("smoke", SMOKE + ["train.steps=10"]), tiny_data,
                      tmp_path / "resumed", verbose=0)
        assert first.step == 10
        second = train(config20, tiny_data, tmp_path / "resumed", verbose=0)
        assert (second.step, second.resumed_from) == (20, 10)
    # Nothing left to do: a third run returns at once.
    assert train(config20, tiny_data, tmp_path / "resumed", verbose=0).resumed_from == 20

    straight_weights = _weights(tmp_path / "straight", config20)
    for a, b in zip(straight_weights, _weights(tmp_path / "resumed", config20), strict=True):
        np.testing.assert_array_equal(a, b)

    saved = yaml.safe_load((tmp_path / "resumed" / "config.yaml").read_text())
    assert saved["train"]["steps"] == 20 and saved["model"]["name"] == "mobilefacenet_tiny"
    scalars = _scalars(tmp_path / "straight" / "logs" / "train")
    for tag in ("loss", "head_loss", "sparsity_loss", "nnz", "flops", "r_sub", "lr"):
        assert scalars[f"train/{tag}"] == [5, 10, 15, 20]


def test_non_finite_loss_stops_with_the_step(tiny_data: Path, tmp_path: Path) -> None:
    config = load_config("smoke", SMOKE + ["schedule.base_lr=1e30", "train.steps=20"])
    with pytest.raises(TrainingError, match=r"at step \d+"):
        train(config, tiny_data, tmp_path / "nan", verbose=0)


@pytest.mark.unit
def test_lr_schedules_follow_their_formulas() -> None:
    cfg = load_config(None, ["schedule.name=piecewise", "schedule.base_lr=0.1",
                             "schedule.boundaries=[10, 20]", "schedule.warmup_steps=4"]).schedule
    lr = LearningRateSchedule(cfg, 30)
    got = [float(lr(s)) for s in (0, 3, 4, 9, 10, 19, 20, 29)]
    np.testing.assert_allclose(got, [0.025, 0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
    cos = LearningRateSchedule(load_config(None, ["schedule.name=cosine", "schedule.base_lr=1.0"])
                               .schedule, 100)
    np.testing.assert_allclose([float(cos(s)) for s in (0, 50, 100)],
                               [1.0, 0.5, 0.0], atol=1e-6)


def test_train_cli_runs_and_rejects_bad_input(tiny_data: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """In this process (main(argv)); the real command runs in
    test_tensorflow_start_up_lines_stay_off_the_terminal."""
    capsys.readouterr()
    assert call_main(train_main, "--config=smoke", f"--data_dir={tiny_data}",
                     f"--model_dir={tmp_path / 'cli'}", "--set", "train.steps=2") == 0
    assert "step 2" in capsys.readouterr().out

    # The rejections: one line, exit status 2, nothing written.
    bad = tmp_path / "bad"
    for args, fragment in (
            ([f"--data_dir={tiny_data}", "--set", "sparsity.wieght=1"], "sparsity.weight"),
            ([f"--data_dir={tmp_path / 'missing'}"], "does not exist"),
            ([f"--data_dir={tiny_data}", "--set", "data.train_files=nothing-*"], "no TFRecords match"),
            ([f"--data_dir={tiny_data}"], "--model_dir"),
    ):
        model_dir = [] if fragment == "--model_dir" else [f"--model_dir={bad}"]
        assert_main_user_error(capsys, train_main, ["--config=smoke", *args, *model_dir], fragment)
    assert not bad.exists(), "a rejected run must not leave a model_dir behind"


def test_mixed_precision_trains_finite_and_resumes(tiny_data: Path, tmp_path: Path) -> None:
    """float16 backbone, float32 embeddings/regularizer/loss, dynamic loss scaling, on CPU."""
    overrides = SMOKE + ["train.mixed_precision=true"]
    result = train(load_config("smoke", overrides + ["train.steps=6"]), tiny_data,
                   tmp_path / "mp", verbose=0)
    assert result.step == 6
    assert all(np.isfinite(v) for v in result.metrics.values()), result.metrics
    assert result.metrics["loss_scale"] >= 1
    backbone = result.model.backbone
    # Convolutions and BatchNorm compute in float16 on float32 variables; the
    # output layer (the embedding after its final activation) is float32.
    assert {layer.dtype_policy.name for layer in backbone.layers if layer.weights} == {
        "mixed_float16"}
    assert all(w.dtype == tf.float32 for w in backbone.weights)
    assert backbone.get_layer("embedding").dtype_policy.name == "float32"
    images = tf.zeros((2, 32, 32, 3))
    assert backbone(images).dtype == tf.float32
    assert result.model.head(backbone(images), tf.constant([0, 1])).dtype == tf.float32
    # Building under the policy does not leak it to the rest of the process.
    from sparse_embed.keras import keras
    assert keras.mixed_precision.global_policy().name == "float32"

    resumed = train(load_config("smoke", overrides + ["train.steps=10"]), tiny_data,
                    tmp_path / "mp", verbose=0)
    assert (resumed.step, resumed.resumed_from) == (10, 6)
    assert np.isfinite(resumed.metrics["loss"])


def test_tensorflow_start_up_lines_stay_off_the_terminal(tiny_data: Path, tmp_path: Path) -> None:
    """Only our progress and summary reach the user; SPARSE_EMBED_TF_LOGS=1 brings TF's lines back."""
    args = ("sparse_embed.train", "--config=smoke", f"--data_dir={tiny_data}", "--set",
            "train.steps=2", "--set", "train.checkpoint_every=1")
    proc = run_module(*args, f"--model_dir={tmp_path / 'quiet'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    noise = ("absl::InitializeLog", "oneDNN", "cuda", "cpu_feature_guard", "Sharding callback",
             "TFRecordDataset buffer_size")
    assert not [line for line in proc.stderr.splitlines() if any(n in line for n in noise)], (
        proc.stderr)

    # The switch lives where every entry point imports TensorFlow (sparse_embed.keras), and
    # the lines come at that import: importing it is enough, no second training.
    loud = run_module("sparse_embed.keras", env={"SPARSE_EMBED_TF_LOGS": "1"})
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert "oneDNN" in loud.stderr or "cuda" in loud.stderr


def test_truncated_shard_stops_with_one_line_naming_it(tiny_data: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shard = sorted((data / "tfrecords").glob("train-*"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size * 2 // 3)
    assert_main_user_error(capsys, train_main, ["--config=smoke", f"--data_dir={data}",
                                                f"--model_dir={tmp_path / 'run'}", "--set", "train.steps=40"],
                           f"TFRecord shard {shard} is damaged after", "sparse-embed-build-tfrecords")


def test_pk_sampler_trains_and_checks_p_times_k(tiny_data: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    config = load_config("smoke", ["train.batch_size=8", "train.steps=4", "data.sampler=p_k",
                                   "data.classes_per_batch=4", "data.samples_per_class=2"])
    result = train(config, tiny_data, tmp_path / "pk", verbose=0)
    assert result.step == 4 and result.samples == 32 and np.isfinite(result.metrics["loss"])
    bad = tmp_path / "bad"
    assert_main_user_error(capsys, train_main,
                           ["--config=smoke", f"--data_dir={tiny_data}", f"--model_dir={bad}",
                            "--set=train.batch_size=8", "--set=data.sampler=p_k",
                            "--set=data.classes_per_batch=3", "--set=data.samples_per_class=2"],
                           "data.classes_per_batch x data.samples_per_class = 3 x 2 must equal")
    assert not bad.exists()


def test_flip_policy_trains_on_uint8_batches(tiny_data: Path, tmp_path: Path) -> None:
    config = load_config("smoke", ["train.batch_size=8", "train.steps=3", "data.augmentation=flip"])
    result = train(config, tiny_data, tmp_path / "flip", verbose=0)
    assert result.step == 3 and np.isfinite(result.metrics["loss"])


def test_pair_loss_trains_on_pk_batches_and_needs_them(tiny_data: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Multi-Similarity on 4 classes x 2 images a batch runs end to end; without the P x K
    sampler the CLI stops on one line before anything is built."""
    config = load_config("smoke", ["train.batch_size=8", "train.steps=3", "data.sampler=p_k",
                                   "data.classes_per_batch=4", "data.samples_per_class=2",
                                   "head.name=multi_similarity"])
    result = train(config, tiny_data, tmp_path / "ms", verbose=0)
    assert result.step == 3 and np.isfinite(result.metrics["loss"])
    assert 0.0 <= result.metrics["accuracy"] <= 1.0
    bad = tmp_path / "bad"
    assert_main_user_error(capsys, train_main, ["--config=smoke", f"--data_dir={tiny_data}",
                                                f"--model_dir={bad}", "--set=head.name=triplet"],
                           "head.name=triplet is a pair loss",
                           "set data.sampler: p_k (with data.samples_per_class >= 2)")
    assert not bad.exists()


def test_other_backbone_and_margin_head_train_from_the_cli(tiny_data: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert call_main(train_main, "--config=smoke", f"--data_dir={tiny_data}",
                     f"--model_dir={tmp_path / 'r'}", "--set=model.name=iresnet_tiny",
                     "--set=head.name=cosface", "--set=head.params.margin=0.35", "--set=train.steps=2") == 0
    assert "step 2" in capsys.readouterr().out
    bad = tmp_path / "bad"
    base = ["--config=smoke", f"--data_dir={tiny_data}", f"--model_dir={bad}"]
    assert_main_user_error(capsys, train_main, [*base, "--set=model.name=sphereface20"],
                           "sphereface20", "112")
    assert_main_user_error(capsys, train_main, [*base, "--set=model.name=resnet9000"],
                           "unknown model 'resnet9000'", "iresnet50")
    assert not bad.exists()


def test_a_run_dir_with_an_old_flat_config_resumes_and_loads(tiny_data: Path, tmp_path: Path) -> None:
    """A run trained before head.params (its config.yaml in the old flat layout, as the old code
    wrote it) resumes under today's config of the same run, and its backbone loads for embed,
    evaluate and export."""
    from sparse_embed.inference import load_backbone

    overrides = ["train.batch_size=8", "sparsity.type=none"]
    run = tmp_path / "run"
    train(load_config("smoke", overrides + ["train.steps=2"]), tiny_data, run, verbose=0)
    old = yaml.safe_load((Path(__file__).parent / "data" / "legacy_configs" / "smoke.yaml").read_text())
    old["train"].update(batch_size=8, steps=2)
    old["sparsity"]["type"] = "none"
    assert old["head"]["margin"] == 0.3 and "params" not in old["head"]
    (run / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))

    resumed = train(load_config("smoke", overrides + ["train.steps=3"]), tiny_data, run, verbose=0)
    assert (resumed.step, resumed.resumed_from) == (3, 2)
    (run / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    backbone, config = load_backbone(run)
    assert config.head.params.margin == 0.3 and backbone.output_shape == (None, 64)
