"""Atomic file output (temporary name, then rename), and native stderr kept off the terminal."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it to `path` on success.

    A killed or failing job leaves no half-written file at `path`: on an
    exception the temporary file (or directory) is removed.

    Args:
        path: The final destination (file or directory).

    Yields:
        The temporary path to write to, in the same directory as `path`.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def native_stderr_to_file(replay_on_error: bool = True, keep_python: bool = False) -> Iterator[None]:
    """Points file descriptor 2 at a temporary file for the block.

    What native code prints there (TensorFlow's start-up lines, the TFLite
    converter's progress, LiteRT's "Created TensorFlow Lite XNNPACK delegate",
    libjpeg's "Improper call to JPEG library" for a corrupt JPEG that is
    skipped and reported anyway) would bury the one line a user error prints.
    Only the standard library is used: the TensorFlow import and the edge
    runtime both need it.

    Args:
        replay_on_error: If the block raises, write what was captured to
            stderr first, so the failure shows its native cause.
        keep_python: Keep Python's own stderr (progress bars, warnings) on the
            terminal: `sys.stderr` writes to a copy of the original descriptor
            for the block, and only native code's writes to descriptor 2 are captured.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    python_stderr = sys.stderr
    try:
        swap = keep_python and python_stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a stream with no descriptor (a test's capture)
        swap = False
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        if swap:
            sys.stderr = open(os.dup(saved), "w", buffering=1, encoding=python_stderr.encoding,
                              errors="backslashreplace")
        try:
            yield
        except BaseException:
            if replay_on_error:
                os.dup2(saved, 2)
                log.seek(0)
                python_stderr.write(log.read().decode(errors="replace"))
            raise
        finally:
            if swap:
                sys.stderr.close()
                sys.stderr = python_stderr
            os.dup2(saved, 2)
            os.close(saved)
