"""The exact batch/v1 Job pfleet creates, for every storage mode and every option
(``kubernetes_manifest.build_job``; no server needed).  The mounts come from the
controller's own storage code, so these are the objects a real agent sends."""

from __future__ import annotations

import random
import re

import pytest

from agent.protocol import JobSpec, Mount
from agent.runtimes.docker_config import parse_container_user
from agent.runtimes.kubernetes_manifest import (
    KubernetesSettings,
    build_job,
    job_name,
    label_problems,
    label_value,
    storebase_subpath,
)
from controller.storage import modes, zipmode

AGENT = "k8s-agent"
JOB_ID = "0123456789abcdef0123456789abcdef"


def spec(jid: str = "chris-jid-7", mounts: list[Mount] | None = None, **fields) -> JobSpec:
    fields.setdefault("env", ["CHRIS_JID=chris-jid-7", "A=b=c"])
    return JobSpec(job=JOB_ID, attempt=2, name=fields.pop("name", jid), jid=jid, kind="plugin",
                   image="fnndsc/pl-simpledsapp:2.1", command=["simpledsapp", "/share/incoming",
                                                             "/share/outgoing"],
                   cpu_limit=1500, memory_limit=300,
                   mounts=mounts if mounts is not None else zipmode.plugin_mounts(jid),
                   **fields)


def settings(**overrides) -> KubernetesSettings:
    return KubernetesSettings(**{"volume_name": "storebase-pvc", "namespace": "chris",
                                 "agent_name": AGENT, **overrides})


LABELS = {"org.chrisproject.pfleet.job": JOB_ID, "org.chrisproject.pfleet.attempt": "2",
          "org.chrisproject.pfleet.agent": AGENT, "org.chrisproject.pfleet.jid": "chris-jid-7",
          "org.chrisproject.job_type": "plugin", "chrisproject.org/job-type": "plugin"}
SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def expected_job(volume_mounts: list[dict]) -> dict:
    """The whole object for spec() with settings(): every key, nothing more."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": "chris-jid-7", "namespace": "chris", "labels": LABELS,
            "annotations": {"org.chrisproject.pfleet.name": "chris-jid-7",
                            "org.chrisproject.pfleet.jid": "chris-jid-7",
                            "org.chrisproject.pfleet.agent": AGENT,
                            "org.chrisproject.pfleet.job": JOB_ID},
        },
        "spec": {
            "backoffLimit": 0, "parallelism": 1, "completions": 1,
            "ttlSecondsAfterFinished": 86400, "activeDeadlineSeconds": 604800,
            "template": {
                "metadata": {"labels": LABELS},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "containers": [{
                        "name": "chris-jid-7",
                        "image": "fnndsc/pl-simpledsapp:2.1",
                        "command": ["simpledsapp", "/share/incoming", "/share/outgoing"],
                        "env": [{"name": "CHRIS_JID", "value": "chris-jid-7"},
                                {"name": "A", "value": "b=c"}],
                        "resources": {"requests": {"cpu": "1500m", "memory": "300Mi"},
                                      "limits": {"cpu": "1500m", "memory": "300Mi"}},
                        "volumeMounts": volume_mounts,
                        "securityContext": SECURITY,
                    }],
                    "volumes": [{"name": "storebase",
                                 "persistentVolumeClaim": {"claimName": "storebase-pvc"}}],
                },
            },
        },
    }


def pvc_mount(path: str, sub: str, read_only: bool) -> dict:
    return {"name": "storebase", "mountPath": path, "readOnly": read_only, "subPath": sub}


@pytest.mark.parametrize(("storage", "mounts"), [
    ("zipfile", zipmode.plugin_mounts("chris-jid-7")),
    ("swift", modes.plugin_mounts("swift", "chris-jid-7", None, None)),
    ("fslink", modes.plugin_mounts("fslink", "chris-jid-7", None,
                                   "home/alice/feeds/feed_4/pl-app_9/data")),
    ("filesystem", modes.plugin_mounts("filesystem", "chris-jid-7",
                                       "home/alice/uploads/scans",
                                       "home/alice/feeds/feed_4/pl-app_9/data")),
])
def test_the_whole_job_object_for_each_storage_mode(storage: str, mounts: list[Mount]) -> None:
    incoming, outgoing = {
        "zipfile": ("key-chris-jid-7/incoming", "key-chris-jid-7/outgoing"),
        "swift": ("key-chris-jid-7/incoming", "key-chris-jid-7/outgoing"),
        "fslink": ("key-chris-jid-7/incoming", "home/alice/feeds/feed_4/pl-app_9/data"),
        "filesystem": ("home/alice/uploads/scans", "home/alice/feeds/feed_4/pl-app_9/data"),
    }[storage]
    job = build_job(spec(mounts=mounts), settings())
    assert job == expected_job([pvc_mount("/share/incoming", incoming, True),
                                pvc_mount("/share/outgoing", outgoing, False)])


def test_every_option_lands_where_kubernetes_reads_it() -> None:
    s = settings(node_selector={"chris/gpu": "yes", "zone": "a"},
                 image_pull_secrets=("regcred", "other"), job_labels={"team": "imaging"},
                 container_user="1001:1002", shm_size_mib=512, enable_home_workaround=True,
                 job_ttl_seconds=600, active_deadline_seconds=0)
    job = build_job(spec(gpu_limit=2, number_of_workers=3), s,
                    user=parse_container_user(s.container_user))
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert job["spec"]["parallelism"] == job["spec"]["completions"] == 3
    assert job["spec"]["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    assert job["spec"]["ttlSecondsAfterFinished"] == 600
    assert "activeDeadlineSeconds" not in job["spec"]
    assert pod["nodeSelector"] == {"chris/gpu": "yes", "zone": "a"}
    assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "other"}]
    assert job["metadata"]["labels"] == {"team": "imaging", **LABELS}
    assert job["spec"]["template"]["metadata"]["labels"] == {"team": "imaging", **LABELS}
    assert container["resources"] == {
        "requests": {"cpu": "1500m", "memory": "300Mi"},
        "limits": {"cpu": "1500m", "memory": "300Mi", "nvidia.com/gpu": "2"}}
    assert container["securityContext"] == {**SECURITY, "runAsUser": 1001, "runAsGroup": 1002}
    assert {"name": "HOME", "value": "/tmp"} in container["env"]
    assert pod["volumes"][1] == {"name": "dshm", "emptyDir": {"medium": "Memory",
                                                              "sizeLimit": "512Mi"}}
    assert container["volumeMounts"][-1] == {"name": "dshm", "mountPath": "/dev/shm"}


def test_ignore_limits_keeps_requests_and_gpus() -> None:
    job = build_job(spec(gpu_limit=1), settings(ignore_limits=True))
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "1500m", "memory": "300Mi"}, "limits": {"nvidia.com/gpu": "1"}}


def test_home_workaround_never_overrides_or_repeats_home() -> None:
    job = build_job(spec(env=["HOME=/data"]), settings(enable_home_workaround=True))
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert env == [{"name": "HOME", "value": "/data"}]


def test_container_user_sides_and_ranges() -> None:
    rng = random.Random(4)
    for text, keys in (("1234:", {"runAsUser"}), (":5678", {"runAsGroup"}),
                       ("2000-2999:3000", {"runAsUser", "runAsGroup"})):
        job = build_job(spec(), settings(container_user=text),
                        user=parse_container_user(text), rng=rng)
        security = job["spec"]["template"]["spec"]["containers"][0]["securityContext"]
        assert set(security) - set(SECURITY) == keys
    assert 2000 <= security["runAsUser"] <= 2999 and security["runAsGroup"] == 3000


def test_storebase_root_only_read_only_and_never_outside() -> None:
    root_ro = build_job(spec(mounts=[Mount("", "/share/incoming", True),
                                     Mount("key-x", "/share/outgoing", False)]), settings())
    mounts = root_ro["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert mounts[0] == {"name": "storebase", "mountPath": "/share/incoming", "readOnly": True}
    with pytest.raises(ValueError, match="root read-write"):
        build_job(spec(mounts=[Mount("/", "/share/outgoing", False)]), settings())
    with pytest.raises(ValueError, match="outside the storeBase"):
        build_job(spec(mounts=[Mount("a/../../etc", "/share/incoming", True)]), settings())
    assert storebase_subpath("/home/a/./b/") == "home/a/b"


@pytest.mark.parametrize("name", [
    "chris-jid-7", "Chris_JID.7", "UPPER", "a" * 63, "a" * 64, "x" * 128, "_-.", "9-copy",
    "chris-jid-7-", "jid.with.dots-upload",
])
def test_job_names_are_valid_stable_and_distinct(name: str) -> None:
    mapped = job_name(name)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", mapped) and len(mapped) <= 63
    assert job_name(name) == mapped
    if re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63:
        assert mapped == name  # a valid name is kept as it is
    else:
        assert mapped != name and mapped != job_name(name + "x")


def test_names_that_differ_only_in_case_or_punctuation_get_different_jobs() -> None:
    names = {job_name(n) for n in ("jid_1", "jid.1", "JID-1", "jid-1")}
    assert len(names) == 4


def test_long_or_odd_ids_keep_exact_values_in_annotations() -> None:
    jid = "Chris_" + "j" * 100 + "."
    job = build_job(spec(jid=jid), settings(agent_name="agent-"))
    meta = job["metadata"]
    assert meta["annotations"]["org.chrisproject.pfleet.jid"] == jid
    assert meta["annotations"]["org.chrisproject.pfleet.name"] == jid
    assert meta["annotations"]["org.chrisproject.pfleet.agent"] == "agent-"
    assert not label_problems(meta["labels"])
    assert meta["labels"]["org.chrisproject.pfleet.agent"] == label_value("agent-") != "agent-"


def test_bad_settings_are_named() -> None:
    problems = KubernetesSettings(volume_name="", namespace="Bad_NS",
                                  node_selector={"k": "v v"}, job_labels={"-x": "1"},
                                  image_pull_secrets=("Bad Secret",),
                                  container_user="x:y", shm_size_mib=0).validate()
    text = "\n".join(problems)
    for what in ("VOLUME_NAME", "JOB_NAMESPACE", "NODE_SELECTOR", "JOB_LABELS",
                 "IMAGE_PULL_SECRETS", "CONTAINER_USER", "SHM_SIZE"):
        assert what in text
    assert settings().validate() == []
