"""Benchmarks run on demand only: ``make bench`` (``pytest tests/bench -m bench -s``).

Every item here is marked ``bench``; unless the ``-m`` expression names ``bench``
they are deselected, so ``make test`` (``pytest tests``) never runs them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.bench import helpers
from tests.bench.helpers import BenchDeployment
from tests.support.engines import Engine

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_JSON = Path(
    os.environ.get("PFLEET_BENCH_JSON", REPO_ROOT / ".pfleet" / "bench" / "last-run.json")
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "bench" in (config.getoption("markexpr") or ""):
        return
    skipped = [item for item in items if item.get_closest_marker("bench") is not None]
    if skipped:
        config.hook.pytest_deselected(items=skipped)
        items[:] = [item for item in items if item.get_closest_marker("bench") is None]


def pytest_sessionstart(session: pytest.Session) -> None:
    helpers.OTHERS_AT_START[:] = helpers.other_activity()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not helpers.REPORTS:
        return
    terminalreporter.section("pfleet benchmarks")
    for report in helpers.REPORTS:
        terminalreporter.write_line(report.render())
        terminalreporter.write_line("")
    try:
        helpers.write_json(RESULTS_JSON)
        terminalreporter.write_line(f"figures written to {RESULTS_JSON}")
    except OSError as exc:
        terminalreporter.write_line(f"could not write {RESULTS_JSON}: {exc}")


@pytest.fixture(scope="session")
def bench_engine(request: pytest.FixtureRequest) -> Engine:
    """The session's private dockerd (``start_docker_engine()`` behind the
    ``docker_engine`` fixture of ``tests.support.engines``), shared with any other
    docker test of the same session: two engines of one session would clash."""
    return request.getfixturevalue("docker_engine")


@pytest.fixture(scope="module")
def bench_deployment(
    bench_engine: Engine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., BenchDeployment]]:
    """Factory of controllers (embedded local agent) for one benchmark module; each is
    stopped by PID when the module ends."""
    made: list[BenchDeployment] = []

    def make(extra_env: dict[str, str] | None = None) -> BenchDeployment:
        helpers.OTHERS_AT_START.extend(helpers.other_activity())
        workdir = tmp_path_factory.mktemp("bench-deploy")
        deployment = BenchDeployment(workdir, bench_engine, extra_env)
        made.append(deployment)
        return deployment

    yield make
    for deployment in made:
        deployment.stop()
