"""Batch scripts, launcher commands and the SLURM settings, without SLURM: the
scripts are checked with ``sh -n`` and the bare launcher's is run by ``sh``."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from agent.config import AgentConfigError, load_agent_config
from agent.protocol import JobSpec, Mount
from agent.runtimes.slurm_config import SlurmRule, SlurmSettings, parse_rules
from agent.runtimes.slurm_script import (
    bare_argv,
    cpus_per_task,
    image_path,
    job_comment,
    job_files,
    parse_comment,
    render_batch_script,
    sbatch_options,
)

MOUNTS = [Mount("key-j1/incoming", "/share/incoming", True),
          Mount("key-j1/outgoing", "/share/outgoing", False)]


def spec(**fields: object) -> JobSpec:
    base: dict[str, object] = {
        "job": "J-1", "attempt": 2, "name": "j1", "jid": "j1", "kind": "plugin",
        "image": "ghcr.io/fnndsc/pl-simpledsapp:2.1", "env": ["A=1", "B=two words"],
        "command": ["python", "app.py", "--x", "it's", "/share/incoming", "/share/outgoing"],
        "cpu_limit": 1500, "memory_limit": 300, "mounts": MOUNTS}
    base.update(fields)
    return JobSpec(**base)  # type: ignore[arg-type]


def settings(**fields: object) -> SlurmSettings:
    base: dict[str, object] = {"agent_name": "login1", "work_dir": "/var/lib/pfleet/slurm",
                               "storebase": "/scratch/storeBase"}
    base.update(fields)
    return SlurmSettings(**base)  # type: ignore[arg-type]


def files(s: SlurmSettings, j: JobSpec) -> object:
    return job_files(s.work_dir, j.name, j.attempt)


def syntax_ok(script: str, tmp_path: Path) -> None:
    path = tmp_path / "check.sh"
    path.write_text(script)
    res = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True, timeout=10)
    assert res.returncode == 0, res.stderr


def test_resources_map_to_sbatch_options() -> None:
    s = settings()
    opts = sbatch_options(spec(), s, job_files(s.work_dir, "j1", 2))
    assert opts[:8] == [
        "--job-name=j1",
        "--comment=pfleet;agent=login1;job=J-1;attempt=2;kind=plugin;jid=j1",
        "--output=/var/lib/pfleet/slurm/j1.2.out", "--open-mode=append",
        "--chdir=/var/lib/pfleet/slurm", "--no-requeue", "--nodes=1", "--ntasks-per-node=1"]
    assert "--cpus-per-task=2" in opts and "--mem=300M" in opts  # 1500 millicores round up
    assert not any(o.startswith(("--gres", "--partition", "--time", "--qos")) for o in opts)
    opts = sbatch_options(spec(gpu_limit=2, number_of_workers=3), s, files(s, spec()))
    assert "--gres=gpu:2" in opts and "--nodes=3" in opts
    opts = sbatch_options(spec(), settings(ignore_limits=True), files(s, spec()))
    assert not any(o.startswith(("--cpus-per-task", "--mem")) for o in opts)
    assert [cpus_per_task(m) for m in (1, 999, 1000, 1001, 4000)] == [1, 1, 1, 2, 4]
    odd = settings(work_dir="/w/100%")
    opts = sbatch_options(spec(), odd, job_files(odd.work_dir, "j1", 2))
    assert "--output=/w/100%%/j1.2.out" in opts  # "%" would start a filename pattern


def test_rules_choose_partition_account_qos_and_time_by_image() -> None:
    s = settings(partition="batch", account="chris", timelimit_minutes=60, rules=(
        SlurmRule("*gpu*", partition="gpu", qos="high"),
        SlurmRule("ghcr.io/fnndsc/*", timelimit_minutes=5),
        SlurmRule("*", partition="never-reached")))
    gpu = s.placement("docker.io/fnndsc/pl-gpu-thing:1")
    assert (gpu.partition, gpu.account, gpu.qos, gpu.timelimit_minutes) == \
        ("gpu", "chris", "high", 60)
    fnndsc = s.placement("ghcr.io/fnndsc/pl-simpledsapp:2.1")
    assert (fnndsc.partition, fnndsc.timelimit_minutes) == ("batch", 5)
    assert s.placement("other:1").partition == "never-reached"
    opts = sbatch_options(spec(image="x/gpu:1"), s, files(s, spec()))
    assert {"--partition=gpu", "--account=chris", "--qos=high", "--time=60"} <= set(opts)
    assert s.partitions() == ["batch", "gpu", "never-reached"]
    assert settings(timelimit_minutes=0).placement("x").timelimit_minutes is None


def test_rules_parse_from_toml_tables_or_json() -> None:
    rules = parse_rules('[{"image": "*gpu*", "partition": "gpu", "timelimit_minutes": 30}]')
    assert rules == (SlurmRule("*gpu*", partition="gpu", timelimit_minutes=30),)
    assert parse_rules([{"image": "*", "qos": "low"}]) == (SlurmRule("*", qos="low"),)
    for bad, message in (("nope", "JSON"), ({"image": "*"}, "list"),
                         ([{"partition": "x"}], "'image'"),
                         ([{"image": "*", "colour": "red"}], "unknown keys"),
                         ([{"image": "*", "timelimit_minutes": -1}], "timelimit_minutes"),
                         ([{"image": "*", "partition": "a b"}], "partition")):
        with pytest.raises(ValueError, match=message):
            parse_rules(bad)


def test_comment_round_trip_and_foreign_comments() -> None:
    j = spec(job="id;with=odd%chars", jid="j;1")
    fields = parse_comment(job_comment(j, "agent one"))
    assert fields == {"agent": "agent one", "job": "id;with=odd%chars", "attempt": "2",
                      "kind": "plugin", "jid": "j;1"}
    assert parse_comment("somebody else's job") is None
    assert parse_comment("pfleet;agent=a;job=b") is None  # no attempt
    assert parse_comment("") is None


def test_image_paths_follow_charliecloud_storage_names() -> None:
    assert image_path("/images", "localhost/pfleet-test/busybox:1") == \
        "/images/localhost%pfleet-test%busybox+1"
    assert image_path("/images", "/abs/dir") == "/abs/dir"


@pytest.mark.parametrize("launcher", ["docker", "podman", "charliecloud", "apptainer", "none"])
@pytest.mark.parametrize("workers", [1, 3])
def test_every_launcher_renders_a_valid_script(launcher: str, workers: int,
                                               tmp_path: Path) -> None:
    s = settings(launcher=launcher, image_dir="/images", docker_host="unix:///run/d.sock",
                 job_labels={"team": "imaging"}, shm_size_mib=64, container_user="1000:100",
                 enable_home_workaround=True)
    j = spec(number_of_workers=workers, gpu_limit=1)
    script = render_batch_script(j, s, job_files(s.work_dir, j.name, j.attempt),
                                 random.Random(1))
    syntax_ok(script, tmp_path)
    assert script.startswith("#!/bin/sh\n#SBATCH --job-name=j1\n")
    assert "printf 'task=%s exit=%s oom=%s\\n'" in script
    assert ("srun --kill-on-bad-exit=1 --ntasks=3 --ntasks-per-node=1 --cpus-per-task=2 sh -c"
            in script) == (workers == 3)
    if launcher == "docker":
        assert "docker -H unix:///run/d.sock run --name \"$pfleet_ctr\"" in script
        assert ("--mount type=bind,source=/scratch/storeBase/key-j1/incoming,"
                "target=/share/incoming,readonly") in script
        assert "--memory=300m --memory-swap=300m --cpus=1.5 --gpus=1 --shm-size=67m" in script
        assert "--user 1000 --group-add 100" in script and "-e HOME=/tmp" in script
        assert "--label team=imaging" in script and "trap pfleet_stop TERM INT" in script
        assert "'it'\"'\"'s'" in script  # the quote in an argument survives
    if launcher == "podman":
        assert "podman --url unix:///run/d.sock run" in script and "--gpus" not in script
    if launcher == "charliecloud":
        assert ("ch-run -b /scratch/storeBase/key-j1/incoming:/share/incoming -b "
                "/scratch/storeBase/key-j1/outgoing:/share/outgoing $pfleet_image_env "
                "--set-env=A=1 '--set-env=B=two words'") in script
        assert "/images/ghcr.io%fnndsc%pl-simpledsapp+2.1 -- python app.py" in script
        assert "mkdir -p /images/ghcr.io%fnndsc%pl-simpledsapp+2.1/share/outgoing" in script
    if launcher == "apptainer":
        assert ("apptainer exec --cleanenv --bind /scratch/storeBase/key-j1/incoming:"
                "/share/incoming:ro") in script and "--nv" in script
    if launcher == "none":
        assert "env A=1 'B=two words' HOME=/tmp python app.py" in script
        assert "/scratch/storeBase/key-j1/incoming /scratch/storeBase/key-j1/outgoing" in script


def test_bare_script_runs_with_every_argument_intact(tmp_path: Path) -> None:
    """The rendered script, run by sh outside SLURM: quoting, env, exit code, result."""
    s = settings(launcher="none", work_dir=str(tmp_path), storebase=str(tmp_path / "sb"))
    odd = ["a b", "it's", "new\nline", "$HOME", "`id`", "PFLEET_TASK_x"]
    j = spec(command=["sh", "-c", 'printf "<%s>" "$@"; printf "%s" "$B"; exit 7', "sh", *odd])
    jf = job_files(s.work_dir, j.name, j.attempt)
    Path(jf.script).write_text(render_batch_script(j, s, jf))
    res = subprocess.run(["sh", jf.script], capture_output=True, text=True, timeout=10,
                         env={"PATH": "/usr/bin:/bin"})
    assert res.returncode == 7
    assert res.stdout == "".join(f"<{a}>" for a in odd) + "two words"
    assert Path(jf.result).read_text() == "task=0 exit=7 oom=false\n"


def test_bare_launcher_rewrites_mount_targets_only() -> None:
    s = settings(launcher="none")
    argv = bare_argv(spec(env=[], command=["x", "/share/incoming/a.txt", "/share/incomingx",
                                           "--out=/share/outgoing"]), s)
    assert argv == ["env", "x", "/scratch/storeBase/key-j1/incoming/a.txt", "/share/incomingx",
                    "--out=/share/outgoing"]


def test_mount_outside_the_storebase_is_refused() -> None:
    s = settings()
    j = spec(mounts=[Mount("../etc", "/share/incoming", True)])
    with pytest.raises(ValueError, match="outside the storeBase"):
        render_batch_script(j, s, job_files(s.work_dir, j.name, j.attempt))


def test_settings_validation_names_every_problem() -> None:
    problems = settings(launcher="singularity", work_dir="relative", storebase="/a b",
                        partition="x y", command_timeout=0).validate()
    text = "\n".join(problems)
    for part in ("PFLEET_SLURM_LAUNCHER", "PFLEET_SLURM_WORK_DIR", "STOREBASE",
                 "PFLEET_SLURM_PARTITION", "PFLEET_SLURM_COMMAND_TIMEOUT"):
        assert part in text
    assert "PFLEET_SLURM_IMAGE_DIR" in "\n".join(settings(launcher="charliecloud").validate())
    assert settings(partition="a,b").validate() == []


def test_agent_config_reads_slurm_settings(tmp_path: Path) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text('container_env = "slurm"\nslurm_launcher = "charliecloud"\n'
                    'slurm_image_dir = "/images"\nslurm_partition = "batch"\n'
                    'timelimit_minutes = 90\n'
                    'slurm_rules = [{ image = "*gpu*", partition = "gpu" }]\n')
    config = load_agent_config(toml, env={"PFLEET_AGENT_TOKEN": "t", "STOREBASE": "/sb",
                                          "PFLEET_SLURM_QOS": "normal"})
    assert (config.runtime, config.slurm_launcher, config.slurm_partition, config.slurm_qos,
            config.timelimit_minutes) == ("slurm", "charliecloud", "batch", "normal", 90)
    assert config.slurm_rules == (SlurmRule("*gpu*", partition="gpu"),)
    assert config.compute_volume_type == "host"
    with pytest.raises(AgentConfigError) as err:
        load_agent_config(toml, env={"PFLEET_AGENT_TOKEN": "t", "PFLEET_SLURM_RULES": "[1]",
                                     "PFLEET_SLURM_LAUNCHER": "singularity"})
    text = str(err.value)
    assert "PFLEET_SLURM_RULES: rule 1: expected a table" in text
    assert "PFLEET_SLURM_LAUNCHER: must be one of" in text
