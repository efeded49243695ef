"""Shared fixtures: a tiny synthetic dataset with TFRecords, built once per session."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from tiers import TiersAndBudget

ROOT = Path(__file__).resolve().parents[1]

# TensorFlow turns oneDNN on by default only on CPUs with AVX512_VNNI, AVX512_BF16
# or AMX, and oneDNN picks its kernels by instruction set: the suite pins the
# same (Eigen) kernels on every x86 CPU, for itself and the processes it starts,
# so a result never depends on which CPU ran it. TF_ENABLE_ONEDNN_OPTS=1 overrides.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def pytest_configure(config: pytest.Config) -> None:
    # Test tiers (every test has exactly one), the durations record and the time budget.
    config.pluginmanager.register(TiersAndBudget(config), "sparse_embed_tiers")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # A test's one-line summary (`record_property("summary_line", ...)`, e.g. the PE parity line)
    # reaches the terminal also when pytest-xdist ran it in another process.
    for outcome in ("passed", "failed"):
        for report in terminalreporter.stats.get(outcome, []):
            for name, value in getattr(report, "user_properties", []):
                if name == "summary_line" and report.when == "call":
                    terminalreporter.write_line(value)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 training identities x 6 images, 4 held-out identities, pairs, TFRecords."""
    from sparse_embed.data.synthetic import generate
    from sparse_embed.data.tfrecord import build_tfrecords

    data = tmp_path_factory.mktemp("tiny_data")
    generate(data, 8, 6, 4, seed=0, image_size=112, workers=1, pairs_folds=2, pairs_per_fold=6)
    build_tfrecords(data / "train", data / "tfrecords", name="train", num_shards=2,
                    num_workers=1, seed=0)
    return data


@pytest.fixture(scope="session")
def smoke_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke config (MobileFaceNet-tiny, PReLU, relu embedding) trained 6 steps on
    `tiny_data`, once per session: the run that tests which only read a trained run share.
    Tests write their outputs elsewhere (a `tmp_path`), or under `export/` of the run."""
    from sparse_embed.config import load_config
    from sparse_embed.training.trainer import train

    out = tmp_path_factory.mktemp("smoke_run") / "run"
    train(load_config("smoke", ["train.steps=6"]), tiny_data, out, verbose=0)
    return out


@contextlib.contextmanager
def op_determinism() -> Iterator[None]:
    """TensorFlow's op determinism inside the block, restored after it.

    Exact-resume tests train a straight run and an interrupted, resumed run in
    this process and compare them bit for bit: with op determinism (and the
    same kernels on every CPU, see TF_ENABLE_ONEDNN_OPTS above) the two execute
    the same ops on the same values in the same order, so any difference is the
    resume's. Restoring the setting keeps the other tests independent of order.
    """
    from tensorflow.python.framework import config as tf_config

    was = tf_config.is_op_determinism_enabled()
    tf_config.enable_op_determinism()
    try:
        yield
    finally:
        if not was:
            tf_config.disable_op_determinism()


def run_module(*args: str, cwd: Path | None = None, pythonpath: tuple[Path, ...] = (),
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs `python -m <args>` with the package importable; captures text output.

    Args:
        *args: Module name and its arguments.
        cwd: Working directory.
        pythonpath: Directories put before the package on the import path.
        env: Extra environment variables.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, (*pythonpath, ROOT))),
               **(env or {}))
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def run_module_script(script: str, *args: str) -> subprocess.CompletedProcess:
    """Runs `python <script> <args>` with the package importable; captures text output."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          env=env, timeout=600)


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user error: exit status 2, one line on stderr naming the problem, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def call_main(main: Callable[[list[str]], object], *args: object) -> int:
    """Runs an entry point's `main(argv)` in this process; returns its exit status.

    Args:
        main: The entry point's `main`.
        *args: Its arguments (converted with `str`).
    """
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


def assert_main_user_error(capsys: pytest.CaptureFixture[str], main: Callable[[list[str]], object],
                           args: Sequence[object], *fragments: str) -> None:
    """`main(args)` in this process is a user error: exit status 2, one line on stderr naming it.

    Args:
        capsys: pytest's output capture.
        main: The entry point's `main`.
        args: Its arguments.
        *fragments: Text the line must contain.
    """
    capsys.readouterr()
    code = call_main(main, *args)
    err = capsys.readouterr().err
    assert code == 2, (code, err[-2000:])
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def horovod_available() -> None:
    """Skips (outside CI) or fails (in CI and `make test`) when Horovod is not installed.

    `make test` builds Horovod first and sets SPARSE_EMBED_REQUIRE_HOROVOD, so a
    missing install there is a failure, never a silent skip.
    """
    try:
        import horovod.tensorflow  # noqa: F401
    except ImportError as e:
        missing_dependency(f"Horovod is not installed ({e}); run `make horovod`")


def missing_dependency(reason: str) -> None:
    """Fails under `make test` and CI, which install every dependency, and skips elsewhere.

    Args:
        reason: What is missing and the command that installs it.
    """
    if os.environ.get("SPARSE_EMBED_REQUIRE_HOROVOD") or os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def scalars(model_dir: Path, tag: str) -> dict[int, float]:
    """The values a run logged to TensorBoard under `tag`, by step (its `logs/train` events).

    Args:
        model_dir: The run directory.
        tag: Summary tag, e.g. `train/lr`.
    """
    from sparse_embed.keras import tf

    values = {}
    for path in sorted((Path(model_dir) / "logs" / "train").glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return dict(sorted(values.items()))


HOROVODRUN = [sys.executable, str(ROOT / "tests" / "horovod_launch.py")]


def horovodrun_executable(directory: Path) -> Path:
    """An executable `horovodrun` in `directory` that runs tests/horovod_launch.py, for programs
    that take their launcher from `$HOROVODRUN` (the run_scripts, the throughput benchmark)."""
    path = directory / "horovodrun"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "horovod_launch.py"}" "$@"\n')
    path.chmod(0o755)
    return path


def horovodrun(np: int, *args: str, cwd: Path | None = None, timeout: float = 600,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs `horovodrun -np N -H localhost:N --gloo python <args>` on this machine
    (through tests/horovod_launch.py: horovodrun without its per-launch build probe)."""
    horovod_available()
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run(
        [*HOROVODRUN, "-np", str(np), "-H", f"localhost:{np}", "--gloo", sys.executable, *args],
        capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout,
    )


def rank_lines(output: str, rank: int, stream: str = "stderr") -> list[str]:
    """The non-empty lines one rank wrote, with horovodrun's `[rank]<stream>:` prefix removed."""
    prefix = f"[{rank}]<{stream}>:"
    return [line[len(prefix):] for line in output.splitlines()
            if line.startswith(prefix) and line[len(prefix):].strip()]


def assert_rank0_user_error(proc: subprocess.CompletedProcess, num_ranks: int,
                            *fragments: str) -> None:
    """A user error under horovodrun: one line from rank 0, exit 2, the other ranks silent.

    horovodrun stops the remaining ranks once one exits, so they may report
    only that they were terminated; that every rank is gone is shown by
    horovodrun having returned at all.
    """
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Process 0 exit with status code 2" in output, output[-3000:]
    errors = rank_lines(output, 0)
    assert len(errors) == 1, errors
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    for rank in range(1, num_ranks):
        assert set(rank_lines(output, rank)) <= {"Terminated"}, rank_lines(output, rank)
    assert not any("Traceback" in line for r in range(num_ranks) for line in rank_lines(output, r))
