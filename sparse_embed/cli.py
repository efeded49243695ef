"""Shared plumbing of the command-line entry points."""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from typing import Any

from sparse_embed.errors import SparseEmbedError
from sparse_embed.training.launch import process_rank

# How long ranks other than 0 wait before reporting a user error themselves.
OTHER_RANKS_DELAY_S = 5.0


def _program(main: Callable[..., Any]) -> str:
    """The module name a user ran (`python -m NAME`), for error messages."""
    module = main.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name.removesuffix(".__main__") if spec else sys.argv[0]
    return module


def user_errors_exit(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps an entry point so user errors print one line and exit 2.

    Args:
        main: The entry point's main function.

    Returns:
        The wrapped function. A `SparseEmbedError` becomes
        ``<prog>: error: <message>`` on stderr and exit status 2, with no
        traceback. Under a multi-process launcher every rank exits 2; rank 0
        prints at once, the others only if they are still running
        `OTHER_RANKS_DELAY_S` later, so the user reads the message once.
    """

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except SparseEmbedError as e:
            if process_rank() != 0:
                # horovodrun stops every process once one exits. Rank 0 meets
                # the same error: give it the time to report it, so it is
                # printed once. An error rank 0 did not meet leaves this rank
                # running, and it reports the error itself.
                time.sleep(OTHER_RANKS_DELAY_S)
            print(f"{_program(main)}: error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def format_results(rows: dict[str, dict[str, float | str]]) -> str:
    """Formats result dicts as a table, one row per run, one column per metric.

    Text values (`accuracy_protocol`: how the threshold was chosen) are notes
    under the table, `key: text`, prefixed with the run name where runs differ.

    Args:
        rows: Run name -> metric name -> value.

    Returns:
        The table as text.
    """
    columns = list(dict.fromkeys(k for r in rows.values() for k, v in r.items()
                                 if not isinstance(v, str)))
    widths = [max(8, len(c)) for c in columns]
    first = max(4, *(len(name) for name in rows))
    head = f"{'run':<{first}}" + "".join(f"  {c:>{w}}" for c, w in zip(columns, widths, strict=True))
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        cells = "".join(f"  {r[c]:>{w}.4g}" if c in r else "  " + " " * w
                        for c, w in zip(columns, widths, strict=True))
        lines.append(f"{name:<{first}}" + cells)
    notes = {}
    for name, r in rows.items():
        for key, value in r.items():
            if isinstance(value, str):
                notes.setdefault(key, {})[name] = value
    for key, by_run in notes.items():
        if len(set(by_run.values())) == 1:
            lines.append(f"{key}: {next(iter(by_run.values()))}")
        else:
            lines += [f"{name} {key}: {value}" for name, value in by_run.items()]
    return "\n".join(lines) + "\n"
