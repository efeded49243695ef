"""The documentation is tested: the site builds strictly, every results table is its JSON's rendering,
every module has an API page, the README stays short, and its quick start runs as written."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import pkgutil
import re
import shlex
import types
from pathlib import Path

import pytest

import sparse_embed
from sparse_embed.results import ROOT, documents, marked_tables, render_document, stale_blocks

README = ROOT / "README.md"
README_MAX_LINES = 150


@pytest.mark.unit
def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """`mkdocs build --strict`: no broken link or anchor, no page outside the navigation, no API page
    whose docstrings fail to render (mkdocs.yml sets `strict: true`)."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    config = load_config(str(ROOT / "mkdocs.yml"), site_dir=str(tmp_path / "site"))
    assert config["strict"], "mkdocs.yml must keep strict: true"
    build(config)
    assert (tmp_path / "site" / "index.html").is_file()


def _hooks() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.unit
def test_generated_blocks_list_everything_the_package_has() -> None:
    """The configuration and models pages take their lists from the package: every packaged config,
    every head of the registry and every key of every config section appears; an unknown block fails."""
    from sparse_embed.config import CONFIG_DIR, Config
    from sparse_embed.heads.params import HEADS

    hooks = _hooks()
    configs = hooks.render("<!-- generated: configs -->")
    names = [p.relative_to(CONFIG_DIR).with_suffix("").as_posix() for p in CONFIG_DIR.rglob("*.yaml")]
    assert names and all(f"`{name}`" in configs for name in names)
    heads = hooks.render("<!-- generated: heads -->")
    assert all(f"`{name}`" in heads for name in HEADS.names())
    tree = hooks.render("<!-- generated: config-tree -->")
    for section in dataclasses.fields(Config):
        for key in dataclasses.fields(type(getattr(Config(), section.name))):
            assert f"`{section.name}.{key.name}`" in tree, f"{section.name}.{key.name}"
    with pytest.raises(ValueError, match="unknown generated block 'nonsense'"):
        hooks.render("<!-- generated: nonsense -->")


@pytest.mark.unit
def test_every_results_table_is_its_json_rendered() -> None:
    assert not stale_blocks(documents()), "run python -m sparse_embed.results --write"


@pytest.mark.unit
def test_every_result_table_is_shown_and_every_file_listed() -> None:
    """No measured data nobody sees (each table is shown once, on its topic page or on the results
    page), and the results page lists every file with its command."""
    pages = {p: p.read_text() for p in (ROOT / "docs").glob("*.md")}
    results_page = pages[ROOT / "docs" / "results.md"]
    problems = []
    for path in sorted((ROOT / "results").glob("*.json")):
        result = json.loads(path.read_text())
        if f"`results/{path.name}`" not in results_page:
            problems.append(f"results/{path.name} is not listed on docs/results.md")
        for table in result["tables"]:
            ref = f"results/{path.name}#{table}"
            shown = [p.name for p, text in pages.items() if ref in marked_tables(text)]
            if len(shown) != 1:
                problems.append(f"results/{path.name}#{table} is shown on {shown or 'no page'}")
    assert not problems, problems


@pytest.mark.unit
def test_a_marker_in_a_code_block_is_an_example() -> None:
    text = "```\n<!-- results: results/none.json#t -->\n<!-- /results -->\n```\n"
    assert render_document(text) == text


@pytest.mark.unit
def test_a_stale_table_is_found(tmp_path: Path) -> None:
    """The check above can fail: an edited figure differs from its JSON's rendering."""
    from sparse_embed.results import Column, write_result

    write_result(tmp_path / "results" / "r.json", "t", {"t": ([Column("n", "n", ".2f")], [{"n": 1.5}])},
                 command="python benchmarks/x.py")
    page = tmp_path / "page.md"
    page.write_text("<!-- results: results/r.json#t -->\n<!-- /results -->\n")
    page.write_text(render_document(page.read_text(), tmp_path))
    assert "| 1.50 |" in page.read_text() and "`python benchmarks/x.py`" in page.read_text()
    assert stale_blocks([page], tmp_path) == []
    page.write_text(page.read_text().replace("| 1.50 |", "| 1.40 |"))
    assert stale_blocks([page], tmp_path) == ["page.md"]


