"""Job + pods -> JobStatus, and nodes -> capacity (``kubernetes_status``), on API JSON
shaped as a real API server sends it.  The same mapping is driven through kmock in
``test_runtime.py``."""

from __future__ import annotations

from decimal import Decimal

import pytest

from agent.runtimes.kubernetes_status import job_status, node_capacity, parse_quantity

T0, T1, T2 = "2026-11-24T10:00:00Z", "2026-11-24T10:00:05Z", "2026-11-24T10:01:00Z"


def job(**status) -> dict:
    return {"metadata": {"name": "j"}, "status": status}


def pod(state: dict | None = None, phase: str = "Pending", name: str = "j-a",
        created: str = T0, conditions: list | None = None) -> dict:
    status: dict = {"phase": phase}
    if state is not None:
        status["containerStatuses"] = [{"name": "j", "state": state}]
    if conditions:
        status["conditions"] = conditions
    return {"metadata": {"name": name, "creationTimestamp": created}, "status": status}


def cond(kind: str, reason: str = "", message: str = "") -> dict:
    return {"type": kind, "status": "True", "reason": reason, "message": message,
            "lastTransitionTime": T2}


RUNNING = {"running": {"startedAt": T1}}
CREATING = {"waiting": {"reason": "ContainerCreating"}}


def test_new_job_is_pending_not_started() -> None:
    assert job_status({"metadata": {"name": "j"}}, []).state == "pending"
    assert job_status(job(), []).message == "no pod yet"
    # The Job controller counts the pod active before its container runs.
    status = job_status(job(active=1, startTime=T0), [pod(CREATING)])
    assert (status.state, status.message) == ("pending", "ContainerCreating")


def test_running_once_a_container_runs() -> None:
    status = job_status(job(active=1, ready=1, startTime=T0), [pod(RUNNING, "Running")])
    assert (status.state, status.started_at) == ("running", T1)


def test_all_empty_status_after_the_pod_ended_stays_running_never_unknown() -> None:
    # pman#225: the Job's counters briefly all empty while the pod has finished.
    ended = {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": T1,
                            "finishedAt": T2}}
    assert job_status(job(), [pod(ended, "Succeeded")]).state == "running"
    assert job_status(job(), []).state == "pending"


def test_complete_condition_ends_it_successfully() -> None:
    status = job_status(job(succeeded=1, completionTime=T2, startTime=T0,
                            conditions=[cond("Complete")]), [])
    assert (status.state, status.exit_code, status.finished_at) == ("exited", 0, T2)
    assert status.started_at == T0


def test_failed_with_an_exit_code() -> None:
    ended = {"terminated": {"exitCode": 3, "reason": "Error", "startedAt": T1,
                            "finishedAt": T2}}
    status = job_status(job(failed=1, conditions=[cond("Failed", "BackoffLimitExceeded")]),
                        [pod(ended, "Failed")])
    assert (status.state, status.exit_code, status.oom, status.message) == (
        "exited", 3, False, "exited")
    assert not status.extra.get("failed")


def test_termination_message_is_the_reason() -> None:
    ended = {"terminated": {"exitCode": 2, "reason": "Error",
                            "message": "input dir is empty\n"}}
    status = job_status(job(conditions=[cond("Failed")]), [pod(ended, "Failed")])
    assert status.message == "input dir is empty"


def test_oom_killed_is_reported_as_oom() -> None:
    ended = {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}
    status = job_status(job(failed=1, conditions=[cond("Failed", "BackoffLimitExceeded")]),
                        [pod(ended, "Failed")])
    assert (status.exit_code, status.oom, status.message) == (137, True, "OOMKilled")


@pytest.mark.parametrize(("reason", "words"), [
    ("ImagePullBackOff", "image pull failed: ImagePullBackOff"),
    ("InvalidImageName", "invalid image name: InvalidImageName"),
    ("ErrImageNeverPull", "ErrImageNeverPull"),
])
def test_image_failures_end_it_as_a_start_failure_with_the_reason(reason: str,
                                                                  words: str) -> None:
    state = {"waiting": {"reason": reason, "message": 'Back-off pulling image "x/y:1"'}}
    status = job_status(job(active=1), [pod(state)])
    assert status.state == "exited" and status.extra == {"failed": True}
    assert words in status.message and "x/y:1" in status.message


