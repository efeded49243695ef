"""benchmarks/search_bench.py writes result files the docs render (the figures are not asserted)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import ROOT

from sparse_embed.results import load_result, render_table

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("search_bench", ROOT / "benchmarks" / "search_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("only, tables", [
    ("--only_modes", {"modes", "index"}),
    ("--only_batched", {"batched"}),
    ("--only_blocks", {"blocks"}),
    ("--only_mutable", {"mutable"}),
])
def test_each_table_is_written_with_its_command(bench, tmp_path, capsys, only, tables):
    out = tmp_path / "search.json"
    bench.main([only, "--rows=12000", "--num_queries=20", "--num_threads=1", "--block_sizes=32,128",
                f"--output={out}"])
    result = load_result(out)
    assert set(result["tables"]) == tables
    assert result["command"].startswith("python ") and only in result["command"]
    assert result["machine"]["cores"] >= 1 and "12000 rows" in result["notes"]
    for name, table in result["tables"].items():
        keys = {c["key"] for c in table["columns"]}
        assert table["rows"] and all(set(row) >= keys for row in table["rows"]), name
        rendered = render_table(result, name)
        assert rendered.count("\n|") >= len(table["rows"]) and result["command"] in rendered
    json.dumps(result)  # plain JSON values only
    assert capsys.readouterr().out  # the tables are printed too


def test_only_one_table_at_a_time(bench):
    with pytest.raises(SystemExit, match="at most one of"):
        bench.main(["--only_modes", "--only_blocks"])
