"""Every command line: one convention (argparse via `build_parser()`), `--help` exits 0 with its
examples' line breaks, one flag vocabulary, deprecated spellings, console scripts."""

from __future__ import annotations

import argparse
import configparser
import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from sparse_embed.cli import all_parsers, deprecated_aliases, examples

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]

# Every module of the package with a command line.
PACKAGE_CLIS = (
    "sparse_embed.train",
    "sparse_embed.embed",
    "sparse_embed.evaluate",
    "sparse_embed.export",
    "sparse_embed.demo",
    "sparse_embed.study",
    "sparse_embed.models.__main__",
    "sparse_embed.search.__main__",
    "sparse_embed.edge.lfw",
    "sparse_embed.faces.mtcnn_tflite",
    "sparse_embed.data.synthetic",
    "sparse_embed.data.verification",
    "sparse_embed.metrics.identification",
    "sparse_embed.metrics.retrieval",
    "sparse_embed.metrics.sparsity",
    "sparse_embed.metrics.megaface",
    "sparse_embed.preprocessing.align_faces",
    "sparse_embed.preprocessing.build_tfrecords",
    "sparse_embed.preprocessing.build_cifar_tfrecords",
    "sparse_embed.preprocessing.build_retrieval_tfrecords",
    "sparse_embed.preprocessing.msceleb_to_jpeg",
    "sparse_embed.preprocessing.prepare_megaface",
    "sparse_embed.results",
    "sparse_embed.experiment",
    "sparse_embed.app.__main__",
    "sparse_embed.landmarks.__main__",
)
SCRIPTS = tuple(str(p.relative_to(ROOT)) for p in sorted([*ROOT.glob("preprocessing/*.py"),
                                                          *ROOT.glob("benchmarks/*.py")]))
CLIS = PACKAGE_CLIS + SCRIPTS

# Console script -> the module whose `run()` it calls (setup.cfg).
CONSOLE_SCRIPTS = {
    "sparse-embed-train": "sparse_embed.train",
    "sparse-embed-embed": "sparse_embed.embed",
    "sparse-embed-evaluate": "sparse_embed.evaluate",
    "sparse-embed-export": "sparse_embed.export",
    "sparse-embed-demo": "sparse_embed.demo",
    "sparse-embed-study": "sparse_embed.study",
    "sparse-embed-models": "sparse_embed.models.__main__",
    "sparse-embed-search": "sparse_embed.search.__main__",
    "sparse-embed-edge-lfw": "sparse_embed.edge.lfw",
    "sparse-embed-mtcnn-tflite": "sparse_embed.faces.mtcnn_tflite",
    "sparse-embed-synthetic": "sparse_embed.data.synthetic",
    "sparse-embed-verification": "sparse_embed.data.verification",
    "sparse-embed-megaface": "sparse_embed.metrics.megaface",
    "sparse-embed-align-faces": "sparse_embed.preprocessing.align_faces",
    "sparse-embed-build-tfrecords": "sparse_embed.preprocessing.build_tfrecords",
    "sparse-embed-build-cifar-tfrecords": "sparse_embed.preprocessing.build_cifar_tfrecords",
    "sparse-embed-build-retrieval-tfrecords": "sparse_embed.preprocessing.build_retrieval_tfrecords",
    "sparse-embed-msceleb-to-jpeg": "sparse_embed.preprocessing.msceleb_to_jpeg",
    "sparse-embed-prepare-megaface": "sparse_embed.preprocessing.prepare_megaface",
    "sparse-embed-results": "sparse_embed.results",
    "sparse-embed-experiment": "sparse_embed.experiment",
    "sparse-embed-app": "sparse_embed.app.__main__",
    "sparse-embed-landmarks": "sparse_embed.landmarks.__main__",
}

# An option whose values differ in kind between command lines, and why that is right.
KIND_EXCEPTIONS = {
    # `evaluate identification` also takes `none` (every row is a candidate).
    "--score_threshold",
}
# Spellings that had several meanings, or that the vocabulary renamed: never a live option now.
RETIRED = ("--threshold", "--threads", "--topk", "--out", "--batch", "--output_dir",
           "--per_identity", "--processes", "--budget", "--group", "--size", "--ids-from",
           "--ids-file", "--block-rows", "--dense-dim", "--only-modes", "--only-batched")
# A continued example whose line break was lost: text, a run of spaces, then the next option.
_JOINED = re.compile(r"[^\s\\] {4,}--[a-z]")


def load(cli: str) -> ModuleType:
    """The module of a package command line, or a script loaded from its file."""
    if not cli.endswith(".py"):
        return importlib.import_module(cli)
    name = "cli_" + Path(cli).stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / cli)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def kind(action: argparse.Action) -> str:
    """What an option takes: nothing (a switch), a number or text."""
    if action.nargs == 0:
        return "switch"
    return "number" if action.type in (int, float) else "text"


