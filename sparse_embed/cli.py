"""Shared plumbing of the command-line entry points.

Every command line is an `argparse` parser, built by its module's
`build_parser()` (which tests and the documentation checks introspect) and run
by `main(argv)`, callable in-process any number of times: no flag state is
global. `make_parser` gives each parser the project's conventions: the module
docstring's usage examples under the options with their line breaks, a parse
error as one line and exit status 2, `--help` with exit status 0, no
abbreviated option names. `deprecated_alias` keeps an old option spelling
working for one release with a one-line note.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from sparse_embed.errors import SparseEmbedError
from sparse_embed.launch import process_rank

# How long ranks other than 0 wait before reporting a user error themselves.
OTHER_RANKS_DELAY_S = 5.0


class ArgumentParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose errors are one line (and exit 2), with no abbreviations."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        # Old spelling -> current option (`deprecated_alias`).
        self.deprecated: dict[str, str] = {}

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        """Parses `args` (None: sys.argv) after writing deprecated spellings as their current options."""
        args = list(sys.argv[1:] if args is None else args)
        for i, arg in enumerate(args):
            if arg == "--":
                break
            name, equals, value = arg.partition("=")
            if name in self.deprecated:
                new = self.deprecated[name]
                print(f"{self.prog}: warning: {name} is deprecated and goes in the next release; "
                      f"use {new}", file=sys.stderr)
                args[i] = new + equals + value
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        """Prints ``<prog>: error: <message>`` on one line and exits with status 2.

        Under a multi-process launcher, ranks other than 0 wait first, as
        `user_errors_exit` does, so the user reads the message once.
        """
        if process_rank() != 0:
            time.sleep(OTHER_RANKS_DELAY_S)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def program(module: str) -> str:
    """How the user ran `module`: its console script's name, or ``python -m module``.

    Args:
        module: The entry point's module name, e.g. ``sparse_embed.train``.
    """
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if name.startswith("sparse-embed-"):
        return name
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is None:  # a script: python preprocessing/x.py
            return f"python {sys.argv[0]}"
        module = spec.name.removesuffix(".__main__")
    return f"python -m {module}"


def split_doc(doc: str | None) -> tuple[str, str]:
    """A module docstring as (description, epilog): its first paragraph, and the rest verbatim.

    Args:
        doc: The module docstring.
    """
    text = (doc or "").strip("\n")
    summary, _, rest = text.partition("\n\n")
    summary = summary.strip()
    if "\n" not in summary:  # a one-line summary written as one long string
        summary = textwrap.fill(summary, width=100)
    return summary, rest.rstrip()


def make_parser(doc: str | None, prog: str, **kwargs: Any) -> ArgumentParser:
    """An entry point's parser: the docstring's first paragraph above the options, the rest below.

    The rest (usage examples, notes) is printed as written, so an example
    continued over several lines keeps its line breaks.

    Args:
        doc: The module docstring.
        prog: The program name shown in usage and errors (`program(__name__)`).
        **kwargs: More `argparse.ArgumentParser` arguments.
    """
    description, epilog = split_doc(doc)
    return ArgumentParser(prog=prog, description=description, epilog=epilog or None, **kwargs)


def examples(doc: str | None) -> str:
    """The usage examples of a docstring: its indented blocks that run a command, as written.

    Args:
        doc: A module docstring.
    """
    blocks, block = [], []
    for line in [*(doc or "").splitlines(), ""]:
        if line.startswith("    "):
            block.append(line)
            continue
        if any(row.lstrip().startswith(("python ", "horovodrun ", "sparse-embed-")) for row in block):
            blocks.append("\n".join(block))
        block = []
    return "\n\n".join(blocks)


def add_command(commands: argparse._SubParsersAction, name: str, doc: str | None,
                **kwargs: Any) -> ArgumentParser:
    """Adds a sub-command whose help is `doc` split as `make_parser` splits it.

    Args:
        commands: The parent's `add_subparsers()` result.
        name: The sub-command.
        doc: Its docstring: the first paragraph is also its one-line summary.
        **kwargs: More `add_parser` arguments.
    """
    description, epilog = split_doc(doc)
    kwargs.setdefault("help", description.splitlines()[0] if description else None)
    return commands.add_parser(name, description=description, epilog=epilog or None,
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               allow_abbrev=False, **kwargs)


def deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Keeps `old` working as `new` for one release, with a one-line deprecation note.

    The old spelling is rewritten to the new one before parsing, so it takes
    the values `new` takes and counts for `new` being required; `--help` does
    not show it.

    Args:
        parser: A parser built by `make_parser` (or a sub-command of one) that has `new`.
        old: The old spelling, e.g. ``--threads``.
        new: The option it now is, e.g. ``--num_threads``.
    """
    if not any(new in action.option_strings for action in parser._actions):
        raise ValueError(f"{parser.prog} has no option {new} for the deprecated {old}")
    parser.deprecated[old] = new


def all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """`parser` and the parsers of its sub-commands, recursively.

    Args:
        parser: A command line's parser.
    """
    parsers = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                parsers += all_parsers(sub)
    return parsers


def deprecated_aliases(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Old spelling -> new option of every deprecated alias of `parser` and its sub-commands.

    Args:
        parser: A command line's parser.
    """
    return {old: new for p in all_parsers(parser) for old, new in getattr(p, "deprecated", {}).items()}


def comma_list(text: str) -> list[str]:
    """An option's comma-separated values, empty items dropped (``fp32,int8`` -> two values).

    Args:
        text: The option's value.
    """
    return [item for item in text.split(",") if item]


def user_errors_exit(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps an entry point so user errors print one line and exit 2.

    Args:
        main: The entry point's main function.

    Returns:
        The wrapped function. A `SparseEmbedError` becomes
        ``<prog>: error: <message>`` on stderr (`<prog>` as `program` names
        it, as in the parser's own errors) and exit status 2, with no
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
            print(f"{program(main.__module__)}: error: {e}", file=sys.stderr)
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
