"""The batch/v1 Job that runs one job attempt on Kubernetes, as a plain dict (no I/O).

``agent.runtimes.kubernetes`` sends what ``build_job`` renders; everything here is
tested without an API server.  The object follows pfcon-api.md §4 (kubernetes):

* one ReadWriteMany PVC (``VOLUME_NAME``) mounted once per ``JobSpec`` mount with a
  ``subPath`` (the mount's storeBase-relative source; the root has none), so one
  claim serves every job, as pfcon's ``kubernetes_pvc`` volume type does;
* ``parallelism = completions = number_of_workers``, ``backoffLimit: 0``,
  ``restartPolicy: Never`` (a failed plugin is never re-run behind CUBE's back), a
  TTL after it finishes, an optional active deadline;
* cpu/memory as requests and limits (requests only with ``IGNORE_LIMITS``),
  ``nvidia.com/gpu`` limits, ``/dev/shm`` as a memory ``emptyDir`` of ``SHM_SIZE``;
* ``runAsUser``/``runAsGroup`` from ``CONTAINER_USER``, no privilege escalation,
  every capability dropped, no service-account token (plugins never call the API).

Names and labels: a Job name must be a lowercase DNS-1123 label (63 characters at
most; the pods' ``job-name`` label repeats it), and pfcon jids allow upper case,
``_``, ``.`` and 128 characters.  ``job_name`` keeps a valid name as it is and maps
any other one to a stable valid one ending in a hash of the original.  Label values
have the same limit, so pfleet's labels hold values made safe the same way, and the
exact originals (name, jid, agent, job id) travel in annotations.
"""

from __future__ import annotations

import hashlib
import posixpath
import random
import re
from dataclasses import dataclass, field
from typing import Any

from agent.protocol import JobSpec
from agent.runtimes.base import LABEL_AGENT, LABEL_ATTEMPT, LABEL_JID, LABEL_JOB, LABEL_JOB_TYPE
from agent.runtimes.docker_config import ContainerUser, parse_container_user

# pfcon's pod label (pfcon-api.md §2.3), kept so existing cluster tooling still matches.
LABEL_PFCON_JOB_TYPE = "chrisproject.org/job-type"
# Exact values that a label cannot always hold.
ANNOTATION_NAME = "org.chrisproject.pfleet.name"
ANNOTATION_JID = "org.chrisproject.pfleet.jid"
ANNOTATION_AGENT = "org.chrisproject.pfleet.agent"
ANNOTATION_JOB = "org.chrisproject.pfleet.job"

STOREBASE_VOLUME = "storebase"
SHM_VOLUME = "dshm"
GPU_RESOURCE = "nvidia.com/gpu"
MAX_NAME = 63  # DNS-1123 label; also the longest label value
DEFAULT_JOB_TTL = 86_400  # seconds a finished Job is kept (pfcon: 24 h)
DEFAULT_ACTIVE_DEADLINE = 604_800  # seconds a Job may run (pfcon: 7 days)

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


