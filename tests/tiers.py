"""Test tiers, the durations record and the time budget of `make test`.

Every test carries exactly one tier marker (declared with what it costs in
pyproject.toml): `unit`, `integration`, `multiprocess` or `slow`. A module
sets its tier with `pytestmark = pytest.mark.<tier>`; a test (or one of its
parameter sets) that costs more or less than its module carries its own, which
wins. A test with no tier, or with two tiers on the same level, fails
collection with the list of such tests.

Every run writes `.test-durations.json` at the repository root (each test's
seconds, CPU seconds with its subprocesses', outcome and tier; the seconds of
each tier; the session's wall and CPU time)
and prints the seconds per tier. Under `make test` (which sets
SPARSE_EMBED_TEST_BUDGET_S, SPARSE_EMBED_TEST_START and
SPARSE_EMBED_TEST_EXCLUDED_S) the last line is the time of the whole `make
test`, install included and the first Horovod build excluded, against the
budget; past the budget the run fails. Durations are recorded, never asserted:
speed is measured in benchmarks.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections import defaultdict
from pathlib import Path

import pytest

TIERS = ("unit", "integration", "multiprocess", "slow")
DURATIONS_FILE = ".test-durations.json"
BUDGET_ENV = "SPARSE_EMBED_TEST_BUDGET_S"
START_ENV = "SPARSE_EMBED_TEST_START"
EXCLUDED_ENV = "SPARSE_EMBED_TEST_EXCLUDED_S"
UNIT_SECONDS = 2.0  # what the `unit` tier promises (pyproject.toml)
# Rough seconds a test of each tier costs on 2 cores: files run costliest first, so that under
# pytest-xdist (`--dist loadfile --no-loadscope-reorder`, whole files per worker) the longest
# files start at once instead of last (longest-first is near-optimal for the run's wall time).
TIER_SECONDS = {"unit": 0.1, "integration": 6.0, "multiprocess": 30.0, "slow": 40.0}


def minutes(seconds: float) -> str:
    """`MM:SS` (minutes may exceed 59)."""
    seconds = round(seconds)
    return f"{seconds // 60:d}:{seconds % 60:02d}"


def _tier_marks(marks) -> set[str]:
    return {mark.name for mark in marks if mark.name in TIERS}


def resolve_tier(item: pytest.Item) -> tuple[str | None, str | None]:
    """(the item's tier, None) or (None, why it has none).

    The nearest level that names a tier decides: a parameter set, then the
    test function, then its class(es), then its module.
    """
    callspec = getattr(item, "callspec", None)
    param_marks = list(callspec.marks) if callspec is not None else []
    own = [mark for mark in item.own_markers if mark not in param_marks]
    levels = [("parameter set", param_marks), ("test", own)]
    levels += [(type(node).__name__.lower(), node.own_markers) for node in item.iter_parents()
               if node is not item]
    for level, marks in levels:
        names = _tier_marks(marks)
        if len(names) > 1:
            return None, f"{level} marked {' and '.join(sorted(names))}"
        if names:
            return names.pop(), None
    return None, "no tier"


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of every child it has waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class TiersAndBudget:
    """The plugin: tier enforcement at collection, durations and budget at the end."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.worker = hasattr(config, "workerinput")  # a pytest-xdist worker
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.cpu_mark = cpu_seconds()
        self.outcomes: dict[str, str] = {}
        self.tiers: dict[str, str] = {}
        self.started = time.time()
        self.verdict: str | None = None
        self.over = False

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        # Runs before `-m` deselects: each item ends up with exactly its one tier
        # mark, so `-m unit` never selects a test whose own tier overrides its module's.
        problems, parents = [], set()
        for item in items:
            tier, why = resolve_tier(item)
            if tier is None:
                problems.append(f"  {item.nodeid}: {why}")
                continue
            item.own_markers[:] = [m for m in item.own_markers if m.name not in TIERS]
            item.add_marker(tier)
            item.user_properties.append(("tier", tier))
            parents.update(node for node in item.iter_parents() if node is not item)
        if problems:
            shown = "\n".join(problems[:50])
            more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
            raise pytest.UsageError(
                f"{len(problems)} test(s) without exactly one tier marker ({', '.join(TIERS)}; "
                f"see [tool.pytest.ini_options] markers in pyproject.toml). Mark the module "
                f"(`pytestmark = pytest.mark.<tier>`) or the test:\n{shown}{more}")
        for node in parents:
            node.own_markers[:] = [m for m in node.own_markers if m.name not in TIERS]
        cost: dict[Path, float] = defaultdict(float)
        for item in items:
            cost[item.path] += TIER_SECONDS[resolve_tier(item)[0]]
        items.sort(key=lambda item: -cost[item.path])  # stable: a file keeps its own order

    def pytest_runtest_logstart(self) -> None:
        self.cpu_mark = cpu_seconds()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        # The CPU seconds of each phase (setup, call, teardown), its subprocesses included: on 2
        # cores, CPU rather than wall time says what a test costs the whole run. They travel with
        # the report, so under pytest-xdist the controller receives them from the workers.
        outcome = yield
        now = cpu_seconds()
        outcome.get_result().user_properties.append(("cpu_seconds", now - self.cpu_mark))
        self.cpu_mark = now

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[report.nodeid] += report.duration
        for name, value in report.user_properties:
            if name == "tier":
                self.tiers[report.nodeid] = value
            elif name == "cpu_seconds":
                self.cpu[report.nodeid] += value
        if report.when == "call" or report.outcome != "passed":
            if self.outcomes.get(report.nodeid) in (None, "passed"):
                self.outcomes[report.nodeid] = report.outcome

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.worker or not self.seconds:
            return
        now = time.time()
        wall = now - self.started
        per_tier: dict[str, dict[str, float]] = {
            tier: {"tests": 0, "seconds": 0.0} for tier in TIERS}
        for nodeid, seconds in self.seconds.items():
            tier = self.tiers.get(nodeid)
            if tier in per_tier:
                per_tier[tier]["tests"] += 1
                per_tier[tier]["seconds"] += seconds
        record = {
            "wall_seconds": round(wall, 2),
            "cpu_seconds": round(sum(self.cpu.values()), 2),
            "tiers": {tier: {"tests": v["tests"], "seconds": round(v["seconds"], 2)}
                      for tier, v in per_tier.items()},
            "tests": [{"test": nodeid, "tier": self.tiers.get(nodeid),
                       "outcome": self.outcomes.get(nodeid), "seconds": round(seconds, 3),
                       "cpu_seconds": round(self.cpu[nodeid], 3)}
                      for nodeid, seconds in sorted(self.seconds.items(), key=lambda kv: -kv[1])],
        }
        budget = os.environ.get(BUDGET_ENV)
        if budget:
            budget_s = float(budget)
            start = float(os.environ.get(START_ENV) or self.started)
            excluded = float(os.environ.get(EXCLUDED_ENV) or 0)
            counted = now - start - excluded
            setup = self.started - start - excluded
            record["budget"] = {"budget_seconds": budget_s, "counted_seconds": round(counted, 2),
                                "install_seconds": round(setup, 2),
                                "excluded_seconds": round(excluded, 2)}
            note = f"install {minutes(setup)}, tests {minutes(wall)}"
            if excluded:
                note += f"; the first Horovod build, {minutes(excluded)}, not counted"
            self.over = counted > budget_s
            if self.over:
                self.verdict = (f"test time: {minutes(counted)} is OVER the {minutes(budget_s)} "
                                f"budget ({note}); see {DURATIONS_FILE} for the slowest tests")
                if session.exitstatus == 0:
                    session.exitstatus = pytest.ExitCode.TESTS_FAILED
            else:
                self.verdict = f"test time: {minutes(counted)} of the {minutes(budget_s)} budget ({note})"
        else:
            self.verdict = f"test time: {minutes(wall)} (no budget: `make test` sets one)"
        self.record = record
        path = Path(self.config.rootpath) / DURATIONS_FILE
        path.write_text(json.dumps(record, indent=1) + "\n")

    def pytest_terminal_summary(self, terminalreporter) -> None:
        record = getattr(self, "record", None)
        if record is None:
            return
        terminalreporter.write_sep("=", "time per tier")
        for tier, v in record["tiers"].items():
            if v["tests"]:
                terminalreporter.write_line(
                    f"{tier:<13}{v['tests']:>5} tests {minutes(v['seconds']):>7}")
        slow_units = [t for t in record["tests"] if t["tier"] == "unit" and t["seconds"] > UNIT_SECONDS]
        if slow_units:
            # A hint to keep the tiers honest, never a failure.
            terminalreporter.write_line(
                f"{len(slow_units)} unit test(s) took over {UNIT_SECONDS:g} s (a fixture's first "
                f"user pays for it), the slowest: {slow_units[0]['test']} ({slow_units[0]['seconds']:.1f} s)")
        terminalreporter.write_line(f"every test's seconds: {DURATIONS_FILE}")

    @pytest.hookimpl(trylast=True)
    def pytest_unconfigure(self) -> None:
        # After pytest's own last line, so the budget is what `make test` ends on.
        if self.verdict is None:
            return
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None:
            return
        if self.over:
            reporter.write_sep("!", self.verdict, red=True, bold=True)
        else:
            reporter.write_line(self.verdict, bold=True)
