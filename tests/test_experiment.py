"""Experiment statistics: cval splits by identity, several seeds, the Optuna search and its resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, assert_main_user_error

from sparse_embed import experiment
from sparse_embed.config import load_config, search_space, split_search_space
from sparse_embed.errors import ConfigError

pytestmark = pytest.mark.integration

# The smoke config cut to 2 steps, evaluated after each: a trial reports step 1 to the pruner.
SHORT = ["--set", "train.steps=2", "--set", "train.checkpoint_every=1", "--set", "train.batch_size=8"]

SEARCH = """\
model: {name: mobilefacenet_tiny, embedding_size: 16, final_activation: relu, input_size: 32}
head: {name: arcface, params: {scale: 16.0, margin: 0.3, _hopt: {scale: {min: 1, max: 64, log: true}}}}
optimizer: {name: sgd, momentum: 0.9, weight_decay: 0.0, _hopt: {name: {values: [sgd, adam]}}}
schedule: {name: constant, base_lr: 0.05, _hopt: {base_lr: {min: 1.0e-3, max: 0.1, log: true}}}
train: {batch_size: 8, steps: 2, checkpoint_every: 1, log_every: 1,
        _hopt: {batch_size: {min: 4, max: 8, step: 4}}}
eval: {batch_size: 64, every_steps: 1}
data: {shuffle_buffer: 64}
"""


def _search_yaml(tmp_path: Path, text: str = SEARCH) -> Path:
    path = tmp_path / "search.yaml"
    path.write_text(text)
    return path


@pytest.mark.unit
def test_cval_splits_by_identity_without_leakage() -> None:
    """Every identity is in exactly one fold, the folds differ in size by at most one, the same
    seed gives the same split and another seed another one."""
    names = [f"id_{i:03d}" for i in range(23)]
    folds = experiment.split_identities(names, 5, seed=3)
    assert len(folds) == 5
    flat = [n for fold in folds for n in fold]
    assert sorted(flat) == names and len(set(flat)) == len(flat)
    for i, a in enumerate(folds):
        for b in folds[i + 1:]:
            assert not set(a) & set(b)
    assert {len(f) for f in folds} == {4, 5}
    assert experiment.split_identities(names, 5, seed=3) == folds
    assert experiment.split_identities(names, 5, seed=4) != folds
    with pytest.raises(ConfigError, match="larger than the number of identities"):
        experiment.split_identities(names, 24, seed=0)


@pytest.mark.unit
def test_heldout_pairs_stay_inside_the_fold() -> None:
    """Held-out pairs are distinct, name only the fold's identities and images, and split into
    folds of equally many same and different pairs."""
    images = {"a": 3, "b": 2, "c": 4}
    same, different, nfolds = experiment.heldout_pairs(images, 10, 300, seed=0)
    # 3 + 1 + 6 same pairs make at most 10 folds of one pair.
    assert nfolds == 10 and len(same) == len(different) == 10
    assert len(set(same)) == len(same) and len(set(different)) == len(different)
    for name, k1, k2 in same:
        assert 0 <= k1 < k2 < images[name]
    for a, ka, b, kb in different:
        assert a != b and ka < images[a] and kb < images[b]
    assert experiment.heldout_pairs(images, 10, 300, seed=0) == (same, different, nfolds)


@pytest.mark.unit
def test_search_ranges_are_read_and_left_out_of_the_config(tmp_path: Path) -> None:
    """`_hopt` mappings in any section are not settings: the config loads without them, and
    the search reads an integer, a real (log) and a choice range from them."""
    path = _search_yaml(tmp_path)
    config = load_config(str(path))
    assert config.head.params.scale == 16.0 and config.train.batch_size == 8
    tree, space = split_search_space({"a": {"_hopt": {"x": {"min": 1}}, "b": {"_hopt": {"y": 2}}}})
    assert tree == {"a": {"b": {}}} and space == {"a.x": {"min": 1}, "a.b.y": 2}
    assert list(search_space(str(path))) == ["head.params.scale", "optimizer.name",
                                            "schedule.base_lr", "train.batch_size"]
    ranges = {r.key: r for r in experiment.parse_search_space(str(path))}
    assert (ranges["head.params.scale"].kind, ranges["head.params.scale"].log) == ("float", True)
    assert ranges["optimizer.name"].values == ("sgd", "adam")
    assert (ranges["train.batch_size"].kind, ranges["train.batch_size"].step) == ("int", 4.0)
    # A key the experiment fixes with --set is not searched.
    fixed = experiment.parse_search_space(str(path), ["optimizer.name=adam"])
    assert "optimizer.name" not in {r.key for r in fixed}


@pytest.mark.unit
@pytest.mark.parametrize("declaration, fragment", [
    ("{min: 64, max: 1}", "min 64 is larger than max 1"),
    ("{min: 1, max: 64, lg: true}", "unknown key 'lg'"),
    ("{min: 0, max: 64, log: true}", "log range needs min > 0"),
    ("{values: []}", "non-empty list"),
    ("{max: 4}", "needs min and max"),
])
def test_bad_search_range_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      declaration: str, fragment: str) -> None:
    """A bad `_hopt` range is one line and exit status 2, before anything is written."""
    path = _search_yaml(tmp_path, SEARCH.replace("{min: 1, max: 64, log: true}", declaration))
    out = tmp_path / "out"
    assert_main_user_error(capsys, experiment.main,
                           ["hopt", f"--config={path}", f"--data_dir={tmp_path}",
                            f"--output={out}", "--trials=3"], fragment)
    assert not out.exists()


@pytest.mark.unit
def test_search_range_of_an_unknown_key_is_one_line(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A `_hopt` on a key the section does not have names the key and the closest one."""
    path = _search_yaml(tmp_path, SEARCH.replace("_hopt: {scale:", "_hopt: {scal:"))
    out = tmp_path / "out"
    assert_main_user_error(capsys, experiment.main,
                           ["hopt", f"--config={path}", f"--data_dir={tmp_path}",
                            f"--output={out}", "--trials=3"], "head.params.scal", "scale")
    assert not out.exists()


