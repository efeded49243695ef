"""Distributed training with real Horovod processes (Gloo on loopback) and the backend choice."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import (
    HOROVODRUN,
    ROOT,
    assert_main_user_error,
    assert_rank0_user_error,
    call_main,
    horovodrun,
    rank_lines,
    run_module_script,
    scalars,
)

from sparse_embed.checkpoints import CHECKPOINT_DIR
from sparse_embed.config import load_config
from sparse_embed.errors import ConfigError
from sparse_embed.keras import tf
from sparse_embed.strategy import SingleProcess
from sparse_embed.train import main as train_main
from sparse_embed.training.distributed import resolve_backend
from sparse_embed.training.trainer import train, worker_batch_size

pytestmark = pytest.mark.multiprocess

CHECKS = str(ROOT / "tests" / "distributed_checks.py")
TINY = ["train.batch_size=8", "train.log_every=1", "train.checkpoint_every=2"]


def _train_cli(model_dir: Path, data: Path, *overrides: str) -> list[str]:
    args = ["-m", "sparse_embed.train", "--config=smoke", f"--data_dir={data}",
            f"--model_dir={model_dir}"]
    for item in (*TINY, *overrides):
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def two_ranks_six_steps(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory
                        ) -> tuple[Path, subprocess.CompletedProcess]:
    """One 2-rank Horovod run of 6 steps and its output; tests copy the run dir before changing it."""
    run = tmp_path_factory.mktemp("hvd6") / "run"
    proc = horovodrun(2, *_train_cli(run, tiny_data, "train.steps=6"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, proc


def _checkpoint_value(model_dir: Path, name: str) -> int:
    reader = tf.train.load_checkpoint(str(model_dir / CHECKPOINT_DIR))
    return int(reader.get_tensor(name))


@pytest.fixture(scope="module")
def one_step_checks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-rank Horovod launch of the one-step checks; each wrote OUT/<check>/rank<r>.npz."""
    out = tmp_path_factory.mktemp("one_step")
    proc = horovodrun(2, CHECKS, "step_equivalence,partial_fc,pe_step_equivalence", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def mirrored_checks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same checks on 2 logical CPUs under tf.distribute.MirroredStrategy, in one process."""
    out = tmp_path_factory.mktemp("mirrored")
    proc = run_module_script(CHECKS, "step_equivalence,pe_step_equivalence", str(out), "mirrored")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_one_step_of_two_ranks_equals_one_process_on_the_whole_batch(one_step_checks: Path) -> None:
    """2 ranks x batch B == 1 process x batch 2B, for L1, cross-replica FLOPs and per-worker FLOPs.

    The reference is computed by plain autodiff in one process: the head loss of
    the 2B batch plus the regularizer the ranks optimise together (the FLOPs of
    the 2B batch with `cross_replica`, the mean of each rank's own FLOPs without).
    """
    ranks = [np.load(one_step_checks / "step_equivalence" / f"rank{r}.npz") for r in range(2)]
    for name in ("l1_local", "flops_cross", "flops_local"):
        for rank in ranks:
            np.testing.assert_allclose(rank[f"{name}/weights"], rank[f"{name}/reference_weights"],
                                       atol=1e-5, err_msg=name)
            np.testing.assert_allclose(rank[f"{name}/sparsity_loss"],
                                       rank[f"{name}/reference_sparsity_loss"], rtol=1e-5)
        np.testing.assert_array_equal(ranks[0][f"{name}/weights"], ranks[1][f"{name}/weights"])
    # The two FLOPs statements are different: the cross-replica batch statistic
    # is not the mean of the per-rank ones.
    first = ranks[0]
    assert not np.allclose(first["flops_cross/sparsity_loss"], first["flops_local/sparsity_loss"])
    assert np.abs(first["flops_cross/weights"] - first["flops_local/weights"]).max() > 1e-3


PE_GATHERED = ("hib", "pfe", "spe")
PE_PER_EXAMPLE = ("dul_reg", "dul_cls", "scf", "vmf_fl", "vmf_loss", "dsml")


def _assert_pe_equals_one_process(rank: dict, method: str) -> None:
    np.testing.assert_allclose(rank[f"{method}/weights"], rank[f"{method}/reference_weights"],
                               rtol=1e-4, atol=1e-5, err_msg=method)
    np.testing.assert_allclose(rank[f"{method}/loss"], rank[f"{method}/reference_loss"], rtol=1e-5,
                               err_msg=method)


def test_two_ranks_of_every_probabilistic_method_equal_one_process(one_step_checks: Path) -> None:
    """2 Horovod ranks x batch 4 == 1 process, with the samples of a fixed seed.

    HIB, PFE and SPE gather the batch (`head.gather_batch`): the step is that of
    the 8 examples together, whose pairs (and SPE's prototypes, with a class on
    both ranks) cross the ranks, which the mean of the ranks' own losses does
    not give. The other methods' losses are means over examples: the step is
    that of the mean of the ranks' losses.
    """
    ranks = [dict(np.load(one_step_checks / "pe_step_equivalence" / f"rank{r}.npz")) for r in range(2)]
    for method in PE_GATHERED + PE_PER_EXAMPLE:
        _assert_pe_equals_one_process(ranks[0], method)
        np.testing.assert_array_equal(ranks[0][f"{method}/weights"], ranks[1][f"{method}/weights"])
        np.testing.assert_array_equal(ranks[0][f"{method}/loss"], ranks[1][f"{method}/loss"])
    for method in PE_GATHERED:
        first = ranks[0]
        assert abs(first[f"{method}/reference_loss"] - first[f"{method}/local_reference_loss"]) > 1e-3, method


@pytest.fixture(scope="module")
def two_ranks_forty_steps(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """40 steps on 2 ranks with verification at steps 20 and 40 on rank 0; (ranks' output, run)."""
    out = tmp_path_factory.mktemp("hvd40")
    model_dir = out / "run"
    proc = horovodrun(2, CHECKS, "train_eval", str(out), str(tiny_data), str(model_dir),
                      "train.steps=40", "train.batch_size=16", "train.log_every=1",
                      "eval.every_steps=20", "eval.sets=[lfw]", "eval.keep_best=lfw/accuracy")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, model_dir


@pytest.mark.slow
def test_two_ranks_train_identical_models_and_the_loss_falls(
        two_ranks_forty_steps: tuple[Path, Path]) -> None:
    out, model_dir = two_ranks_forty_steps
    ranks = [np.load(out / f"rank{r}.npz") for r in range(2)]
    assert int(ranks[0]["step"]) == 40 and int(ranks[0]["samples"]) == 40 * 16
    # Every variable, BatchNorm moving statistics included, bit for bit (rank 0's evaluations
    # change none of them).
    weights = [k for k in ranks[0].files if k.startswith("w")]
    assert weights and weights == [k for k in ranks[1].files if k.startswith("w")]
    for key in weights:
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)
    losses = list(scalars(model_dir, "train/head_loss").values())
    assert len(losses) == 40
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5]), losses


