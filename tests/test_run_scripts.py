"""The shell recipes in run_scripts/, each run on tiny data with 2 real Horovod processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import yaml
from conftest import ROOT, horovod_available, horovodrun_executable

pytestmark = pytest.mark.integration

SCRIPTS = ROOT / "run_scripts"
TINY = ["--set", "model.name=mobilefacenet_tiny", "--set", "model.input_size=32",
        "--set", "model.embedding_size=64", "--set", "train.steps=2", "--set", "train.batch_size=8",
        "--set", "train.checkpoint_every=2", "--set", "data.shuffle_buffer=64",
        "--set", "sparsity.warmup_steps=1"]
TRAINING = {"train_dense.sh": "none", "train_sparse_flops.sh": "flops", "train_sparse_l1.sh": "l1"}


def _run(script: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=full,
                          timeout=600)


@pytest.mark.unit
def test_every_recipe_says_what_it_runs() -> None:
    for script in sorted(SCRIPTS.rglob("*.sh")):
        lines = script.read_text().splitlines()
        assert lines[0] == "#!/usr/bin/env bash", script
        assert lines[1].startswith("# ") and len(lines[1]) > 30, script
        assert os.access(script, os.X_OK), f"{script} is not executable"


def _recorder(path: Path, record: Path) -> Path:
    """A stand-in launcher / interpreter that appends its arguments (one per line) to `record`."""
    path.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> "{record}"\necho --- >> "{record}"\n')
    path.chmod(0o755)
    return path


def _recorded_calls(record: Path) -> list[list[str]]:
    calls = record.read_text().split("---\n")
    return [c.splitlines() for c in calls if c.strip()]


@pytest.mark.slow
def test_face_recipes_train_and_export_on_tiny_data(tiny_data: Path, tmp_path: Path) -> None:
    """The sparse recipe trains under 2 Horovod ranks and its embeddings are written for real;
    the dense and L1 recipes, which share train.sh and embed.sh with it, are checked for what
    they launch (their configs load and have the right regularizer)."""
    from sparse_embed.config import load_config

    horovod_available()
    model_dir = tmp_path / "sparse"
    # tests/horovod_launch.py (horovodrun without its build probe) as $HOROVODRUN; the cifar
    # recipe's test below launches the real horovodrun.
    proc = _run(SCRIPTS / "face" / "train_sparse_flops.sh", {
        "NP": "2", "MS1M_DIR": str(tiny_data), "MODEL_DIR": str(model_dir),
        "HOROVODRUN": str(horovodrun_executable(tmp_path)), "HOROVODRUN_ARGS": "--gloo"}, *TINY)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "[0]<stdout>:step 2 (resumed from 0), 16 examples, 2 worker(s)" in proc.stdout
    config = yaml.safe_load((model_dir / "config.yaml").read_text())
    assert config["sparsity"]["type"] == "flops"

    for script, sparsity in TRAINING.items():
        record = tmp_path / f"{script}.args"
        launcher = _recorder(tmp_path / f"{script}.launcher", record)
        proc = _run(SCRIPTS / "face" / script, {
            "NP": "4", "HOSTS": "a:2,b:2", "MS1M_DIR": str(tiny_data), "MODEL_DIR": str(tmp_path / "m"),
            "HOROVODRUN": str(launcher), "HOROVODRUN_ARGS": "--gloo"}, *TINY)
        assert proc.returncode == 0, (script, proc.stderr[-2000:])
        (call,) = _recorded_calls(record)
        assert call[:6] == ["-np", "4", "-H", "a:2,b:2", "--gloo", sys.executable], (script, call)
        assert call[6:8] == ["-m", "sparse_embed.train"], (script, call)
        flags = dict(a.split("=", 1) for a in call[8:11])
        assert flags["--data_dir"] == str(tiny_data) and flags["--model_dir"] == str(tmp_path / "m")
        assert call[11:] == TINY, (script, call)
        config = load_config(flags["--config"], [a for a in TINY if a != "--set"])
        assert config.sparsity.type == sparsity, script

    out = tmp_path / "embeddings"
    images = {"MEGAFACE_IMAGES": str(tiny_data / "test"), "FACESCRUB_IMAGES": str(tiny_data / "test"),
              "OUT_DIR": str(out), "FLIP": "none"}
    proc = _run(SCRIPTS / "get_embeddings" / "sparse.sh", {"MODEL_DIR": str(model_dir), **images})
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("megaface", "facescrub"):
        with h5py.File(out / f"{name}_sparse.hdf5") as f:
            assert f["embedding"].shape == (len(list((tiny_data / "test").rglob("*.jpg"))), 64)

    record = tmp_path / "dense.args"
    python = _recorder(tmp_path / "python", record)
    proc = _run(SCRIPTS / "get_embeddings" / "dense.sh",
                {"MODEL_DIR": str(tmp_path / "dense"), **images, "PYTHON": str(python)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _recorded_calls(record) == [
        ["-m", "sparse_embed.embed", f"--model_dir={tmp_path / 'dense'}", f"--images={tiny_data / 'test'}",
         f"--output={out / f'{name}_dense.hdf5'}", "--flip=none"] for name in ("megaface", "facescrub")]


CIFAR_TINY = ["--set", "model.name=nin_tiny", "--set", "model.input_size=32", "--set", "train.steps=2",
              "--set", "train.batch_size=8", "--set", "data.classes_per_batch=4",
              "--set", "data.samples_per_class=2", "--set", "train.checkpoint_every=2"]
CIFAR = {"train_sparse_flops.sh": ("flops", "relu"), "train_sparse_l1.sh": ("l1", "relu"),
         "train_dense.sh": ("none", "none")}


@pytest.mark.parametrize("script", sorted(CIFAR))
def test_cifar_recipes_launch_one_process_with_their_config(tiny_data: Path, tmp_path: Path,
                                                           script: str) -> None:
    """On one process a recipe execs sparse_embed.train with its config; the config it names loads
    and has the recipe's regularizer, activation, loss and sampler (the two-process test below
    trains one of them for real)."""
    from sparse_embed.config import load_config

    record = tmp_path / "args"
    python = _recorder(tmp_path / "python", record)
    proc = _run(SCRIPTS / "cifar" / script, {"CIFAR_DIR": str(tiny_data), "MODEL_DIR": str(tmp_path / "run"),
                                             "PYTHON": str(python)}, *CIFAR_TINY)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (call,) = _recorded_calls(record)
    assert call[:2] == ["-m", "sparse_embed.train"], call
    flags = dict(a.split("=", 1) for a in call[2:5])
    assert flags["--data_dir"] == str(tiny_data) and flags["--model_dir"] == str(tmp_path / "run")
    # The recipe's own overrides, then the caller's.
    assert call[-len(CIFAR_TINY):] == CIFAR_TINY, call
    config = load_config(flags["--config"], [a for a in call[5:] if a != "--set"])
    assert (config.sparsity.type, config.model.final_activation) == CIFAR[script]
    assert (config.head.name, config.head.params.mining, config.data.sampler) == \
        ("triplet", "semi_hard", "p_k")


@pytest.mark.multiprocess
def test_cifar_recipe_under_two_horovod_processes(tiny_data: Path, tmp_path: Path) -> None:
    horovod_available()
    proc = _run(SCRIPTS / "cifar" / "train_sparse_flops.sh", {
        "NP": "2", "CIFAR_DIR": str(tiny_data), "MODEL_DIR": str(tmp_path / "run"),
        "HOROVODRUN_ARGS": "--gloo"}, *CIFAR_TINY, "--set", "distributed.scale_lr=true")
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "[0]<stdout>:step 2 (resumed from 0), 32 examples, 2 worker(s)" in proc.stdout
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (config["sparsity"]["type"], config["model"]["final_activation"]) == CIFAR["train_sparse_flops.sh"]
    assert (config["head"]["name"], config["data"]["sampler"]) == ("triplet", "p_k")
