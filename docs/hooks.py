"""MkDocs hook: the lists a page takes from the package, generated when the site is built.

A page asks for a generated block with a marker alone on its line:

    <!-- generated: config-tree -->   every config section: its keys, defaults and meanings
    <!-- generated: configs -->       the packaged configs, each with its leading comment
    <!-- generated: heads -->         the registered heads, each with its `head.params`

Each block is read from the package (the dataclasses of `sparse_embed.config`,
`sparse_embed/configs/**/*.yaml`, `sparse_embed.heads.params.HEADS`), so a new
config, key or head appears in the documentation without anyone editing a
page. An unknown marker, or a packaged config without its leading comment,
fails the build.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from sparse_embed import config as config_module
from sparse_embed.heads.params import HEADS

_MARKER = re.compile(r"^<!-- generated: (?P<name>[a-z-]+) -->$", re.M)


def _inline(value: Any) -> str:
    """A value as one line of YAML, in backticks."""
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return f"`{text.removesuffix(chr(10) + '...').removesuffix(' ...')}`"


def attributes(cls: type) -> dict[str, str]:
    """The `Attributes:` section of a Google-style class docstring: name -> text on one line."""
    found: dict[str, str] = {}
    inside, current = False, None
    for line in (cls.__doc__ or "").splitlines():
        stripped = line.strip()
        if stripped == "Attributes:":
            inside = True
            continue
        if not inside:
            continue
        if not stripped:
            if found:
                break
            continue
        match = re.match(r"^(\w+): (.*)$", stripped)
        if match and len(line) - len(line.lstrip()) == 8:
            current = match[1]
            found[current] = match[2]
        elif current is not None:
            found[current] += " " + stripped
    return found


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def config_tree() -> str:
    """One table per section of `Config`: key, default, meaning."""
    defaults = config_module.config_to_dict(config_module.Config())
    blocks = []
    for section in dataclasses.fields(config_module.Config):
        cls = section.default_factory
        doc = attributes(cls)
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        lines = [f"### `{section.name}`", "", summary, "", "| key | default | meaning |", "|---|---|---|"]
        for field in dataclasses.fields(cls):
            value = defaults[section.name][field.name]
            if section.name == "head" and field.name == "params":
                shown = "the head's own ([Heads](models.md#heads))"
            elif isinstance(field.default_factory, type) and dataclasses.is_dataclass(field.default_factory):
                shown = "a section, its keys below"
            else:
                shown = _inline(value)
            lines.append(f"| `{section.name}.{field.name}` | {_cell(shown)} | "
                         f"{_cell(doc.get(field.name, ''))} |")
            if shown == "a section, its keys below":
                inner = attributes(field.default_factory)
                lines += [f"| `{section.name}.{field.name}.{key}` | {_cell(_inline(v))} | "
                          f"{_cell(inner.get(key, ''))} |" for key, v in value.items()]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def leading_comment(path: Path) -> list[str]:
    """The comment lines a YAML file starts with, without their `#`."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[2:] if line.startswith("# ") else line[1:])
    if not lines:
        raise ValueError(f"{path} has no leading comment saying how to run it and what it reaches")
    return lines


def description(comment: list[str]) -> str:
    """What a config is: its comment's lines up to the first indented one (a command)."""
    lines = []
    for line in comment:
        if line.startswith(" "):
            break
        lines.append(line.strip())
    return " ".join(lines)


def packaged_configs() -> str:
    """A table of the packaged configs (name, description), then each one's whole header."""
    root = config_module.CONFIG_DIR
    paths = sorted(root.rglob("*.yaml"), key=lambda p: (len(p.relative_to(root).parts), str(p)))
    table = ["| `--config=` | what it is |", "|---|---|"]
    details = []
    for path in paths:
        name = path.relative_to(root).with_suffix("").as_posix()
        comment = leading_comment(path)
        table.append(f"| `{name}` | {_cell(description(comment))} |")
        body = "\n".join("    " + line for line in ["```"] + comment + ["```"])
        details.append(f'??? note "{name}"\n\n{body}\n')
    return "\n".join(table) + "\n\nThe header of each, as it stands in the file:\n\n" + "\n".join(details)


def heads() -> str:
    """The registered heads: what each computes, its `head.params` and the shared fields it takes."""
    table = ["| `head.name` | what it computes | `head.params` (default) | shared `head` fields |",
             "|---|---|---|---|"]
    for name in HEADS.names():
        cls = HEADS.get(name)
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        doc = attributes(cls)
        params = "<br>".join(f"`{f.name}` = {_inline(f.default)}: {doc.get(f.name, '')}"
                             for f in dataclasses.fields(cls)) or "none"
        shared = ", ".join(f"`{s}`" for s in cls.shared) or "none"
        if cls.pairs or cls.balanced:
            summary += " Needs `data.sampler=p_k`."
        if cls.distribution != {"name": "dirac"}:
            needs = ", ".join(f"`{k}: {str(v).lower() if isinstance(v, bool) else v}`"
                              for k, v in cls.distribution.items())
            summary += f" Reads `model.distribution` {needs}."
        if cls.two_stage:
            summary += " Starts from a deterministic run (`--init_from`)."
        table.append(f"| `{name}` | {_cell(summary)} | {_cell(params)} | {shared} |")
    return "\n".join(table) + "\n"


GENERATORS = {"config-tree": config_tree, "configs": packaged_configs, "heads": heads}


def render(markdown: str) -> str:
    """`markdown` with every generated-block marker replaced by its block."""
    def block(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in GENERATORS:
            raise ValueError(f"unknown generated block '{name}' (known: {', '.join(GENERATORS)})")
        return GENERATORS[name]().rstrip("\n")

    return _MARKER.sub(block, markdown)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """MkDocs event: renders the page's generated blocks."""
    return render(markdown)
