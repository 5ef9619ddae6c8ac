"""The running jobs' log-tail cache forgets tails nobody refreshes any more.

A tail is cached when a client reads a running job's status; it is dropped when the
agent reports the job finished, but a job can also end without such an event (its
agent's lease ran out, it was deleted): the watchdog's sweep must drop those too, or
the controller's memory grows with every such job.
"""

from __future__ import annotations

import time
from pathlib import Path

from controller.fleet import LOGS_CACHE_FORGET, Fleet, _CachedLogs
from controller.store import Store
from tests.conftest import make_config


def test_tails_not_refreshed_for_a_while_are_forgotten(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    fleet = Fleet(config, Store(tmp_path / "state.db"))
    now = time.monotonic()
    fleet._logs["lost-job"] = _CachedLogs(1, now - LOGS_CACHE_FORGET - 1, "old tail")
    fleet._logs["watched-job"] = _CachedLogs(2, now - 1, "fresh tail")

    assert fleet.forget_stale_logs(now) == 1

    assert list(fleet._logs) == ["watched-job"]
    assert fleet.forget_stale_logs(now + LOGS_CACHE_FORGET + 2) == 1
    assert fleet._logs == {}
