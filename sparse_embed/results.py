"""Results as data: what a benchmark or study measured, with the command, commit and machine that made it.

    python -m sparse_embed.results --check
    python -m sparse_embed.results --write

A result file (`results/<name>.json`) is written by the command that measured
it (`write_result`) and holds:

    {"title": ..., "command": "python benchmarks/search_bench.py --only_modes",
     "commit": "1a2b3c4", "dirty": false, "date": "2026-12-07T14:10:03Z",
     "machine": {"cores": 2, "cpu": "...", "system": "Linux-..."},
     "tables": {"<name>": {"columns": [{"key": "mode", "label": "mode", "format": ""}, ...],
                           "rows": [{"mode": "auto", ...}, ...]}}}

A page of the documentation (or the README) shows a table between two markers:

    <!-- results: results/search.json#modes -->
    | ... the rendered table and the line naming its command ... |
    <!-- /results -->

`--write` re-renders every marked block from its JSON; `--check` (run by the
test suite) fails on a block that differs from its JSON's rendering, so no
table in the documentation can drift from the data behind it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sparse_embed.cli import make_parser, user_errors_exit
from sparse_embed.errors import DataError
from sparse_embed.fileio import atomic_path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "results"
# Files whose marked blocks are rendered: the README and every page of the site.
DOCUMENTS = ("README.md", "docs")

_FENCE = re.compile(r"(^```.*?^```)", re.S | re.M)
_BLOCK = re.compile(r"(<!-- results: (?P<ref>[^ ]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


@dataclass(frozen=True)
class Column:
    """One column of a results table.

    Attributes:
        key: The row field it shows.
        label: Its header.
        format: A format spec for numbers (e.g. ".3f", ".1%"); empty shows the value as it is.
    """

    key: str
    label: str
    format: str = ""


def machine() -> dict[str, object]:
    """The machine a measurement ran on: cores, CPU model and operating system."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count() or 1, "cpu": cpu, "system": platform.platform(terse=True)}


def git_commit(root: Path = ROOT) -> tuple[str, bool]:
    """(short commit hash, whether the work tree had changes) of `root`; ("unknown", False) outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        # Result files themselves do not count: a run that writes several leaves the first changed.
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                 ":(exclude)results"], cwd=root, capture_output=True, text=True,
                                check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return commit, bool(status.strip())


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that is running, as a user would type it from the repository root.

    A module of the package shows as `python -m sparse_embed.x`, a script as its path
    relative to the root.

    Args:
        argv: The arguments, program first; None reads sys.argv.
    """
    argv = list(sys.argv if argv is None else argv)
    program = Path(argv[0]).resolve()
    try:
        relative = program.relative_to(ROOT)
    except ValueError:
        relative = None
    if relative is not None and relative.parts[0] == "sparse_embed":
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__main__")
        head = ["python", "-m", module]
    else:
        head = ["python", str(relative if relative is not None else Path(argv[0]).name)]
    return shlex.join(head + argv[1:])


def write_result(path: str | os.PathLike, title: str, tables: Mapping[str, tuple[Sequence[Column],
                 Sequence[Mapping[str, object]]]], command: str | None = None,
                 notes: str = "") -> Path:
    """Writes a result file (atomically) with the running command, commit, machine and date.

    Args:
        path: The JSON file, usually `results/<name>.json`.
        title: What was measured, one line.
        tables: Table name -> (its columns, its rows as dicts keyed by column key).
        command: The command to record; None records the running one.
        notes: What a reader needs to read the figures (data, sizes, what a ratio compares).

    Returns:
        The path written.
    """
    commit, dirty = git_commit()
    doc = {
        "title": title,
        "command": command or command_line(),
        "commit": commit,
        "dirty": dirty,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "notes": notes,
        "tables": {name: {"columns": [vars(c) for c in columns], "rows": [dict(r) for r in rows]}
                   for name, (columns, rows) in tables.items()},
    }
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
    return Path(path)


def _cell(value: object, spec: str) -> str:
    if value is None:
        return "–"
    if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # a count stored as a float (512.0) reads as the count
    return str(value).replace("|", "\\|")