def live_options(parser: argparse.ArgumentParser) -> dict[str, set[str]]:
    """Option -> the kinds of value it takes in `parser` and its sub-commands (aliases left out)."""
    options: dict[str, set[str]] = {}
    aliases = deprecated_aliases(parser)
    for p in all_parsers(parser):
        for action in p._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            for option in action.option_strings:
                if option.startswith("--") and option not in aliases:
                    options.setdefault(option, set()).add(kind(action))
    return options


# Old homes of moved commands, kept for one release: module -> the command they hand over to
# (test_megaface runs the old spelling against the new one).
FORWARDED = {"sparse_embed.data.megaface": "sparse_embed.metrics.megaface"}


def test_every_package_command_line_is_listed() -> None:
    """A module that runs as a program is in PACKAGE_CLIS, so the tests below cover it (or it
    only forwards a moved command to one that is)."""
    found = set()
    for path in (ROOT / "sparse_embed").rglob("*.py"):
        if 'if __name__ == "__main__":' in path.read_text():
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found.add(module)
    assert found <= set(PACKAGE_CLIS) | set(FORWARDED), sorted(found - set(PACKAGE_CLIS))
    assert set(FORWARDED.values()) <= set(PACKAGE_CLIS)


def test_preprocessing_scripts_forward_to_the_package() -> None:
    """`python preprocessing/x.py` in a clone is `python -m sparse_embed.preprocessing.x`: the same
    parser and entry point, one for each package command (test_tfrecord runs one as a program)."""
    scripts = sorted(p.stem for p in (ROOT / "preprocessing").glob("*.py"))
    commands = sorted(m.rsplit(".", 1)[1] for m in PACKAGE_CLIS
                      if m.startswith("sparse_embed.preprocessing."))
    assert scripts == commands
    for name in scripts:
        script, module = load(f"preprocessing/{name}.py"), load(f"sparse_embed.preprocessing.{name}")
        assert (script.build_parser, script.main) == (module.build_parser, module.main), name


@pytest.mark.parametrize("cli", CLIS)
def test_build_parser_and_help(cli: str, capsys: pytest.CaptureFixture[str]) -> None:
    """build_parser() is an argparse parser; `--help` (each sub-command's too) exits 0 in-process and
    shows the docstring's usage examples with their line breaks."""
    module = load(cli)
    parser = module.build_parser()
    assert isinstance(parser, argparse.ArgumentParser)
    commands = [[]] + [[name] for action in parser._actions
                       if isinstance(action, argparse._SubParsersAction) for name in action.choices]
    for command in commands:
        with pytest.raises(SystemExit) as exit_info:
            module.main([*command, "--help"])
        assert exit_info.value.code == 0, (command, capsys.readouterr().err)
        out = capsys.readouterr().out
        assert out.startswith("usage:"), out[:200]
        assert not _JOINED.search(out), _JOINED.search(out).group(0)
    shown = examples(module.__doc__)
    help_lines = set(parser.format_help().splitlines())
    assert all(line in help_lines for line in shown.splitlines() if line.strip()), shown


