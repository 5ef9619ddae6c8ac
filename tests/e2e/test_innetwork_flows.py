"""The exact call sequence CUBE makes (pfcon-api.md §9.2) in every in-network mode,
driven by python-pfconclient 4.0.0 against the real controller process, a real
Docker engine, a real storeBase directory and (for swift) a real OpenStack Swift."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pfconclient import client as pfc

from tests.e2e.test_pfconclient_zipfile import client_for, plugin_descriptors, poll
from tests.support.engines import BUSYBOX_IMAGE, Engine

pytestmark = pytest.mark.docker

# Output paths as CUBE builds them, with a space and non-ASCII characters that the
# client sends unencoded.
OUT_TEMPLATE = "home/alice/feeds/feed 1/pl-app_{n}/dätä"


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def cube_tree(storebase: Path) -> None:
    """A CUBE storage tree: an upload dir with a ChRIS link to another user's data."""
    write(storebase, "home/alice/uploads/study/a.txt", "alpha\n")
    write(storebase, "home/alice/uploads/study/sub/b.txt", "beta\n")
    write(storebase, "home/alice/uploads/study/home_bob_shared.chrislink", "home/bob/shared")
    write(storebase, "home/bob/shared/c.txt", "gamma\n")


def plugin_for(input_dirs: list[str], output_dir: str) -> dict:
    d = plugin_descriptors()
    d.update({"input_dirs": input_dirs, "output_dir": output_dir, "args_path_flags": []})
    return d


def cleanup_sequence(client: pfc.Client, jid: str, storebase: Path, *, copy: bool,
                     upload: bool) -> None:
    resp = client.submit_job(pfc.JobType.DELETE, jid, {"cpu_limit": 1000, "memory_limit": 300})
    assert resp["compute"]["jid"] == jid
    assert poll(client, pfc.JobType.DELETE, jid) == "finishedSuccessfully"
    assert not (storebase / f"key-{jid}").exists()
    if copy:
        client.delete_job(pfc.JobType.COPY, jid)
    client.delete_job(pfc.JobType.PLUGIN, jid)
    if upload:
        client.delete_job(pfc.JobType.UPLOAD, jid)
    client.delete_job(pfc.JobType.DELETE, jid)


def innetwork_env(storage: str) -> dict[str, str]:
    return {"PFCON_INNETWORK": "true", "STORAGE_ENV": storage}


def test_fslink_flow(docker_engine: Engine, deployment_factory) -> None:
    d = deployment_factory(docker_engine, extra_env=innetwork_env("fslink"))
    cube_tree(d.storebase)
    client = client_for(d.controller.base)
    info = client.get_server_info()
    assert (info["storage_env"], info["requires_copy_job"], info["requires_upload_job"]) == \
        ("fslink", True, False)
    jid = "chris-jid-11"
    out = OUT_TEMPLATE.format(n=11)
    (d.storebase / out).mkdir(parents=True)  # CUBE creates the output dir first
    inputs = ["home/alice/uploads/study"]
    resp = client.submit_job(pfc.JobType.COPY, jid, {"cpu_limit": 1000, "memory_limit": 300,
                                                     "input_dirs": inputs, "output_dir": out})
    assert resp["compute"]["jid"] == jid
    assert poll(client, pfc.JobType.COPY, jid) == "finishedSuccessfully"
    incoming = d.storebase / f"key-{jid}" / "incoming"
    assert sorted(str(p.relative_to(incoming)) for p in incoming.rglob("*") if p.is_file()) == \
        ["a.txt", "home_bob_shared/c.txt", "sub/b.txt"]

    client.submit_job(pfc.JobType.PLUGIN, jid, plugin_for(inputs, out))
    assert poll(client, pfc.JobType.PLUGIN, jid) == "finishedSuccessfully"
    # A plugin-written link must never be reported (pfcon#175).
    write(d.storebase, f"{out}/evil.chrislink", "home/bob")
    listing = client.get_plugin_job_json_data(jid, out)
    assert listing["job_output_path"] == out
    assert sorted(listing["rel_file_paths"]) == ["a.txt.out", "home_bob_shared/c.txt.out",
                                                 "sub/b.txt.out"]
    for rel in listing["rel_file_paths"]:
        assert (d.storebase / out / rel).is_file()
    assert not (d.storebase / out / "evil.chrislink").exists()
    assert client.submit_job(pfc.JobType.UPLOAD, jid, {"job_output_path": out})["compute"][
        "message"] == "uploadSkipped"
    cleanup_sequence(client, jid, d.storebase, copy=True, upload=False)
    assert (d.storebase / out / "a.txt.out").exists()  # outputs stay in CUBE's storage