@pytest.mark.slow
def test_only_rank_0_evaluates_during_training_and_keeps_best(
        two_ranks_forty_steps: tuple[Path, Path]) -> None:
    """Rank 1 goes on to the next all-reduce while rank 0 evaluates; nobody hangs, rank 0 writes best/."""
    out, model_dir = two_ranks_forty_steps
    ranks = [np.load(out / f"rank{r}.npz") for r in range(2)]
    assert [int(r["step"]) for r in ranks] == [40, 40]
    assert ranks[0]["evaluated"].tolist() == [20, 40] and ranks[1]["evaluated"].tolist() == []
    assert len(scalars(model_dir, "eval/lfw/accuracy")) == 2
    best = json.loads((model_dir / "best" / "best.json").read_text())
    assert best["step"] in (20, 40) and best["metric"] == "lfw/accuracy"
    # The kept directory is named after the process that wrote it.
    (kept,) = model_dir.glob(".best-*")
    assert kept.name == f".best-{best['step']}-{int(ranks[0]['pid'])}"


def test_pruning_pk_sampler_and_gathered_pair_loss_on_two_ranks(tiny_data: Path, tmp_path: Path) -> None:
    """Every rank computes the pruning masks from the same weights, draws its own P x K batches, and
    with head.gather_batch its triplets span both ranks' batches: the models stay bit-identical."""
    model_dir = tmp_path / "run"
    proc = horovodrun(2, CHECKS, "train", str(tmp_path), str(tiny_data), str(model_dir),
                      "train.steps=6", "train.batch_size=16", "train.log_every=1",
                      "data.sampler=p_k", "data.classes_per_batch=4", "data.samples_per_class=2",
                      "head.name=triplet", "head.gather_batch=true",
                      "compression.type=prune", "compression.target_sparsity=0.5",
                      "compression.end_step=4", "compression.frequency=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    assert int(ranks[0]["step"]) == 6 and int(ranks[0]["samples"]) == 6 * 16
    for key in ranks[0].files:
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)
    sparsity = list(scalars(model_dir, "compress/weight_sparsity").values())
    assert len(sparsity) == 6 and sparsity[0] < 0.5
    assert sparsity[-1] == pytest.approx(0.5, abs=0.01), sparsity