@dataclass(frozen=True)
class KubernetesSettings:
    """Configuration of one Kubernetes runtime (pfcon's variable names in comments)."""

    volume_name: str  # VOLUME_NAME: the ReadWriteMany PVC holding the storeBase
    namespace: str = "default"  # JOB_NAMESPACE
    agent_name: str = "local"
    node_selector: dict[str, str] = field(default_factory=dict)  # NODE_SELECTOR
    image_pull_secrets: tuple[str, ...] = ()  # IMAGE_PULL_SECRETS
    job_labels: dict[str, str] = field(default_factory=dict)  # JOB_LABELS
    container_user: str | None = None  # CONTAINER_USER
    ignore_limits: bool = False  # IGNORE_LIMITS: requests only, no cpu/memory limits
    shm_size_mib: int | None = None  # SHM_SIZE
    enable_home_workaround: bool = False  # ENABLE_HOME_WORKAROUND
    job_ttl_seconds: int = DEFAULT_JOB_TTL  # PFLEET_KUBERNETES_JOB_TTL
    active_deadline_seconds: int = DEFAULT_ACTIVE_DEADLINE  # 0: no deadline
    kubeconfig: str | None = None  # KUBECONFIG; unset: in-cluster, else ~/.kube/config
    context: str | None = None  # PFLEET_KUBERNETES_CONTEXT: a kubeconfig context
    max_concurrency: int = 8  # threads for blocking client calls
    request_timeout: float = 30.0  # seconds per API request
    gpus: int = 0  # GPUs to offer when the nodes report none (PFLEET_AGENT_GPUS)

    def validate(self) -> list[str]:
        """Every problem with these settings, as readable sentences ([] when fine)."""
        problems: list[str] = []
        if not self.volume_name or not _DNS_SUBDOMAIN.fullmatch(self.volume_name):
            problems.append(f"VOLUME_NAME must name the storeBase PVC (a DNS-1123 name), "
                            f"not {self.volume_name!r}")
        if not _DNS_LABEL.fullmatch(self.namespace) or len(self.namespace) > MAX_NAME:
            problems.append(f"JOB_NAMESPACE must be a DNS-1123 label, not {self.namespace!r}")
        for what, labels in (("NODE_SELECTOR", self.node_selector),
                             ("JOB_LABELS", self.job_labels)):
            problems += [f"{what}: {p}" for p in label_problems(labels)]
        for secret in self.image_pull_secrets:
            if not _DNS_SUBDOMAIN.fullmatch(secret):
                problems.append(f"IMAGE_PULL_SECRETS: {secret!r} is not a secret name")
        try:
            parse_container_user(self.container_user)
        except ValueError as exc:
            problems.append(str(exc))
        if self.shm_size_mib is not None and self.shm_size_mib <= 0:
            problems.append(f"SHM_SIZE must be a positive number of MiB, not {self.shm_size_mib}")
        if self.job_ttl_seconds < 0 or self.active_deadline_seconds < 0:
            problems.append("the job TTL and active deadline must not be negative")
        if self.max_concurrency < 1:
            problems.append("max_concurrency must be at least 1")
        return problems


def label_problems(labels: dict[str, str]) -> list[str]:
    """Why these keys/values are not valid Kubernetes labels ([] when they are)."""
    problems = []
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        if (not _LABEL_NAME.fullmatch(name) or len(name) > MAX_NAME
                or (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)))):
            problems.append(f"{key!r} is not a valid label key")
        if len(value) > MAX_NAME or not _LABEL_VALUE.fullmatch(value):
            problems.append(f"{key}={value!r}: label values are at most 63 letters, digits, "
                            "'-', '_' or '.', starting and ending with a letter or digit")
    return problems


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def job_name(name: str) -> str:
    """The Kubernetes name of a workload named ``name`` (``<jid>`` or ``<jid>-kind``).

    A lowercase DNS-1123 label of at most 63 characters is kept; anything else becomes
    one: lower case, runs of other characters as ``-``, cut to fit, then ``-`` and a
    hash of the original, so the mapping is stable and two names never share a Job.
    """
    if len(name) <= MAX_NAME and _DNS_LABEL.fullmatch(name):
        return name
    digest = _digest(name)
    base = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    base = base[: MAX_NAME - len(digest) - 1].rstrip("-")
    return f"{base}-{digest}" if base else f"job-{digest}"


def label_value(value: str) -> str:
    """``value`` when it is a valid label value, else a stable valid stand-in."""
    if len(value) <= MAX_NAME and _LABEL_VALUE.fullmatch(value):
        return value
    digest = _digest(value)
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", value)
    base = re.sub(r"^[^A-Za-z0-9]+", "", base)[: MAX_NAME - len(digest) - 1]
    base = re.sub(r"[^A-Za-z0-9]+$", "", base)
    return f"{base}-{digest}" if base else digest


def pfleet_labels(spec: JobSpec, agent_name: str) -> dict[str, str]:
    """The labels pfleet puts on the Job and its pods (selectors use them)."""
    return {
        LABEL_JOB: label_value(spec.job),
        LABEL_ATTEMPT: str(spec.attempt),
        LABEL_AGENT: label_value(agent_name),
        LABEL_JID: label_value(spec.jid),
        LABEL_JOB_TYPE: label_value(spec.kind),
        LABEL_PFCON_JOB_TYPE: label_value(spec.kind),
    }


def storebase_subpath(source: str) -> str:
    """A mount source as a PVC subPath ("" is the storeBase root).  ``ValueError`` when
    it leaves the storeBase."""
    path = posixpath.normpath(source.strip("/")) if source.strip("/") else ""
    if path == ".":
        path = ""
    if path == ".." or path.startswith("../"):
        raise ValueError(f"mount source {source!r} is outside the storeBase")
    return path