def test_filesystem_flow(docker_engine: Engine, deployment_factory) -> None:
    d = deployment_factory(docker_engine, extra_env=innetwork_env("filesystem"))
    cube_tree(d.storebase)
    client = client_for(d.controller.base)
    info = client.get_server_info()
    assert (info["requires_copy_job"], info["requires_upload_job"]) == (False, False)
    jid = "chris-jid-12"
    out = OUT_TEMPLATE.format(n=12)
    (d.storebase / out).mkdir(parents=True)
    assert client.submit_job(pfc.JobType.COPY, jid, {"output_dir": out})["compute"][
        "message"] == "copySkipped"
    resp = client.submit_job(pfc.JobType.PLUGIN, jid, plugin_for(["home/alice/uploads/study"],
                                                                 out))
    assert resp["data"]["nfiles"] == 3
    assert poll(client, pfc.JobType.PLUGIN, jid) == "finishedSuccessfully"
    listing = client.get_plugin_job_json_data(jid, out)
    # filesystem mode mounts the input dir as is: the link file is copied, not followed
    assert sorted(listing["rel_file_paths"]) == ["a.txt.out", "home_bob_shared.chrislink.out",
                                                 "sub/b.txt.out"]
    # The input dir was mounted read-only.
    ro = client.submit_job(pfc.JobType.PLUGIN, "chris-jid-13", plugin_for(
        ["home/alice/uploads/study"], out) | {"entrypoint": ["sh", "-c", 'touch "$0/x"']})
    assert ro["compute"]["status"] == "notStarted"
    assert poll(client, pfc.JobType.PLUGIN, "chris-jid-13") == "finishedWithError"
    assert not (d.storebase / "home/alice/uploads/study/x").exists()
    # No key dir in filesystem mode: the delete job is skipped.
    assert client.submit_job(pfc.JobType.DELETE, jid, {})["compute"]["message"] == \
        "deleteSkipped"


def test_swift_flow(docker_engine: Engine, swift_service, deployment_factory) -> None:
    env = {**innetwork_env("swift"), "SWIFT_AUTH_URL": swift_service.auth_url,
           "SWIFT_USERNAME": swift_service.user, "SWIFT_KEY": swift_service.key,
           "SWIFT_CONTAINER_NAME": "users"}
    d = deployment_factory(docker_engine, extra_env=env)
    conn = swift_service.connection()
    conn.put_object("users", "home/alice/uploads/study/a.txt", b"alpha\n")
    conn.put_object("users", "home/alice/uploads/study/sub/b.txt", b"beta\n")
    conn.put_object("users", "home/alice/uploads/study/home_bob_shared.chrislink",
                    b"home/bob/shared")
    conn.put_object("users", "home/bob/shared/c.txt", b"gamma\n")
    client = client_for(d.controller.base)
    info = client.get_server_info()
    assert info["swift_auth_url"] == swift_service.auth_url
    assert (info["requires_copy_job"], info["requires_upload_job"]) == (True, True)
    jid = "chris-jid-14"
    out = OUT_TEMPLATE.format(n=14)
    inputs = ["home/alice/uploads/study"]
    client.submit_job(pfc.JobType.COPY, jid, {"cpu_limit": 1000, "memory_limit": 300,
                                              "input_dirs": inputs, "output_dir": out})
    assert poll(client, pfc.JobType.COPY, jid) == "finishedSuccessfully"
    client.submit_job(pfc.JobType.PLUGIN, jid, plugin_for(inputs, out))
    assert poll(client, pfc.JobType.PLUGIN, jid) == "finishedSuccessfully"
    client.submit_job(pfc.JobType.UPLOAD, jid, {"cpu_limit": 1000, "memory_limit": 300,
                                                "job_output_path": out})
    assert poll(client, pfc.JobType.UPLOAD, jid) == "finishedSuccessfully"
    _, objects = conn.get_container("users", prefix=out + "/", full_listing=True)
    assert sorted(o["name"] for o in objects) == [
        f"{out}/a.txt.out", f"{out}/home_bob_shared/c.txt.out", f"{out}/sub/b.txt.out"]
    assert conn.get_object("users", f"{out}/a.txt.out")[1] == b"alpha\n"
    listing = client.get_plugin_job_json_data(jid, out)
    assert sorted(listing["rel_file_paths"]) == ["a.txt.out", "home_bob_shared/c.txt.out",
                                                 "sub/b.txt.out"]
    # A second upload job run is idempotent.
    client.delete_job(pfc.JobType.UPLOAD, jid)
    client.submit_job(pfc.JobType.UPLOAD, jid, {"job_output_path": out})
    assert poll(client, pfc.JobType.UPLOAD, jid) == "finishedSuccessfully"
    assert "uploaded 0" in client.get_job_status(pfc.JobType.UPLOAD, jid)["compute"]["logs"]
    cleanup_sequence(client, jid, d.storebase, copy=True, upload=True)


