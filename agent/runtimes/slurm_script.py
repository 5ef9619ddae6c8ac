"""The batch script of one job attempt, and the launcher command inside it (no I/O).

One script per attempt, submitted as it is with ``sbatch --parsable SCRIPT``: every
option is an ``#SBATCH`` line, so what the agent submits can be read, and re-run by
hand, from its work directory.  Files of one attempt share the base
``<work_dir>/<name>.<attempt>``:

* ``.sh``      the batch script
* ``.out``     its output (stdout and stderr of the plugin, and of SLURM); logs are its tail
* ``.result``  one line per worker the script writes when its launcher returned:
               ``task=0 exit=3 oom=false``; tells OOM apart for container engines
               (whose cgroups SLURM does not see) and keeps the exit code once SLURM
               has forgotten the job
* ``.jobid``   the SLURM job id, written by the agent right after ``sbatch``

Resources (see https://slurm.schedmd.com/sbatch.html):

* ``cpu_limit`` (millicores) -> ``--cpus-per-task`` rounded up; container launchers
  also get the exact ``--cpus``
* ``memory_limit`` (MiB) -> ``--mem`` (per node); container launchers also get
  ``--memory`` with no swap, since the engine's cgroup is not SLURM's
* ``gpu_limit`` -> ``--gres=gpu:N`` (per node); ``--gpus=N`` for docker, ``--nv``
  for apptainer
* ``number_of_workers`` N -> ``--nodes=N --ntasks-per-node=1``: N copies of the
  plugin, one per node, started by ``srun``; each has the full cpu/memory/GPU
  request, like the N pods of pfcon's Kubernetes Job.  N = 1 runs without ``srun``.
* ``--no-requeue``: a node failure or preemption ends the attempt with that reason
  instead of running the plugin a second time.
"""

from __future__ import annotations

import hashlib
import math
import posixpath
import random
import shlex
from dataclasses import dataclass
from urllib.parse import quote, unquote

from agent.protocol import JobSpec
from agent.runtimes.slurm_config import SlurmSettings

COMMENT_PREFIX = "pfleet"
STOP_GRACE_SECONDS = 10  # docker/podman stop -t when SLURM signals the job (KillWait is 30 s)
IMAGE_LINE = "# image: "  # names the job's image in the script (read back to explain failures)


@dataclass(frozen=True)
class JobFiles:
    """The files of one attempt in the work directory."""

    base: str

    @property
    def script(self) -> str:
        return self.base + ".sh"

    @property
    def output(self) -> str:
        return self.base + ".out"

    @property
    def result(self) -> str:
        return self.base + ".result"

    @property
    def jobid(self) -> str:
        return self.base + ".jobid"

    def all(self) -> list[str]:
        return [self.script, self.output, self.result, self.jobid]


def job_files(work_dir: str, name: str, attempt: int) -> JobFiles:
    return JobFiles(posixpath.join(work_dir, f"{name}.{attempt}"))


# ------------------------------------------------------------------- identity


def job_comment(spec: JobSpec, agent_name: str) -> str:
    """``--comment`` naming the agent, job and attempt (values %-encoded), so the agent
    finds its jobs again after a restart."""
    fields = {"agent": agent_name, "job": spec.job, "attempt": str(spec.attempt),
              "kind": spec.kind, "jid": spec.jid}
    return ";".join([COMMENT_PREFIX, *(f"{k}={quote(v, safe='')}" for k, v in fields.items())])