def environment(spec: JobSpec, settings: KubernetesSettings) -> list[dict[str, str]]:
    """The job's ``KEY=value`` list as container env (HOME=/tmp once with the workaround)."""
    env = []
    for item in spec.env:
        key, _, value = item.partition("=")
        env.append({"name": key, "value": value})
    if settings.enable_home_workaround and not any(e["name"] == "HOME" for e in env):
        env.append({"name": "HOME", "value": "/tmp"})
    return env


def _resources(spec: JobSpec, settings: KubernetesSettings) -> dict[str, Any]:
    requests: dict[str, str] = {}
    if spec.cpu_limit > 0:
        requests["cpu"] = f"{spec.cpu_limit}m"
    if spec.memory_limit > 0:
        requests["memory"] = f"{spec.memory_limit}Mi"
    limits = {} if settings.ignore_limits else dict(requests)
    if spec.gpu_limit > 0:  # extended resources: the request follows the limit
        limits[GPU_RESOURCE] = str(spec.gpu_limit)
    resources: dict[str, Any] = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    return resources


def build_job(spec: JobSpec, settings: KubernetesSettings, *,
              user: ContainerUser | None = None,
              rng: random.Random | None = None) -> dict[str, Any]:
    """The batch/v1 Job object running ``spec``.  ``user`` is the parsed
    CONTAINER_USER (a range yields a random id per job).  Raises ``ValueError`` for a
    mount outside the storeBase or one mounting its root read-write."""
    name = job_name(spec.name)
    labels = {**settings.job_labels, **pfleet_labels(spec, settings.agent_name)}
    mounts: list[dict[str, Any]] = []
    for mount in spec.mounts:
        sub = storebase_subpath(mount.source)
        if not sub and not mount.read_only:
            raise ValueError(f"refusing to mount the storeBase root read-write at "
                             f"{mount.target}")
        entry: dict[str, Any] = {"name": STOREBASE_VOLUME, "mountPath": mount.target,
                                 "readOnly": mount.read_only}
        if sub:
            entry["subPath"] = sub
        mounts.append(entry)
    volumes: list[dict[str, Any]] = []
    if mounts:
        volumes.append({"name": STOREBASE_VOLUME,
                        "persistentVolumeClaim": {"claimName": settings.volume_name}})
    if settings.shm_size_mib:
        volumes.append({"name": SHM_VOLUME, "emptyDir": {
            "medium": "Memory", "sizeLimit": f"{settings.shm_size_mib}Mi"}})
        mounts.append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
    security: dict[str, Any] = {"allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]}}
    if user is not None:
        uid, gid = user.pick(rng or random.SystemRandom())
        if uid is not None:
            security["runAsUser"] = int(uid)
        if gid is not None:
            security["runAsGroup"] = int(gid)
    container: dict[str, Any] = {"name": name, "image": spec.image,
                                 "command": list(spec.command),
                                 "env": environment(spec, settings),
                                 "resources": _resources(spec, settings),
                                 "volumeMounts": mounts, "securityContext": security}
    pod: dict[str, Any] = {"restartPolicy": "Never", "automountServiceAccountToken": False,
                           "containers": [container], "volumes": volumes}
    if settings.node_selector:
        pod["nodeSelector"] = dict(settings.node_selector)
    if settings.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in settings.image_pull_secrets]
    job_spec: dict[str, Any] = {
        "backoffLimit": 0,
        "parallelism": spec.number_of_workers,
        "completions": spec.number_of_workers,
        "ttlSecondsAfterFinished": settings.job_ttl_seconds,
        "template": {"metadata": {"labels": dict(labels)}, "spec": pod},
    }
    if settings.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = settings.active_deadline_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": settings.namespace,
            "labels": labels,
            "annotations": {ANNOTATION_NAME: spec.name, ANNOTATION_JID: spec.jid,
                            ANNOTATION_AGENT: settings.agent_name, ANNOTATION_JOB: spec.job},
        },
        "spec": job_spec,
    }


def selector(labels: dict[str, str]) -> str:
    """A label selector matching every one of ``labels`` (``k=v,k2=v2``)."""
    return ",".join(f"{k}={v}" for k, v in labels.items())
