"""The test tiers and the time budget (tests/tiers.py), on small suites run by pytester."""

from __future__ import annotations

import json

import pytest
from tiers import BUDGET_ENV, EXCLUDED_ENV, START_ENV, TIERS

pytestmark = pytest.mark.unit

pytest_plugins = ("pytester",)

CONFTEST = """
from tiers import TiersAndBudget

def pytest_configure(config):
    config.pluginmanager.register(TiersAndBudget(config), "sparse_embed_tiers")
"""


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester directory with the tiers plugin and markers; no budget from an outer `make test`."""
    for name in (BUDGET_ENV, START_ENV, EXCLUDED_ENV):
        monkeypatch.delenv(name, raising=False)
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nmarkers =\n" + "".join(f"    {tier}: {tier}\n" for tier in TIERS))
    return pytester


def test_a_test_without_a_tier_fails_collection_by_name(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_a="""
        import pytest

        def test_untiered():
            pass

        @pytest.mark.unit
        def test_tiered():
            pass
    """)
    result = suite.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*1 test(s) without exactly one tier marker*",
                                 "*test_a.py::test_untiered: no tier"])


def test_two_tiers_on_one_level_fail_collection(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_b="""
        import pytest

        @pytest.mark.unit
        @pytest.mark.integration
        def test_both():
            pass
    """)
    result = suite.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_b.py::test_both: test marked integration and unit"])


def test_the_nearest_tier_wins_and_selects_alone(suite: pytest.Pytester) -> None:
    """A module of unit tests with one integration test and one slow parameter set: `-m` sees
    each test's own tier only, never its module's as well."""
    suite.makepyfile(test_c="""
        import pytest

        pytestmark = pytest.mark.unit

        def test_plain():
            pass

        @pytest.mark.integration
        def test_costly():
            pass

        @pytest.mark.parametrize("n", [1, pytest.param(2, marks=pytest.mark.slow)])
        def test_param(n):
            pass

        class TestGroup:
            pytestmark = pytest.mark.multiprocess

            def test_in_class(self):
                pass
    """)
    selected = {}
    for tier in TIERS:
        result = suite.runpytest("-m", tier, "--collect-only", "-q")
        selected[tier] = sorted(line.split("::", 1)[1] for line in result.outlines if "::" in line)
    assert selected == {"unit": ["test_param[1]", "test_plain"], "integration": ["test_costly"],
                        "multiprocess": ["TestGroup::test_in_class"], "slow": ["test_param[2]"]}
    result = suite.runpytest("-m", "not slow and not multiprocess", "--collect-only", "-q")
    assert sum("::" in line for line in result.outlines) == 3


def test_durations_are_recorded_per_test_and_tier(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_d="""
        import pytest

        pytestmark = pytest.mark.unit

        def test_one():
            pass

        @pytest.mark.integration
        def test_two():
            assert False
    """)
    result = suite.runpytest()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    record = json.loads((suite.path / ".test-durations.json").read_text())
    tests = {t["test"]: t for t in record["tests"]}
    assert tests["test_d.py::test_one"]["tier"] == "unit"
    assert (tests["test_d.py::test_two"]["tier"], tests["test_d.py::test_two"]["outcome"]) == \
        ("integration", "failed")
    assert record["tiers"]["unit"]["tests"] == record["tiers"]["integration"]["tests"] == 1
    assert record["wall_seconds"] >= 0 and "budget" not in record
    result.stdout.fnmatch_lines(["*time per tier*", "unit*1 tests*", "integration*1 tests*"])
    assert "no budget" in result.outlines[-1]


def test_cpu_seconds_count_the_subprocesses_a_test_waits_for(suite: pytest.Pytester) -> None:
    """A test whose child burns about a second of CPU is charged with it; an idle test is not."""
    suite.makepyfile(test_f="""
        import subprocess, sys, time

        import pytest

        pytestmark = pytest.mark.unit

        def test_busy_child():
            burn = "import time\\nt = time.process_time()\\nwhile time.process_time() - t < 1.0: pass"
            subprocess.run([sys.executable, "-c", burn], check=True)

        def test_idle():
            time.sleep(0.5)
    """)
    assert suite.runpytest().ret == pytest.ExitCode.OK
    record = json.loads((suite.path / ".test-durations.json").read_text())
    cpu = {t["test"]: t["cpu_seconds"] for t in record["tests"]}
    assert cpu["test_f.py::test_busy_child"] >= 1.0
    assert cpu["test_f.py::test_idle"] < 0.3
    assert record["cpu_seconds"] >= cpu["test_f.py::test_busy_child"]


def test_the_budget_is_the_last_line_and_fails_the_run_past_it(
        suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """The clock of `make test` started before the install; the Horovod build is left out."""
    import time

    suite.makepyfile(test_e="""
        import pytest

        pytestmark = pytest.mark.unit

        def test_one():
            pass
    """)
    monkeypatch.setenv(BUDGET_ENV, "1500")
    monkeypatch.setenv(START_ENV, str(int(time.time()) - 700))
    monkeypatch.setenv(EXCLUDED_ENV, "400")
    result = suite.runpytest()
    assert result.ret == pytest.ExitCode.OK
    assert result.outlines[-1].startswith("test time: 5:0")
    assert "of the 25:00 budget" in result.outlines[-1]
    assert "the first Horovod build, 6:40, not counted" in result.outlines[-1]
    budget = json.loads((suite.path / ".test-durations.json").read_text())["budget"]
    assert budget["budget_seconds"] == 1500 and budget["excluded_seconds"] == 400
    assert 295 <= budget["install_seconds"] <= budget["counted_seconds"] < 360

    monkeypatch.setenv(BUDGET_ENV, "240")
    result = suite.runpytest()
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert "is OVER the 4:00 budget" in result.outlines[-1]
