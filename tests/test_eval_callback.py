"""Verification during training: scalars logged per set, the best weights kept, resumed and restored."""

from __future__ import annotations

import dataclasses
import glob
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_main_user_error, scalars

from sparse_embed.config import load_config
from sparse_embed.data.verification import read_bin, read_pairs, write_bin
from sparse_embed.train import main as train_main
from sparse_embed.training.callbacks import BEST_DIR, BEST_JSON, read_best
from sparse_embed.training.trainer import train

pytestmark = pytest.mark.integration

EVAL = ["train.steps=5", "eval.every_steps=2", "eval.keep_best=lfw/accuracy"]
# Evaluations every 2 steps and at the end of a 5-step run.
STEPS = [2, 4, 5]


@pytest.fixture(scope="module")
def pack(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A .bin pack of the training images with 1000 different pairs: enough for TAR at FAR=1e-3."""
    images = sorted(glob.glob(str(tiny_data / "train" / "*" / "*.jpg")))
    identity = [Path(p).parent.name for p in images]
    pairs = list(itertools.combinations(range(len(images)), 2))
    same = [(a, b) for a, b in pairs if identity[a] == identity[b]]
    different = [(a, b) for a, b in pairs if identity[a] != identity[b]][:1000]
    chosen = same + different
    data = [Path(images[i]).read_bytes() for pair in chosen for i in pair]
    path = tmp_path_factory.mktemp("pack") / "synth.bin"
    write_bin(path, data, [True] * len(same) + [False] * len(different))
    return path


def _sets(pack: Path) -> str:
    # `lfw`: the run's own data.pairs; the pack by an absolute path (relative ones join --data_dir).
    return f"eval.sets=[lfw, {{name: synth, bin: {pack}}}]"


@pytest.fixture(scope="module")
def run(tiny_data: Path, pack: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval_callback") / "run"
    train(load_config("smoke", [*EVAL, _sets(pack)]), tiny_data, out, verbose=0)
    return out


def _with_flip_sum(config):
    return dataclasses.replace(config, eval=dataclasses.replace(config.eval, flip="sum"))


def test_every_set_is_logged_at_every_evaluation_with_the_evaluate_figures(
        run: Path, pack: Path) -> None:
    """The last evaluation's scalars are what `evaluate_bin` measures on the final checkpoint."""
    from sparse_embed.inference import evaluate_bin, load_backbone

    for tag in ("eval/lfw/accuracy", "eval/lfw/auc", "eval/lfw/mean_nnz", "eval/synth/accuracy",
                "eval/synth/auc", "eval/synth/tar@far=1e-3", "eval/synth/mean_nnz",
                "eval/synth/flops_per_pair", "eval/synth/threshold", "eval/synth/r_sub"):
        assert list(scalars(run, tag)) == STEPS, tag
    # 24 pairs (12 different) are too few for TAR at FAR=1e-3: that tag is left out, not faked.
    assert not scalars(run, "eval/lfw/tar@far=1e-3")

    backbone, config = load_backbone(run)  # the latest checkpoint: step 5
    expected, _ = evaluate_bin(backbone, _with_flip_sum(config), read_bin(pack), name=pack.name)
    for key, tag in (("accuracy", "accuracy"), ("auc", "auc"), ("tar@far=0.001", "tar@far=1e-3"),
                     ("mean_nnz", "mean_nnz"), ("flops_per_pair", "flops_per_pair")):
        assert scalars(run, f"eval/synth/{tag}")[5] == pytest.approx(expected[key], abs=1e-6), key
    assert 0 < expected["mean_nnz"] < 64


def test_best_is_the_first_step_of_the_highest_accuracy_and_restores(
        run: Path, tiny_data: Path) -> None:
    from sparse_embed.inference import evaluate_verification, load_backbone

    logged = scalars(run, "eval/lfw/accuracy")
    steps, values = list(logged), list(logged.values())
    best = read_best(run)
    assert best["metric"] == "lfw/accuracy" and best["mode"] == "max"
    assert best["step"] == steps[int(np.argmax(values))]
    assert best["value"] == pytest.approx(max(values), abs=1e-6)
    assert best["metrics"]["synth"]["tar@far=1e-3"] == pytest.approx(
        scalars(run, "eval/synth/tar@far=1e-3")[best["step"]], abs=1e-6)
    assert sorted(p.name for p in (run / BEST_DIR).iterdir()) == ["best.json", "checkpoints",
                                                                  "config.yaml", "run.json"]
    assert len(list(run.glob(f".{BEST_DIR}-*"))) == 1, "older bests are removed"

    # best/ is a model dir: its weights, evaluated again, give the accuracy that was logged.
    backbone, config = load_backbone(run / BEST_DIR)
    assert config.eval.flip == "sum", "best/config.yaml records the flip mode of the evaluation"
    results, _ = evaluate_verification(backbone, config,
                                       read_pairs(tiny_data / "pairs.txt", tiny_data / "test"))
    assert results["accuracy"] == pytest.approx(best["value"], abs=1e-9)
    assert results["auc"] == pytest.approx(best["metrics"]["lfw"]["auc"], abs=1e-6)


def test_resume_keeps_the_best_value(run: Path, tiny_data: Path, pack: Path, tmp_path: Path) -> None:
    """A resumed run compares against best.json's value, not against its own first evaluation."""
    resumed = tmp_path / "run"
    shutil.copytree(run, resumed, symlinks=True)
    path = resumed / BEST_DIR / BEST_JSON
    unbeatable = dict(json.loads(path.read_text()), value=2.0)
    path.write_text(json.dumps(unbeatable))
    config = load_config("smoke", [*EVAL, _sets(pack), "train.steps=7"])
    result = train(config, tiny_data, resumed, verbose=0)
    assert (result.resumed_from, result.step) == (5, 7)
    assert list(scalars(resumed, "eval/lfw/accuracy")) == [*STEPS, 6, 7]
    assert read_best(resumed) == unbeatable


def test_bad_eval_config_is_one_line_before_training(tiny_data: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """In this process (main(argv))."""
    out = tmp_path / "run"

    def train_args(*overrides: str) -> list[str]:
        args = ["--config=smoke", f"--data_dir={tiny_data}", f"--model_dir={out}"]
        for item in ("eval.every_steps=2", *overrides):
            args += ["--set", item]
        return args

    assert_main_user_error(capsys, train_main, train_args("eval.keep_best=lfw/acc"),
                           "eval.keep_best metric 'acc'", "accuracy")
    assert_main_user_error(capsys, train_main, train_args("eval.keep_best=cfp/accuracy"),
                           "eval.keep_best=cfp/accuracy", "eval.sets (lfw)")
    assert_main_user_error(capsys, train_main, train_args("eval.sets=[{name: cfp, bin: no_such.bin}]"),
                           "eval.sets 'cfp'", "no_such.bin", "not found")
    assert not out.exists()