def render_table(result: Mapping[str, object], table: str) -> str:
    """One table of a result as Markdown, followed by the line saying which command made it where.

    Args:
        result: A result file's content.
        table: The table's name in it.
    """
    tables = result["tables"]
    if table not in tables:
        raise DataError(f"the result has no table '{table}' (it has {', '.join(tables)})")
    columns = [Column(**c) for c in tables[table]["columns"]]
    lines = ["| " + " | ".join(c.label for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in tables[table]["rows"]:
        lines.append("| " + " | ".join(_cell(row.get(c.key), c.format) for c in columns) + " |")
    box = result["machine"]
    dirty = " (with local changes)" if result.get("dirty") else ""
    lines += ["", f"<sub>`{result['command']}` · commit {result['commit']}{dirty} · "
                  f"{box['cores']} cores, {box['cpu']} · {result['date'][:10]}</sub>"]
    return "\n".join(lines) + "\n"


def load_result(path: str | os.PathLike) -> dict[str, object]:
    """A result file's content; a missing or unreadable one is one DataError."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"result file {path} not found; run the command that writes it") from None
    except json.JSONDecodeError as error:
        raise DataError(f"result file {path} is not JSON ({error})") from None


def documents(root: Path = ROOT) -> list[Path]:
    """The README and every Markdown page under docs/."""
    found = []
    for name in DOCUMENTS:
        path = root / name
        found += sorted(path.rglob("*.md")) if path.is_dir() else [path] if path.exists() else []
    return found


def render_document(text: str, root: Path = ROOT) -> str:
    """`text` with every marked block rendered from its result file.

    Args:
        text: A Markdown document.
        root: What the blocks' result paths are relative to.
    """
    def block(match: re.Match[str]) -> str:
        file, _, table = match["ref"].partition("#")
        result = load_result(root / file)
        return match[1] + render_table(result, table or next(iter(result["tables"]))) + match[4]

    # A marker inside a fenced code block is an example of the syntax, not a table.
    parts = _FENCE.split(text)
    return "".join(part if i % 2 else _BLOCK.sub(block, part) for i, part in enumerate(parts))


def marked_tables(text: str) -> list[str]:
    """The `file#table` references of the live markers in `text` (not those in code blocks)."""
    parts = _FENCE.split(text)
    return [m["ref"] for i, part in enumerate(parts) if not i % 2 for m in _BLOCK.finditer(part)]


def stale_blocks(paths: Iterable[Path], root: Path = ROOT) -> list[str]:
    """The documents (relative to `root`) whose marked blocks differ from their results' rendering."""
    return [str(p.relative_to(root)) for p in paths if render_document(p.read_text(), root) != p.read_text()]


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sparse_embed.results`."""
    parser = make_parser(__doc__, "python -m sparse_embed.results")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true",
                      help="Exit 1 naming each document whose tables differ from their JSON.")
    mode.add_argument("--write", action="store_true", help="Re-render every marked table in place.")
    return parser


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: check or re-render the results tables of the README and docs/.

    Args:
        argv: Arguments without the program name; None reads sys.argv.
    """
    args = build_parser().parse_args(argv)
    paths = documents()
    if args.write:
        problems = []
        for path in paths:
            text = path.read_text()
            try:
                rendered = render_document(text)
            except DataError as error:  # the other documents still render
                problems.append(f"{path.relative_to(ROOT)}: {error}")
                continue
            if rendered != text:
                with atomic_path(path) as tmp:
                    tmp.write_text(rendered)
                print(f"rendered {path.relative_to(ROOT)}")
        if problems:
            raise DataError("; ".join(problems))
        return
    stale = stale_blocks(paths)
    if stale:
        print(f"results tables out of date in {', '.join(stale)}; "
              f"run python -m sparse_embed.results --write", file=sys.stderr)
        sys.exit(1)
    print(f"{len(paths)} documents, every results table matches its JSON")


def run() -> None:
    """Console-script entry point."""
    main()


if __name__ == "__main__":
    run()