def parse_comment(text: str) -> dict[str, str] | None:
    """The fields of a pfleet ``--comment``, or None for anybody else's job."""
    parts = text.strip().split(";")
    if not parts or parts[0] != COMMENT_PREFIX:
        return None
    fields = {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if sep:
            fields[key] = unquote(value)
    if not fields.get("agent") or not fields.get("job") or not fields.get("attempt", "").isdigit():
        return None
    return fields


# -------------------------------------------------------------------- options


def cpus_per_task(cpu_limit: int) -> int:
    """Millicores -> whole CPUs, rounded up (at least 1)."""
    return max(1, math.ceil(cpu_limit / 1000))


def sbatch_options(spec: JobSpec, settings: SlurmSettings, files: JobFiles) -> list[str]:
    """The ``#SBATCH`` options of one attempt."""
    placement = settings.placement(spec.image)
    options = [
        f"--job-name={spec.name}",
        f"--comment={job_comment(spec, settings.agent_name)}",
        f"--output={files.output.replace('%', '%%')}",  # % starts a filename pattern
        "--open-mode=append",
        f"--chdir={settings.work_dir}",
        "--no-requeue",
        f"--nodes={spec.number_of_workers}",
        "--ntasks-per-node=1",
    ]
    if not settings.ignore_limits:
        options += [f"--cpus-per-task={cpus_per_task(spec.cpu_limit)}",
                    f"--mem={max(1, spec.memory_limit)}M"]
    if spec.gpu_limit > 0:
        options.append(f"--gres=gpu:{spec.gpu_limit}")
    if placement.partition:
        options.append(f"--partition={placement.partition}")
    if placement.account:
        options.append(f"--account={placement.account}")
    if placement.qos:
        options.append(f"--qos={placement.qos}")
    if placement.timelimit_minutes:
        options.append(f"--time={placement.timelimit_minutes}")
    return options


# ------------------------------------------------------------------- launchers


class Raw(str):
    """A shell word inserted as it is (a variable reference), not quoted."""


def _words(argv: list[str]) -> str:
    return " ".join(w if isinstance(w, Raw) else shlex.quote(w) for w in argv)


def image_path(image_dir: str | None, image: str) -> str:
    """A directory (or SIF) image for charliecloud/apptainer: an absolute ``image`` as it
    is, else its name in ``image_dir`` spelled as Charliecloud's storage does
    (``/`` -> ``%``, ``:`` -> ``+``: ``localhost/x/busybox:1`` -> ``localhost%x%busybox+1``)."""
    if image.startswith("/"):
        return image
    return posixpath.join(image_dir or "", image.replace("/", "%").replace(":", "+"))


def storebase_source(storebase: str, source: str) -> str:
    """The compute-node path of a storeBase sub-path; ``ValueError`` if it escapes."""
    root = posixpath.normpath(storebase)
    path = posixpath.normpath(posixpath.join(root, source.lstrip("/"))) if source else root
    if path != root and not path.startswith(root.rstrip("/") + "/"):
        raise ValueError(f"mount source {source!r} is outside the storeBase")
    return path


def job_env(spec: JobSpec, settings: SlurmSettings) -> list[str]:
    """The job's env, plus HOME=/tmp once when the workaround is on and env has no HOME."""
    env = [e for e in spec.env if "=" in e]
    if settings.enable_home_workaround and not any(e.startswith("HOME=") for e in env):
        env.append("HOME=/tmp")
    return env


def _binds(spec: JobSpec, settings: SlurmSettings) -> list[tuple[str, str, bool]]:
    return [(storebase_source(settings.storebase, m.source), m.target, m.read_only)
            for m in spec.mounts]


def engine_argv(spec: JobSpec, settings: SlurmSettings, container: Raw,
                rng: random.Random | None = None) -> list[str]:
    """``docker run`` / ``podman run`` of the plugin (attached: its output goes to the
    job's output file)."""
    engine = settings.launcher
    argv = [engine]
    if settings.docker_host:
        argv += ["-H" if engine == "docker" else "--url", settings.docker_host]
    argv += ["run", "--name", container]
    labels = {**settings.job_labels, "org.chrisproject.job_type": spec.kind,
              "org.chrisproject.pfleet.job": spec.job,
              "org.chrisproject.pfleet.attempt": str(spec.attempt),
              "org.chrisproject.pfleet.agent": settings.agent_name,
              "org.chrisproject.pfleet.jid": spec.jid}
    for key, value in labels.items():
        argv += ["--label", f"{key}={value}"]
    for source, target, read_only in _binds(spec, settings):
        argv += ["--mount", f"type=bind,source={source},target={target}"
                 + (",readonly" if read_only else "")]
    if not settings.ignore_limits:
        memory = f"{max(1, spec.memory_limit)}m"
        argv += [f"--memory={memory}", f"--memory-swap={memory}",
                 f"--cpus={spec.cpu_limit / 1000:g}"]
    if spec.gpu_limit > 0 and engine == "docker":
        argv.append(f"--gpus={spec.gpu_limit}")
    if settings.shm_size_mib:
        argv.append(f"--shm-size={int(settings.shm_size_mib * 1.048576)}m")
    if settings.container_user:
        from agent.runtimes.docker_config import parse_container_user

        user = parse_container_user(settings.container_user)
        if user is not None:
            uid, gid = user.pick(rng or random.SystemRandom())
            if uid is not None:
                argv += ["--user", uid]
            if gid is not None:
                argv += ["--group-add", gid]
    for entry in job_env(spec, settings):
        argv += ["-e", entry]
    return [*argv, spec.image, *spec.command]


def charliecloud_argv(spec: JobSpec, settings: SlurmSettings) -> list[str]:
    """``ch-run`` of a directory image.  ``$pfleet_image_env`` is ``--set-env`` when the
    image carries ``/ch/environment`` (its ENV, written by ``ch-convert``)."""
    argv = ["ch-run"]
    for source, target, _read_only in _binds(spec, settings):
        argv += ["-b", f"{source}:{target}"]  # ch-run 0.31 cannot bind read-only
    argv.append(Raw("$pfleet_image_env"))
    argv += [f"--set-env={entry}" for entry in job_env(spec, settings)]
    argv += ["--cd=/", image_path(settings.image_dir, spec.image), "--", *spec.command]
    return argv


def apptainer_argv(spec: JobSpec, settings: SlurmSettings) -> list[str]:
    """``apptainer exec`` (untested here: Apptainer is not packaged for Debian 12)."""
    image = (image_path(settings.image_dir, spec.image) if settings.image_dir
             or spec.image.startswith("/") else f"docker://{spec.image}")
    argv = ["apptainer", "exec", "--cleanenv"]
    for source, target, read_only in _binds(spec, settings):
        argv += ["--bind", f"{source}:{target}" + (":ro" if read_only else "")]
    for entry in job_env(spec, settings):
        argv += ["--env", entry]
    if spec.gpu_limit > 0:
        argv.append("--nv")
    return [*argv, image, *spec.command]


def bare_argv(spec: JobSpec, settings: SlurmSettings) -> list[str]:
    """The command on the node itself: mount targets in its arguments (``/share/incoming``
    ...) are replaced by the storeBase paths they stand for."""
    binds = sorted(_binds(spec, settings), key=lambda b: len(b[1]), reverse=True)

    def rewrite(arg: str) -> str:
        for source, target, _ in binds:
            if arg == target or arg.startswith(target.rstrip("/") + "/"):
                return source + arg[len(target.rstrip("/")):]
        return arg

    return ["env", *job_env(spec, settings), *(rewrite(a) for a in spec.command)]


# --------------------------------------------------------------------- script


def task_script(spec: JobSpec, settings: SlurmSettings, files: JobFiles,
                rng: random.Random | None = None) -> str:
    """What one worker runs: the launcher, then one line in the result file."""
    launcher = settings.launcher
    lines = ['pfleet_task="${SLURM_PROCID:-0}"', "pfleet_oom=false"]
    if launcher in ("docker", "podman"):
        engine = [launcher]
        if settings.docker_host:
            engine += ["-H" if launcher == "docker" else "--url", settings.docker_host]
        cli = _words(engine)
        container = f"pfleet-{spec.name}-{spec.attempt}"
        lines += [
            f'pfleet_ctr={shlex.quote(container)}-"$SLURM_JOB_ID-$pfleet_task"',
            # SLURM signals only its own processes: stop the container, which the
            # engine runs outside the job, when the job is cancelled or times out.
            f'pfleet_stop() {{ {cli} stop -t {STOP_GRACE_SECONDS} "$pfleet_ctr" '
            ">/dev/null 2>&1; }",
            "trap pfleet_stop TERM INT",
            _words(engine_argv(spec, settings, Raw('"$pfleet_ctr"'), rng))
            + " </dev/null &",
            'pfleet_pid=$!',
            'pfleet_rc=0',
            'wait "$pfleet_pid" || pfleet_rc=$?',
            # wait returns early when a trapped signal arrives: wait again until it ends
            'while kill -0 "$pfleet_pid" 2>/dev/null; do',
            '  pfleet_rc=0; wait "$pfleet_pid" || pfleet_rc=$?',
            'done',
            f'pfleet_oom=$({cli} inspect --format "{{{{.State.OOMKilled}}}}" "$pfleet_ctr"'
            " 2>/dev/null || echo unknown)",
            f'{cli} rm -f "$pfleet_ctr" >/dev/null 2>&1',
        ]
    elif launcher == "charliecloud":
        image = image_path(settings.image_dir, spec.image)
        quoted = shlex.quote(image)
        lines.append("pfleet_image_env=")
        lines.append(f'[ -f {quoted}/ch/environment ] && pfleet_image_env=--set-env')
        # ch-run binds only onto existing directories: make the mount points once.
        for _source, target, _ in _binds(spec, settings):
            point = shlex.quote(image + target)
            lines.append(f"[ -d {point} ] || mkdir -p {point} 2>/dev/null")
        lines += [_words(charliecloud_argv(spec, settings)) + " </dev/null",
                  "pfleet_rc=$?"]
    elif launcher == "apptainer":
        lines += [_words(apptainer_argv(spec, settings)) + " </dev/null", "pfleet_rc=$?"]
    else:
        lines += [_words(bare_argv(spec, settings)) + " </dev/null", "pfleet_rc=$?"]
    lines += [
        "printf 'task=%s exit=%s oom=%s\\n' \"$pfleet_task\" \"$pfleet_rc\" \"$pfleet_oom\""
        f" >> {shlex.quote(files.result)}",
        'exit "$pfleet_rc"',
    ]
    return "\n".join(lines) + "\n"


def render_batch_script(spec: JobSpec, settings: SlurmSettings, files: JobFiles,
                        rng: random.Random | None = None) -> str:
    """The whole batch script of one attempt.  Raises ``ValueError`` for a mount source
    outside the storeBase."""
    header = ["#!/bin/sh", *(f"#SBATCH {o}" for o in sbatch_options(spec, settings, files))]
    header += [
        f"# pfleet job {spec.jid} attempt {spec.attempt}, agent {settings.agent_name}, "
        f"launcher {settings.launcher}; written by the agent",
        IMAGE_LINE + " ".join(spec.image.split()),
        'export USER="${USER:-$(id -un)}"',  # ch-run needs it; the agent may have none
    ]
    task = task_script(spec, settings, files, rng)
    if spec.number_of_workers <= 1:
        return "\n".join(header) + "\n" + task
    # One copy per node through srun; the task travels as an argument (no shared file).
    marker = "PFLEET_TASK_" + hashlib.sha256(task.encode()).hexdigest()[:16]
    # srun does not inherit --cpus-per-task from the batch allocation (SLURM >= 22.05).
    cpus = "" if settings.ignore_limits else f"--cpus-per-task={cpus_per_task(spec.cpu_limit)} "
    body = [
        f"pfleet_task_script=$(cat <<'{marker}'",
        task.rstrip("\n"),
        marker,
        ")",
        f"srun --kill-on-bad-exit=1 --ntasks={spec.number_of_workers} --ntasks-per-node=1 "
        f'{cpus}sh -c "$pfleet_task_script"',
        'exit "$?"',
    ]
    return "\n".join(header) + "\n" + "\n".join(body) + "\n"