@pytest.mark.parametrize("storage", ["fslink", "filesystem", "swift"])
def test_command_line_client_in_network(storage: str, docker_engine: Engine, swift_service,
                                        deployment_factory) -> None:
    """The CLI always adds a data_file part ("1000"): in-network modes ignore it."""
    env = innetwork_env(storage)
    if storage == "swift":
        env |= {"SWIFT_AUTH_URL": swift_service.auth_url, "SWIFT_USERNAME": swift_service.user,
                "SWIFT_KEY": swift_service.key, "SWIFT_CONTAINER_NAME": "cli"}
    d = deployment_factory(docker_engine, extra_env=env)
    cube_tree(d.storebase)
    if storage == "swift":
        swift_service.connection().put_object("cli", "home/alice/uploads/study/a.txt", b"a\n")
    out = f"home/alice/feeds/feed_2/pl-app_{storage}/data"
    (d.storebase / out).mkdir(parents=True)
    base = d.controller.base
    token = pfc.Client.get_auth_token(base + "auth-token/", "pfcon", "pfcon1234")
    cli = [sys.executable, "-m", "pfconclient", base, "-a", token]
    jid = f"cli-{storage}"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    if storage != "filesystem":
        run("submit", "--job_type", "copy", "--jid", jid, "--input_dirs",
            "home/alice/uploads/study", "--output_dir", out)
        assert f"Job {jid} status: finishedSuccessfully" in run(
            "poll", "--job_type", "copy", "--jid", jid).stdout + run(
            "status", "--job_type", "copy", "--jid", jid).stdout
    run("submit", "--job_type", "plugin", "--jid", jid, "--entrypoint", "ls",
        "--args", "/share/incoming", "--auid", "cube", "--number_of_workers", "1",
        "--cpu_limit", "1000", "--memory_limit", "200", "--gpu_limit", "0",
        "--image", BUSYBOX_IMAGE, "--type", "fs", "--input_dirs",
        "home/alice/uploads/study", "--output_dir", out)
    run("poll", "--job_type", "plugin", "--jid", jid)
    status = run("status", "--job_type", "plugin", "--jid", jid)
    assert f"Job {jid} status: finishedSuccessfully" in status.stdout
    if storage == "swift":
        run("submit", "--job_type", "upload", "--jid", jid, "--job_output_path", out)
        run("poll", "--job_type", "upload", "--jid", jid)
    deleted = run("submit", "--job_type", "delete", "--jid", jid)
    if storage == "filesystem":  # no key dir in this mode: skipped, nothing to poll
        assert "deleteSkipped" in deleted.stdout
    else:
        run("poll", "--job_type", "delete", "--jid", jid)
        assert not (d.storebase / f"key-{jid}").exists()
    for job_type in ("copy", "plugin", "upload", "delete"):
        assert f"Deleted job {jid}" in run("delete", "--job_type", job_type, "--jid", jid).stdout
