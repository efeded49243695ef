"""What a run directory records beside its config: `run.json`, the data directory it was trained on.

The trainer writes `<model_dir>/run.json` (the chief alone, atomically) when a
run starts or resumes: `{"data_dir": "<absolute path>"}`. `embed`, `evaluate`
and `export` take it as their `--data_dir` default, so a run directory says
where its data is; an explicit `--data_dir` wins. A run directory written
before this file existed has none, and those commands then need `--data_dir`
as they did.

This module imports nothing but the standard library (no TensorFlow), so the
commands read it while they check their inputs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sparse_embed.errors import DataError
from sparse_embed.fileio import atomic_path

RUN_FILE = "run.json"


def write_run_record(model_dir: str | os.PathLike, data_dir: str | os.PathLike) -> Path:
    """Writes `<model_dir>/run.json` naming the data directory of the run.

    Args:
        model_dir: The run directory.
        data_dir: The data directory the run trains on (recorded absolute).

    Returns:
        The file written.
    """
    path = Path(model_dir) / RUN_FILE
    record = {"data_dir": str(Path(data_dir).resolve())}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return path


def recorded_data_dir(model_dir: str | os.PathLike) -> Path | None:
    """The data directory a run recorded, or None for a run directory without `run.json`.

    Args:
        model_dir: The run directory.

    Raises:
        DataError: If `run.json` is there but unreadable or names no data directory.
    """
    path = Path(model_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        return Path(record["data_dir"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is not a run record with a data_dir ({type(e).__name__}: {e}); "
                        "remove it and pass --data_dir") from None


def default_data_dir(model_dir: str | os.PathLike, data_dir: str | os.PathLike | None,
                     required: bool) -> str | None:
    """The data directory a command on a run uses: `--data_dir`, else the one the run recorded.

    Args:
        model_dir: The run directory.
        data_dir: The command's `--data_dir`; it wins when given.
        required: Whether the command cannot do without one. A recorded
            directory that no longer exists is then an error; otherwise the
            command goes on without it.

    Returns:
        The data directory, or None when there is none to use.

    Raises:
        DataError: If `required` and the recorded directory no longer exists.
    """
    if data_dir:
        return str(data_dir)
    recorded = recorded_data_dir(model_dir)
    if recorded is None:
        return None
    if not recorded.is_dir():
        if required:
            raise DataError(f"{model_dir} was trained on data_dir {recorded}, which no longer exists; "
                            "pass --data_dir (its new location)")
        return None
    return str(recorded)
