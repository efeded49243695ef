"""A run directory records its data directory (run.json); embed, evaluate and export default to it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_main_user_error

from sparse_embed.config import load_config, save_config
from sparse_embed.errors import DataError
from sparse_embed.run_record import RUN_FILE, default_data_dir, recorded_data_dir, write_run_record

pytestmark = pytest.mark.unit


def test_record_round_trip_and_defaults(tmp_path: Path) -> None:
    run, data = tmp_path / "run", tmp_path / "data"
    run.mkdir()
    data.mkdir()
    assert recorded_data_dir(run) is None
    assert default_data_dir(run, None, required=True) is None
    write_run_record(run, data)
    assert json.loads((run / RUN_FILE).read_text()) == {"data_dir": str(data.resolve())}
    assert sorted(p.name for p in run.iterdir()) == [RUN_FILE]  # no temporary file left
    assert recorded_data_dir(run) == data.resolve()
    assert default_data_dir(run, None, required=True) == str(data.resolve())
    # An explicit --data_dir wins, even over a recorded one that has gone.
    assert default_data_dir(run, "elsewhere", required=True) == "elsewhere"
    data.rmdir()
    assert default_data_dir(run, "elsewhere", required=True) == "elsewhere"
    assert default_data_dir(run, None, required=False) is None
    with pytest.raises(DataError, match="no longer exists; pass --data_dir") as error:
        default_data_dir(run, None, required=True)
    assert "\n" not in str(error.value)
    (run / RUN_FILE).write_text("{not json")
    with pytest.raises(DataError, match="is not a run record"):
        recorded_data_dir(run)


@pytest.fixture
def moved_run(tmp_path: Path) -> Path:
    """A run directory (config only) whose recorded data directory no longer exists."""
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config("smoke"), run / "config.yaml")
    write_run_record(run, tmp_path / "gone")
    return run


@pytest.mark.parametrize("command", ["evaluate", "export", "embed"])
def test_moved_data_dir_is_one_line(command: str, moved_run: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Each command that would use the recorded directory says it has gone, in one line, before
    loading TensorFlow."""
    import importlib

    main = importlib.import_module(f"sparse_embed.{command}").main
    args = [f"--model_dir={moved_run}"]
    if command == "embed":
        args.append(f"--output={tmp_path / 'out.hdf5'}")
    assert_main_user_error(capsys, main, args, "trained on data_dir", str(tmp_path / "gone"),
                           "no longer exists", "pass --data_dir")