@pytest.mark.parametrize("cli", CLIS)
def test_parse_error_is_one_line(cli: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A command line argparse rejects is one line on stderr and exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        load(cli).build_parser().parse_args(["--no_such_option=1"])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and ": error: " in lines[0], lines


def test_one_flag_vocabulary() -> None:
    """An option name takes the same kind of value everywhere, and retired spellings are only
    deprecated aliases."""
    kinds: dict[str, dict[str, set[str]]] = {}
    for cli in CLIS:
        for option, option_kinds in live_options(load(cli).build_parser()).items():
            kinds.setdefault(option, {})[cli] = option_kinds
    mixed = {option: by_cli for option, by_cli in kinds.items()
             if len(set().union(*by_cli.values())) > 1 and option not in KIND_EXCEPTIONS}
    assert not mixed, mixed
    retired = {option: sorted(kinds[option]) for option in RETIRED if option in kinds}
    assert not retired, retired


def test_cpp_cli_speaks_the_vocabulary() -> None:
    """The search binary's options are the Python command lines' names; its old spellings are aliases."""
    source = (ROOT / "search" / "cli.cpp").read_text()
    usage = source[source.index("kUsage[]"):source.index("kDeprecatedOptions")]
    options = set(re.findall(r"--[a-z_]+", usage))
    python = set()
    for cli in CLIS:
        python |= set(live_options(load(cli).build_parser()))
    assert {"--k", "--num_threads", "--value_type", "--rescore_k"} <= options
    assert not options & set(RETIRED), options & set(RETIRED)
    assert not options & {"--db-dense", "--query-dense", "--values", "--rescore-k", "--ids", "--scores"}
    assert {"--k", "--num_threads", "--value_type", "--rescore_k"} <= python


def test_deprecated_alias_works_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """An old spelling sets the new option and says so in one line; it is hidden from --help."""
    search = load("sparse_embed.search.__main__")
    parser = search.build_parser()
    args = parser.parse_args(["query", "--index=a.idx", "--queries=q.hdf5", "--threshold=0.5"])
    assert args.score_threshold == 0.5
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "--threshold is deprecated" in lines[0] and "--score_threshold" in lines[0]
    args = parser.parse_args(["add", "--index=d", "--embeddings=e.hdf5", "--ids-from=label"])
    assert args.ids_from == "label"
    demo = load("sparse_embed.demo").build_parser()
    args = demo.parse_args(["--out=runs/x", "--images=3"])
    assert (args.output, args.images_per_identity) == ("runs/x", 3)
    assert not re.search(r"--out\b|--images\b", demo.format_help())
    assert deprecated_aliases(demo) == {"--out": "--output", "--images": "--images_per_identity"}
    models = load("sparse_embed.models.__main__").build_parser()
    assert models.parse_args(["nin", "--nose"]).se is False


def test_console_scripts() -> None:
    """Every user-facing entry point is a console script calling its module's run()."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    declared = {}
    for line in config["options.entry_points"]["console_scripts"].strip().splitlines():
        name, target = (part.strip() for part in line.split("="))
        declared[name] = target
    assert declared == {name: f"{module}:run" for name, module in CONSOLE_SCRIPTS.items()}
    for module in CONSOLE_SCRIPTS.values():
        assert callable(importlib.import_module(module).run)


@pytest.mark.integration
def test_console_script_runs() -> None:
    """One installed console script, as a real process: --help exits 0."""
    script = shutil.which("sparse-embed-search", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("console scripts not installed; run pip install -e .")
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: sparse-embed-search")


def test_native_stderr_is_kept_off_python_stderr_is_not(capfd: pytest.CaptureFixture[str]) -> None:
    """Native code's writes to descriptor 2 (libjpeg's "Improper call to JPEG library") are captured;
    Python's own stderr (progress bars, warnings) still reaches it."""
    import os

    from sparse_embed.fileio import native_stderr_to_file

    with native_stderr_to_file(replay_on_error=False, keep_python=True):
        os.write(2, b"Improper call to JPEG library in state 201\n")
        print("progress", file=sys.stderr)
    print("after", file=sys.stderr)
    err = capfd.readouterr().err
    assert "JPEG" not in err and "progress" in err and "after" in err


# A command in the documentation, the Makefile or a run script: `python -m sparse_embed.X`,
# `python preprocessing/x.py`, `python benchmarks/x.py` (or `$(PY)`, `"$PYTHON"`) or a console
# script, up to the end of its (continued) line.
_PYTHON = r"(?:python|\"?\$\{?PYTHON\}?\"?|\$\(PY\))"
_DOC_COMMAND = re.compile(rf"(?:{_PYTHON} -m (sparse_embed[\w.]*)"
                          rf"|{_PYTHON} ((?:preprocessing|benchmarks)/\w+\.py)"
                          r"|(sparse-embed-[\w-]+))((?:\\\n|[^\n`])*)")
_MODULE_OF_SCRIPT = {name: module.removesuffix(".__main__") for name, module in CONSOLE_SCRIPTS.items()}


def _documented_commands(text: str) -> list[tuple[str, list[str]]]:
    """(command line module or script, its --options) of every command shown in `text`."""
    commands = []
    for match in _DOC_COMMAND.finditer(text):
        module, script, console, rest = match.groups()
        cli = script or module or _MODULE_OF_SCRIPT.get(console, console)
        commands.append((cli, re.findall(r"(?<![\w-])--[a-z][\w-]*", rest.split("#")[0])))
    return commands


def _parser_for(cli: str) -> argparse.ArgumentParser | None:
    for candidate in (cli, f"{cli}.__main__"):
        if candidate in CLIS:
            return load(candidate).build_parser()
    return None


# The packaged configs' headers are documents too: the configuration page shows them.
DOCUMENTS = ["README.md", "Makefile", *sorted(str(p.relative_to(ROOT)) for p in [
    *(ROOT / "docs").rglob("*.md"), *(ROOT / "run_scripts").rglob("*.sh"),
    *(ROOT / "sparse_embed" / "configs").rglob("*.yaml")])]


@pytest.mark.parametrize("doc", DOCUMENTS)
def test_documented_options_exist(doc: str) -> None:
    """Every option a documented command shows is a current option of that command line (of it or one
    of its sub-commands), never a deprecated spelling."""
    unknown = []
    for cli, options in _documented_commands((ROOT / doc).read_text()):
        parser = _parser_for(cli)
        if parser is None:
            continue
        known = set(live_options(parser)) | {"--help"}
        unknown += [f"{cli} {option}" for option in options if option not in known]
    assert not unknown, sorted(set(unknown))
