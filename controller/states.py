"""Job states: the internal vocabulary (GA4GH TES) and its mapping to pfcon's five.

The controller reasons in TES states; clients only ever see pfcon's status
strings, produced by ``pfcon_status`` at the API edge.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    QUEUED = "QUEUED"
    """Accepted and recorded; waiting for an agent with room for it."""
    ASSIGNED = "ASSIGNED"
    """Sent to an agent, which has not yet reported the workload running."""
    RUNNING = "RUNNING"
    """The agent reported the workload running."""
    COMPLETE = "COMPLETE"
    """Ended with exit code 0."""
    EXECUTOR_ERROR = "EXECUTOR_ERROR"
    """Ended by itself with a non-zero exit code, or was OOM-killed."""
    SYSTEM_ERROR = "SYSTEM_ERROR"
    """Could not be started: bad image, missing GPU, runtime refused it."""
    CANCELED = "CANCELED"
    """Removed by a client before it ended."""
    LOST = "LOST"
    """Believed active, but its agent or workload vanished; the outcome is unknown."""


TERMINAL: frozenset[State] = frozenset(
    {State.COMPLETE, State.EXECUTOR_ERROR, State.SYSTEM_ERROR, State.CANCELED, State.LOST})
ACTIVE: frozenset[State] = frozenset({State.QUEUED, State.ASSIGNED, State.RUNNING})

_PFCON_STATUS: dict[State, str] = {
    State.QUEUED: "notStarted",
    State.ASSIGNED: "notStarted",
    State.RUNNING: "started",
    State.COMPLETE: "finishedSuccessfully",
    State.EXECUTOR_ERROR: "finishedWithError",
    State.SYSTEM_ERROR: "finishedWithError",
    State.CANCELED: "finishedWithError",
    State.LOST: "undefined",
}

# A re-POST of a job in one of these pfcon states starts a new attempt (pfcon removes
# the failed container and creates a new one); any other state returns the job as is.
RERUN_STATUSES = frozenset({"finishedWithError", "undefined"})


def pfcon_status(state: State | str) -> str:
    """pfcon's status string for an internal state."""
    return _PFCON_STATUS[State(state)]