@pytest.mark.slow
def test_resume_with_a_different_number_of_workers(
        tiny_data: Path, tmp_path: Path, two_ranks_six_steps: tuple[Path, subprocess.CompletedProcess],
        capsys: pytest.CaptureFixture[str]) -> None:
    """2 ranks -> 1 process -> 2 ranks: the step, the examples consumed and the slots carry over."""
    run = tmp_path / "run"
    shutil.copytree(two_ranks_six_steps[0], run)
    proc = two_ranks_six_steps[1]
    out = "\n".join(rank_lines(proc.stdout, 0, "stdout"))
    assert "step 6 (resumed from 0), 48 examples, 2 worker(s)" in out
    assert not rank_lines(proc.stdout, 1, "stdout"), "only rank 0 prints"

    capsys.readouterr()
    assert call_main(train_main, *_train_cli(run, tiny_data, "train.steps=10")[2:]) == 0
    assert "step 10 (resumed from 6), 80 examples, 1 worker(s)" in capsys.readouterr().out

    proc = horovodrun(2, *_train_cli(run, tiny_data, "train.steps=14"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 14 (resumed from 10), 112 examples, 2 worker(s)" in "\n".join(
        rank_lines(proc.stdout, 0, "stdout"))
    assert _checkpoint_value(run, "samples/.ATTRIBUTES/VARIABLE_VALUE") == 112
    assert _checkpoint_value(run, "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == 14

    # A checkpoint of another model: one line from rank 0, every rank exits 2, none hangs.
    proc = horovodrun(2, *_train_cli(run, tiny_data, "train.steps=16", "model.embedding_size=32"),
                      timeout=300)
    assert_rank0_user_error(proc, 2, "does not match this config", "model.embedding_size",
                            "--model_dir")


@pytest.mark.slow
def test_kill_9_of_every_rank_then_rerun_finishes(tiny_data: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """SIGKILL of all ranks at a random moment never leaves a checkpoint that fails to load."""
    run = tmp_path / "run"
    args = _train_cli(run, tiny_data, "train.steps=30", "train.checkpoint_every=1",
                      "train.keep_checkpoints=2")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([*HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo",
                             sys.executable, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = run / CHECKPOINT_DIR / "checkpoint"
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert state.exists(), "no checkpoint was written"
    time.sleep(random.Random().uniform(0.0, 1.5))
    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in family:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    proc.wait()
    killed_at = _checkpoint_value(run, "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")
    assert killed_at < 30, "the run finished before it was killed; kill earlier"

    # The rerun in this process: what the ranks left loads whatever the worker count
    # (test_resume_with_a_different_number_of_workers), and a launch costs two TF imports.
    capsys.readouterr()
    assert call_main(train_main, *args[2:]) == 0
    out = capsys.readouterr().out
    assert f"step 30 (resumed from {killed_at})" in out, out[-2000:]
    assert _checkpoint_value(run, "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == 30


@pytest.mark.integration
def test_backend_horovod_without_horovod_is_one_line(tiny_data: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """In this process (main(argv)): Horovod that fails to import stands in for a missing install."""
    for name in [m for m in sys.modules if m == "horovod" or m.startswith("horovod.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "horovod", None)  # `import horovod...` raises ImportError
    assert_main_user_error(capsys, train_main,
                           _train_cli(tmp_path / "run", tiny_data, "distributed.backend=horovod")[2:],
                           "make horovod", "distributed.backend")
    assert not (tmp_path / "run").exists()


@pytest.mark.unit
def test_auto_backend_follows_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    auto = load_config(None).distributed
    for name in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "TF_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    assert resolve_backend(auto) == "none"
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1", "b:2"]}, '
                                    '"task": {"type": "worker", "index": 1}}')
    assert resolve_backend(auto) == "multi_worker"
    monkeypatch.setenv("HOROVOD_RANK", "1")
    assert resolve_backend(auto) == "horovod"
    assert resolve_backend(load_config(None, ["distributed.backend=none"]).distributed) == "none"


@pytest.mark.unit
def test_batch_split_over_workers() -> None:
    config = load_config(None, ["train.batch_size=12"])
    assert worker_batch_size(config, 4) == 3
    with pytest.raises(ConfigError, match="does not split over 5 workers"):
        worker_batch_size(config, 5)
    scaled = load_config(None, ["train.batch_size=12", "distributed.scale_lr=true"])
    assert worker_batch_size(scaled, 5) == 12


@pytest.mark.slow
def test_partial_fc_on_two_ranks_equals_the_unsharded_head(one_step_checks: Path) -> None:
    """sample_rate=1: the step of 2 ranks, each with half the class centres, is the unsharded one."""
    for rank in range(2):
        got = np.load(one_step_checks / "partial_fc" / f"rank{rank}.npz")
        assert got["kernel"].shape == (4, 16), "each rank holds C/2 = 4 of the 8 centres"
        np.testing.assert_allclose(got["loss"], got["reference_loss"], rtol=1e-5)
        np.testing.assert_allclose(got["accuracy"], got["reference_accuracy"])
        np.testing.assert_allclose(got["kernel"], got["reference_kernel"], atol=1e-5)
        np.testing.assert_allclose(got["backbone"], got["reference_backbone"], atol=1e-5)
        assert np.abs(got["kernel"] - got["initial_kernel"]).max() > 1e-3, "the step moved nothing"


def _sharded_state(*checkpoint_dirs: Path) -> tuple[np.ndarray, np.ndarray]:
    """The class centres and their momentum, concatenated over the workers' checkpoints."""
    kernels, momenta = [], []
    for directory in checkpoint_dirs:
        reader = tf.train.load_checkpoint(str(directory))
        kernel = reader.get_tensor("head/kernel/.ATTRIBUTES/VARIABLE_VALUE")
        # The momentum of the centres is the one optimizer slot of their shape.
        slot = [k for k, shape in reader.get_variable_to_shape_map().items()
                if k.startswith("optimizer/_variables/") and shape == list(kernel.shape)]
        assert len(slot) == 1, slot
        kernels.append(kernel)
        momenta.append(reader.get_tensor(slot[0]))
    return np.concatenate(kernels), np.concatenate(momenta)


@pytest.mark.slow
def test_sampled_partial_fc_trains_and_resumes_on_any_worker_count(
        tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """2 ranks -> 1 process -> 2 ranks with the class centres split per worker, re-split on resume."""
    run = tmp_path / "run"
    ckpt = run / CHECKPOINT_DIR
    sharded = ["head.sharded=true", "head.sample_rate=0.5"]
    proc = horovodrun(2, *_train_cli(run, tiny_data, "train.steps=6", *sharded))
    assert proc.returncode == 0, proc.stderr[-3000:]
    reader = tf.train.load_checkpoint(str(ckpt / "worker-1-of-2"))
    assert reader.get_variable_to_shape_map()["head/kernel/.ATTRIBUTES/VARIABLE_VALUE"] == [4, 64]
    out = "\n".join(rank_lines(proc.stdout, 0, "stdout"))
    assert "step 6 (resumed from 0), 48 examples, 2 worker(s)" in out
    summary = out.split("step 6 (resumed from 0)")[1]
    assert np.isfinite(float(summary.split("head_loss")[1].split()[0]))
    centres, momentum = _sharded_state(ckpt, ckpt / "worker-1-of-2")

    # One process takes all 8 centres and their momentum, as the two ranks left them.
    config = load_config("smoke", [*TINY, *sharded, "train.steps=6"])
    same = train(config, tiny_data, run, verbose=0)
    assert (same.step, same.resumed_from, same.samples) == (6, 6, 48)
    np.testing.assert_array_equal(same.model.head.kernel.numpy(), centres)
    slots = [v for v in same.model.optimizer.variables if v.shape == centres.shape]
    np.testing.assert_array_equal(slots[0].numpy(), momentum)

    capsys.readouterr()
    assert call_main(train_main, *_train_cli(run, tiny_data, "train.steps=8", *sharded)[2:]) == 0
    assert "step 8 (resumed from 6), 64 examples, 1 worker(s)" in capsys.readouterr().out
    centres, momentum = _sharded_state(ckpt)
    assert centres.shape == (8, 64)

    proc = horovodrun(2, *_train_cli(run, tiny_data, "train.steps=10", *sharded))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 10 (resumed from 8), 80 examples, 2 worker(s)" in "\n".join(
        rank_lines(proc.stdout, 0, "stdout"))
    assert _sharded_state(ckpt, ckpt / "worker-1-of-2")[0].shape == (8, 64)


@pytest.mark.slow
def test_sharded_head_with_fewer_classes_than_workers(tmp_path: Path) -> None:
    from sparse_embed.data.synthetic import generate
    from sparse_embed.data.tfrecord import build_tfrecords

    data = tmp_path / "two"
    generate(data, 2, 2, 2, seed=0, image_size=32, workers=1, pairs_folds=1, pairs_per_fold=1)
    build_tfrecords(data / "train", data / "tfrecords", name="train", num_shards=1,
                    num_workers=1, seed=0)
    proc = horovodrun(3, *_train_cli(tmp_path / "run", data, "head.sharded=true",
                                     "train.batch_size=6"), timeout=300)
    assert_rank0_user_error(proc, 3, "needs at least that many classes, got 2")


@pytest.mark.slow
def test_mirrored_two_replicas_equal_one_process_on_the_whole_batch(mirrored_checks: Path) -> None:
    """tf.distribute.MirroredStrategy on 2 logical CPUs: the same statements as for Horovod."""
    got = np.load(mirrored_checks / "step_equivalence" / "rank0.npz")
    for name in ("l1_local", "flops_cross", "flops_local"):
        np.testing.assert_allclose(got[f"{name}/weights"], got[f"{name}/reference_weights"],
                                   atol=1e-5, err_msg=name)
        np.testing.assert_allclose(got[f"{name}/sparsity_loss"],
                                   got[f"{name}/reference_sparsity_loss"], rtol=1e-5)


@pytest.mark.slow
def test_mirrored_two_replicas_of_every_probabilistic_method_equal_one_process(mirrored_checks: Path) -> None:
    """tf.distribute.MirroredStrategy on 2 logical CPUs: the same statements as for Horovod."""
    got = dict(np.load(mirrored_checks / "pe_step_equivalence" / "rank0.npz"))
    for method in PE_GATHERED + PE_PER_EXAMPLE:
        _assert_pe_equals_one_process(got, method)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multi_worker_mirrored_with_two_local_processes(
        tiny_data: Path, tmp_path: Path, two_ranks_six_steps: tuple[Path, subprocess.CompletedProcess],
        capsys: pytest.CaptureFixture[str]) -> None:
    """Two processes joined by TF_CONFIG train the model two Horovod ranks train, then resume alone."""
    run = tmp_path / "mw"
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen(
        [sys.executable, *_train_cli(run, tiny_data, "train.steps=6")], env=dict(
            env, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    assert "step 6 (resumed from 0), 48 examples, 2 worker(s)" in outputs[0][0]
    assert "step 6" not in outputs[1][0], "only the chief prints"
    assert sorted(p.name for p in (run / CHECKPOINT_DIR).iterdir()) == [
        "checkpoint", "ckpt-2.data-00000-of-00001", "ckpt-2.index", "ckpt-4.data-00000-of-00001",
        "ckpt-4.index", "ckpt-6.data-00000-of-00001", "ckpt-6.index"]

    horovod = two_ranks_six_steps[0]
    mw_reader = tf.train.load_checkpoint(str(run / CHECKPOINT_DIR))
    hvd_reader = tf.train.load_checkpoint(str(horovod / CHECKPOINT_DIR))
    kernels = [k for k in mw_reader.get_variable_to_shape_map()
               if k.startswith(("backbone/", "head/")) and "kernel" in k]
    assert kernels
    for key in kernels:
        np.testing.assert_allclose(mw_reader.get_tensor(key), hvd_reader.get_tensor(key),
                                   atol=1e-4, err_msg=key)

    capsys.readouterr()
    assert call_main(train_main, *_train_cli(run, tiny_data, "train.steps=8")[2:]) == 0
    assert "step 8 (resumed from 6), 64 examples, 1 worker(s)" in capsys.readouterr().out


@pytest.mark.integration
def test_scale_lr_is_the_linear_scaling_rule(tiny_data: Path, tmp_path: Path) -> None:
    """With scale_lr, each of N workers takes train.batch_size examples and the peak rate is N x base_lr."""

    class FirstOfTwo(SingleProcess):
        # Worker 0 of 2 as far as batch, data and learning rate go (no peer to reduce with).
        num_workers = 2

    config = load_config("smoke", [*TINY, "train.steps=4", "distributed.scale_lr=true",
                                   "schedule.name=cosine", "schedule.base_lr=0.05",
                                   "schedule.warmup_steps=2"])
    result = train(config, tiny_data, tmp_path / "run", strategy=FirstOfTwo(), verbose=0)
    assert result.samples == 4 * 8 * 2
    lr = list(scalars(tmp_path / "run", "train/lr").values())
    # The rate of step s (logged after it): linear warm-up (s + 1) / 2 x peak over 2 steps,
    # then cosine decay of the peak 2 x 0.05 over the remaining 2 steps.
    peak = 2 * 0.05
    expected = [peak * 1 / 2, peak * 2 / 2, peak * 0.5 * (1 + np.cos(0.0)),
                peak * 0.5 * (1 + np.cos(np.pi * 0.5))]
    np.testing.assert_allclose(lr, expected, atol=1e-6)