def test_a_first_image_pull_error_is_retried() -> None:
    state = {"waiting": {"reason": "ErrImagePull", "message": "rpc error: timeout"}}
    status = job_status(job(active=1), [pod(state)])
    assert status.state == "pending" and "ErrImagePull" in status.message


def test_failed_without_any_container_result_is_a_start_failure() -> None:
    status = job_status(job(conditions=[cond("Failed", "DeadlineExceeded",
                                             "Job was active longer than specified deadline")]),
                        [])
    assert status.extra == {"failed": True}
    assert status.message == "DeadlineExceeded: Job was active longer than specified deadline"
    pulling = {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}}
    status = job_status(job(conditions=[cond("Failed", "DeadlineExceeded")]), [pod(pulling)])
    assert status.message.startswith("image pull failed: ImagePullBackOff")


def test_unschedulable_pod_says_why() -> None:
    pending = pod(conditions=[{"type": "PodScheduled", "status": "False",
                               "reason": "Unschedulable",
                               "message": "0/3 nodes are available: 3 Insufficient cpu."}])
    status = job_status(job(active=1), [pending])
    assert status.state == "pending" and "Insufficient cpu" in status.message


def test_suspended_job_is_pending() -> None:
    assert job_status(job(conditions=[cond("Suspended")]), []).state == "pending"


def test_several_workers() -> None:
    assert job_status(job(active=2), [pod(RUNNING, "Running", "j-a"),
                                      pod(CREATING, name="j-b")]).state == "running"
    ended_ok = {"terminated": {"exitCode": 0, "reason": "Completed"}}
    oom = {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}
    status = job_status(job(failed=1, succeeded=1, conditions=[cond("Failed")]),
                        [pod(ended_ok, "Succeeded", "j-a"), pod(oom, "Failed", "j-b", T1)])
    assert status.oom and status.exit_code == 137


@pytest.mark.parametrize(("text", "value"), [
    ("4", Decimal(4)), ("3900m", Decimal("3.9")), ("0.5", Decimal("0.5")),
    ("16Gi", Decimal(16 * 2**30)), ("1024Ki", Decimal(2**20)), ("1e9", Decimal("1e9")),
    ("2G", Decimal(2 * 10**9)), ("128974848", Decimal(128974848)),
])
def test_quantities(text: str, value: Decimal) -> None:
    assert parse_quantity(text) == value


def test_quantity_garbage_is_refused() -> None:
    with pytest.raises(ValueError):
        parse_quantity("lots")


def node(name: str, cpu: str, memory: str, labels: dict | None = None, *, ready: str = "True",
         unschedulable: bool = False, gpus: str | None = None) -> dict:
    allocatable = {"cpu": cpu, "memory": memory}
    if gpus:
        allocatable["nvidia.com/gpu"] = gpus
    return {"metadata": {"name": name, "labels": labels or {}},
            "spec": {"unschedulable": unschedulable},
            "status": {"allocatable": allocatable,
                       "conditions": [{"type": "Ready", "status": ready}]}}


def test_capacity_is_the_allocatable_of_ready_matching_nodes() -> None:
    nodes = [node("a", "3900m", "15Gi", {"pool": "chris"}, gpus="2"),
             node("b", "8", "31Gi", {"pool": "chris"}),
             node("c", "64", "256Gi", {"pool": "other"}),
             node("d", "8", "31Gi", {"pool": "chris"}, ready="False"),
             node("e", "8", "31Gi", {"pool": "chris"}, unschedulable=True)]
    assert node_capacity(nodes, {"pool": "chris"}) == (11900, 46 * 1024, 2, 2)
    assert node_capacity(nodes, {})[3] == 3
    assert node_capacity(nodes, {"pool": "none"}) == (0, 0, 0, 0)