def test_more_folds_than_identities_is_one_line(tiny_data: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """--folds above the number of identities (8) is one line, exit 2, nothing written."""
    out = tmp_path / "out"
    for command in (["cval", "--config=smoke", "--folds=9"],
                    ["hopt", f"--config={_search_yaml(tmp_path)}", "--trials=1", "--cval=9"]):
        assert_main_user_error(capsys, experiment.main,
                               [*command, f"--data_dir={tiny_data}", f"--output={out}"],
                               "=9 is larger than the number of identities")
        assert not out.exists()


def test_cval_trains_each_fold_on_the_others_and_summarises(
        tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """2 folds of tiny_data's 8 identities: each fold trains on the other fold's identities
    and is verified on its own; the summary has the mean and std of every metric, and a
    second run redoes nothing."""
    out = tmp_path / "cval"
    args = ["cval", "--config=smoke", f"--data_dir={tiny_data}", f"--output={out}", "--folds=2",
            *SHORT]
    summary = experiment.main(args)
    printed = capsys.readouterr().out
    assert "fold 1/2 fold-0: heldout/accuracy" in printed and "heldout/accuracy" in printed
    split = json.loads((out / "folds.json").read_text())["identities"]
    everyone = sorted((tiny_data / "tfrecords" / "labels.txt").read_text().split())
    assert sorted(split[0] + split[1]) == everyone and not set(split[0]) & set(split[1])
    for k in range(2):
        data = out / "data" / f"fold-{k}"
        trained = (data / "tfrecords" / "labels.txt").read_text().split()
        heldout = sorted(p.name for p in (data / "heldout").iterdir())
        assert trained == split[1 - k] and heldout == split[k]
        assert {line.split()[0] for line in (data / "pairs.txt").read_text().splitlines()[1:]} \
            <= set(split[k])
        assert load_config_of(out / f"fold-{k}").model.name == "mobilefacenet_tiny"
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    accuracy = [summary["runs"][f"fold-{k}"]["heldout"]["accuracy"] for k in range(2)]
    assert summary["mean"]["heldout"]["accuracy"] == pytest.approx(sum(accuracy) / 2)
    assert summary["std"]["heldout"]["accuracy"] == pytest.approx(abs(accuracy[0] - accuracy[1])
                                                                  / 2 ** 0.5)
    assert summary["n"]["heldout"]["accuracy"] == 2
    experiment.main(args)
    assert capsys.readouterr().out.count("finished before") == 2


def load_config_of(run_dir: Path):
    from sparse_embed.config import config_from_model_dir

    return config_from_model_dir(run_dir)


def test_seeds_trains_one_run_per_seed(tiny_data: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Two seeds: two runs with train.seed 0 and 1, measured on the config's eval set."""
    out = tmp_path / "seeds"
    summary = experiment.main(["seeds", "--config=smoke", f"--data_dir={tiny_data}",
                               f"--output={out}", "--seeds=2", *SHORT])
    assert sorted(summary["runs"]) == ["seed-0", "seed-1"]
    assert [load_config_of(out / f"seed-{s}").train.seed for s in (0, 1)] == [0, 1]
    assert summary["n"]["lfw"]["accuracy"] == 2
    assert 0 <= summary["mean"]["lfw"]["accuracy"] <= 1
    printed = capsys.readouterr().out
    assert "seed 2/2 seed-1: lfw/accuracy" in printed and "summary: " in printed


@pytest.mark.slow
def test_hopt_is_killed_resumes_and_its_best_config_trains(
        tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A search of 3 trials is killed once its first trial has finished; run again, it counts
    that trial, reruns the one it was in from its checkpoints, finishes the third, and writes a
    best.yaml without `_hopt` keys that `train` trains."""
    path = _search_yaml(tmp_path)
    out = tmp_path / "hopt"
    args = ["hopt", f"--config={path}", f"--data_dir={tiny_data}", f"--output={out}", "--trials=3"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "sparse_embed.experiment", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("trial 0 "):
                break
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert lines and lines[-1].startswith("trial 0 (trial-0000): lfw/accuracy"), lines
    first = (out / "trial-0000" / "result.json").read_text()

    summary = experiment.main(args)
    printed = capsys.readouterr().out
    assert "hopt: 1 of 3 trials finished before; 2 to run" in printed
    assert "trial 0 " not in printed
    assert (out / "trial-0000" / "result.json").read_text() == first
    assert len(summary["trials"]) == 3
    assert {t["state"] for t in summary["trials"]} <= {"complete", "pruned"}
    assert summary["trials"][0]["run_dir"] == "trial-0000"

    best = yaml.safe_load((out / "best.yaml").read_text())
    assert "_hopt" not in json.dumps(best)
    for key, value in summary["best"]["params"].items():
        section, *rest = key.split(".")
        node = best[section]
        for part in rest:
            node = node[part]
        assert node == value
    from sparse_embed import train

    # Without its evaluations during training: the test needs the config to train, not them.
    train.main([f"--config={out / 'best.yaml'}", f"--data_dir={tiny_data}",
                f"--model_dir={tmp_path / 'best_run'}", "--set", "eval.every_steps=0"])
    assert (tmp_path / "best_run" / "checkpoints").is_dir()


def test_hopt_prunes_below_the_median_and_counts_finished_trials(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """With a stand-in for training whose accuracy is the learning rate, the search's loop: after
    the median pruner's 5 start-up trials, a trial reporting less than the median at its first
    evaluation is pruned; the best complete trial is in best.yaml; a rerun counts every trial.
    The sampler's seed makes which trials are pruned the same on every run."""
    data = tmp_path / "data"
    (data / "tfrecords").mkdir(parents=True)
    (data / "tfrecords" / "train-00000-of-00001").write_bytes(b"")
    (data / "tfrecords" / "labels.txt").write_text("a\nb\n")
    reported = []

    def measure(config, data_dir, run_dir, on_evaluation=None):
        value = config.schedule.base_lr
        if on_evaluation is not None:
            reported.append(value)
            on_evaluation(1, {"lfw": {"accuracy": value}})
        return {"metrics": {"lfw": {"accuracy": value}}, "step": 2, "seconds": 0.0}

    monkeypatch.setattr(experiment, "train_and_measure", measure)
    path = _search_yaml(tmp_path)
    out = tmp_path / "hopt"
    args = ["hopt", f"--config={path}", f"--data_dir={data}", f"--output={out}", "--trials=12"]
    summary = experiment.main(args)
    states = [t["state"] for t in summary["trials"]]
    assert len(states) == 12 and "pruned" in states and states[:5] == ["complete"] * 5
    complete = [t["value"] for t in summary["trials"] if t["state"] == "complete"]
    assert summary["best"]["value"] == max(complete)
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["schedule"]["base_lr"] == summary["best"]["params"]["schedule.base_lr"]
    assert "pruned, lfw/accuracy" in capsys.readouterr().out
    experiment.main(args)
    assert "hopt: 12 of 12 trials finished before; 0 to run" in capsys.readouterr().out
    assert len(reported) == 12


def test_a_diverging_trial_fails_and_the_search_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A trial whose training stops on a non-finite loss is failed in the study, reported in one
    line, and not counted: the search still finishes --trials trials."""
    from sparse_embed.errors import TrainingError

    data = tmp_path / "data"
    (data / "tfrecords").mkdir(parents=True)
    (data / "tfrecords" / "train-00000-of-00001").write_bytes(b"")
    (data / "tfrecords" / "labels.txt").write_text("a\nb\n")
    calls = []

    def measure(config, data_dir, run_dir, on_evaluation=None):
        calls.append(run_dir)
        if len(calls) == 1:
            raise TrainingError("the loss became nan at step 1")
        return {"metrics": {"lfw": {"accuracy": 0.5}}, "step": 2, "seconds": 0.0}

    monkeypatch.setattr(experiment, "train_and_measure", measure)
    summary = experiment.main(["hopt", f"--config={_search_yaml(tmp_path)}", f"--data_dir={data}",
                               f"--output={tmp_path / 'hopt'}", "--trials=2"])
    assert [t["state"] for t in summary["trials"]] == ["complete", "complete"]
    assert len(calls) == 3
    assert "trial 0 (trial-0000): failed, the loss became nan" in capsys.readouterr().out


@pytest.mark.unit
def test_a_search_is_recorded_as_a_result_file(tmp_path: Path) -> None:
    """`hopt --results` writes one row per trial, pruned ones without a value, and names the best."""
    from sparse_embed.results import load_result, render_table

    summary = {"config": "synthetic/pe_arcface_hopt", "overrides": [], "metric": "lfw/accuracy",
               "direction": "maximize", "best": {"trial": 1, "value": 0.8},
               "trials": [{"number": 0, "state": "pruned", "value": None,
                           "params": {"schedule.base_lr": 0.1}},
                          {"number": 1, "state": "complete", "value": 0.8,
                           "params": {"schedule.base_lr": 0.02}}]}
    path = experiment.write_search_result(summary, tmp_path / "hopt.json")
    result = load_result(path)
    assert [r["state"] for r in result["tables"]["trials"]["rows"]] == ["pruned", "complete"]
    assert "Best: trial 1, lfw/accuracy 0.8000" in result["notes"]
    assert "| 1 | 0.02 | 0.8000 | complete |" in render_table(result, "trials")