def _modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(sparse_embed.__path__, "sparse_embed."):
        if not info.name.endswith("__main__") and not info.name.rsplit(".", 1)[1].startswith("_"):
            names.append(info.name)
    return sorted(names)


@pytest.mark.unit
def test_every_module_has_an_api_page() -> None:
    shown = []
    for page in (ROOT / "docs" / "api").glob("*.md"):
        shown += re.findall(r"^::: ([\w.]+)$", page.read_text(), re.M)
    assert len(shown) == len(set(shown)), "a module is on two API pages"
    missing = sorted(set(_modules()) - set(shown))
    unknown = sorted(set(shown) - set(_modules()))
    assert not missing and not unknown, (missing, unknown)


@pytest.mark.unit
def test_the_readme_is_short_and_links_every_topic_page() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    pages = [p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").glob("*.md")
             if p.name != "index.md"]
    unlinked = [page for page in pages if f"docs/{page}" not in text]
    assert not unlinked, unlinked


# `make X` in inline code, or a code line that starts with it.
_MAKE = re.compile(r"(?:`|^\s*)make ([a-z][\w-]*)", re.M)


@pytest.mark.unit
@pytest.mark.parametrize("doc", [str(p.relative_to(ROOT)) for p in documents()])
def test_documented_make_targets_and_modules_exist(doc: str) -> None:
    """Every `make TARGET`, `python -m sparse_embed.X` and `python benchmarks/x.py` a document shows
    names something that exists (test_cli checks their --flags against the parsers)."""
    text = (ROOT / doc).read_text()
    rules = re.findall(r"^([a-z][\w -]*):(?!=)", (ROOT / "Makefile").read_text(), re.M)
    targets = {name for rule in rules for name in rule.split()}
    missing = [f"make {t}" for t in _MAKE.findall(text) if t not in targets]
    for module in re.findall(r"python -m (sparse_embed[\w.]*\w)", text):
        if importlib.util.find_spec(module) is None:
            missing.append(module)
    missing += [s for s in re.findall(r"python ((?:benchmarks|preprocessing)/\w+\.py)", text)
                if not (ROOT / s).is_file()]
    assert not missing, missing


def _quick_start() -> list[str]:
    """The commands of the README's "Using it" block, continued lines joined, comments dropped."""
    text = README.read_text()
    block = re.search(r"## Using it\n.*?```\n(.*?)```", text, re.S)
    assert block, "the README has no 'Using it' code block"
    joined = block[1].replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


# The quick start at test size: what each command's sizes become (everything else runs as written).
SMALL = {
    "--identities=500": "--identities=8",
    "--images_per_identity=20": "--images_per_identity=6",
    "--test_identities=100": "--test_identities=4 --pairs_folds=2 --pairs_per_fold=6 --workers=1",
    "--shards=8": "--shards=2",
    "--workers=2": "--workers=1",
    "train.steps=3000": "train.steps=40 --set train.batch_size=16 --set train.checkpoint_every=40",
    "train.steps=300": "train.steps=20 --set train.batch_size=16 --set train.checkpoint_every=20",
}


@pytest.mark.slow
def test_the_readme_quick_start_runs_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Each command of the README's quick start, in order, in a fresh folder, at test sizes: every one
    exits 0 and the last one (the TFLite model on the held-out pairs) prints an accuracy.

    Each runs in this process (its module's `main(argv)`, what `python -m` calls), so TensorFlow is
    imported once; test_documented_make_targets_and_modules_exist checks `python -m` finds them."""
    from conftest import call_main

    commands = _quick_start()
    assert any("sparse_embed.train" in c for c in commands) and any("edge.lfw" in c for c in commands)
    monkeypatch.chdir(tmp_path)
    outputs = {}
    for command in commands:
        if command.startswith("tensorboard"):
            continue  # a viewer, not a step
        for big, small in SMALL.items():
            command = command.replace(big, small)
        argv = shlex.split(command)
        assert argv[:2] == ["python", "-m"], command
        capsys.readouterr()
        code = call_main(importlib.import_module(argv[2]).main, *argv[3:])
        captured = capsys.readouterr()
        assert code == 0, (command, captured.err[-3000:])
        outputs[argv[2]] = captured.out
    assert "accuracy" in outputs["sparse_embed.edge.lfw"], outputs["sparse_embed.edge.lfw"][-2000:]
