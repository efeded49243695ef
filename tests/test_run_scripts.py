"""The shell recipes in run_scripts/, each run on tiny data with 2 real Horovod processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import yaml
from conftest import ROOT, horovod_available

SCRIPTS = ROOT / "run_scripts"
TINY = ["--set", "model.name=mobilefacenet_tiny", "--set", "model.input_size=32",
        "--set", "model.embedding_size=64", "--set", "train.steps=2", "--set", "train.batch_size=8",
        "--set", "train.checkpoint_every=2", "--set", "data.shuffle_buffer=64",
        "--set", "sparsity.warmup_steps=1"]
TRAINING = {"train_dense.sh": "none", "train_sparse_flops.sh": "flops", "train_sparse_l1.sh": "l1"}


def _run(script: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=str(ROOT), PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=full,
                          timeout=600)


def test_every_recipe_says_what_it_runs() -> None:
    for script in sorted(SCRIPTS.rglob("*.sh")):
        lines = script.read_text().splitlines()
        assert lines[0] == "#!/usr/bin/env bash", script
        assert lines[1].startswith("# ") and len(lines[1]) > 30, script
        assert os.access(script, os.X_OK), f"{script} is not executable"


@pytest.mark.slow
def test_face_recipes_train_and_export_on_tiny_data(tiny_data: Path, tmp_path: Path) -> None:
    horovod_available()
    runs = {}
    for script, sparsity in TRAINING.items():
        model_dir = tmp_path / script.removesuffix(".sh")
        proc = _run(SCRIPTS / "face" / script, {
            "NP": "2", "MS1M_DIR": str(tiny_data), "MODEL_DIR": str(model_dir),
            "HOROVODRUN_ARGS": "--gloo"}, *TINY)
        assert proc.returncode == 0, (script, proc.stdout[-2000:], proc.stderr[-2000:])
        assert "[0]<stdout>:step 2 (resumed from 0), 16 examples, 2 worker(s)" in proc.stdout
        config = yaml.safe_load((model_dir / "config.yaml").read_text())
        assert config["sparsity"]["type"] == sparsity
        runs[sparsity] = model_dir

    for script, model_dir, suffix in (("dense.sh", runs["none"], "dense"),
                                      ("sparse.sh", runs["flops"], "sparse")):
        out = tmp_path / "embeddings"
        proc = _run(SCRIPTS / "get_embeddings" / script, {
            "MODEL_DIR": str(model_dir), "MEGAFACE_IMAGES": str(tiny_data / "test"),
            "FACESCRUB_IMAGES": str(tiny_data / "test"), "OUT_DIR": str(out), "FLIP": "none"})
        assert proc.returncode == 0, (script, proc.stderr[-2000:])
        for name in ("megaface", "facescrub"):
            with h5py.File(out / f"{name}_{suffix}.hdf5") as f:
                assert f["embedding"].shape == (len(list((tiny_data / "test").rglob("*.jpg"))), 64)


CIFAR_TINY = ["--set", "model.name=nin_tiny", "--set", "model.input_size=32", "--set", "train.steps=2",
              "--set", "train.batch_size=8", "--set", "data.classes_per_batch=4",
              "--set", "data.samples_per_class=2", "--set", "train.checkpoint_every=2"]
CIFAR = {"train_sparse_flops.sh": ("flops", "relu"), "train_sparse_l1.sh": ("l1", "relu"),
         "train_dense.sh": ("none", "none")}


@pytest.mark.parametrize("script", sorted(CIFAR))
def test_cifar_recipes_train_on_tiny_data(tiny_data: Path, tmp_path: Path, script: str) -> None:
    model_dir = tmp_path / "run"
    proc = _run(SCRIPTS / "cifar" / script, {"CIFAR_DIR": str(tiny_data), "MODEL_DIR": str(model_dir)},
                *CIFAR_TINY)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "step 2 (resumed from 0), 16 examples, 1 worker(s)" in proc.stdout
    config = yaml.safe_load((model_dir / "config.yaml").read_text())
    assert (config["sparsity"]["type"], config["model"]["final_activation"]) == CIFAR[script]
    assert (config["head"]["name"], config["head"]["mining"], config["data"]["sampler"]) == (
        "triplet", "semi_hard", "p_k")


def test_cifar_recipe_under_two_horovod_processes(tiny_data: Path, tmp_path: Path) -> None:
    horovod_available()
    proc = _run(SCRIPTS / "cifar" / "train_sparse_flops.sh", {
        "NP": "2", "CIFAR_DIR": str(tiny_data), "MODEL_DIR": str(tmp_path / "run"),
        "HOROVODRUN_ARGS": "--gloo"}, *CIFAR_TINY, "--set", "distributed.scale_lr=true")
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "[0]<stdout>:step 2 (resumed from 0), 32 examples, 2 worker(s)" in proc.stdout
