"""The pfcon <= 5.3 single-resource API (``/api/v1/jobs/``, pfcon-api.md §1.13) in every
storage mode, on the real controller process, Docker and (for swift) Swift — the calls
an older CUBE (python-pfconclient 3.x) makes: POST (inputs fetched inside the
request), poll the status, GET the outputs, DELETE (data and container at once)."""

from __future__ import annotations

import io
import time
import zipfile

import pytest
import requests

from tests.e2e.test_innetwork_flows import cube_tree, innetwork_env
from tests.e2e.test_pfconclient_zipfile import COPY_SCRIPT
from tests.support.engines import BUSYBOX_IMAGE, Engine
from tests.support.zips import make_zip

pytestmark = pytest.mark.docker

# Before v6 `args` was required; with one arg ("legacy") the dirs move to $1 and $2.
LEGACY_SCRIPT = COPY_SCRIPT.replace('"$1', '"$2').replace('"$0', '"$1')


def form(jid: str, **extra: list[str] | str) -> list[tuple[str, str]]:
    fields: dict[str, list[str] | str] = {
        "jid": jid, "entrypoint": ["sh", "-c", LEGACY_SCRIPT], "args": ["legacy"],
        "auid": "cube", "number_of_workers": "1", "cpu_limit": "1000", "memory_limit": "200",
        "gpu_limit": "0", "image": BUSYBOX_IMAGE, "type": "ds", **extra}
    out: list[tuple[str, str]] = []
    for key, value in fields.items():
        out.extend((key, v) for v in ([value] if isinstance(value, str) else value))
    return out


def session(base: str) -> requests.Session:
    token = requests.post(base + "auth-token/", json={"pfcon_user": "pfcon",
                                                       "pfcon_password": "pfcon1234"},
                          timeout=30).json()["token"]
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {token}"
    return s


def wait_done(s: requests.Session, base: str, jid: str) -> dict:
    compute: dict = {}
    for _ in range(240):
        compute = s.get(f"{base}jobs/{jid}/", timeout=30).json()["compute"]
        if compute["status"] in ("finishedSuccessfully", "finishedWithError", "undefined"):
            return compute
        time.sleep(0.25)
    return compute


def finish(s: requests.Session, base: str, d, jid: str) -> None:
    assert s.delete(f"{base}jobs/{jid}/", timeout=30).status_code == 204
    assert not (d.storebase / f"key-{jid}").exists()
    assert s.get(f"{base}jobs/{jid}/", timeout=30).status_code == 404
    assert s.delete(f"{base}jobs/{jid}/", timeout=30).status_code == 404


def test_legacy_zipfile(docker_engine: Engine, deployment_factory) -> None:
    d = deployment_factory(docker_engine)
    base = d.controller.base
    s = session(base)
    info = s.get(base + "jobs/", timeout=30).json()
    assert "requires_copy_job" not in info and info["storage_env"] == "zipfile"
    r = s.post(base + "jobs/", data=form("lz-1"),
               files={"data_file": make_zip({"a.txt": b"alpha\n"})}, timeout=60)
    assert r.status_code == 201, r.text
    assert r.json()["data"]["nfiles"] == 1
    assert wait_done(s, base, "lz-1")["status"] == "finishedSuccessfully"
    with zipfile.ZipFile(io.BytesIO(s.get(f"{base}jobs/lz-1/file/", timeout=60).content)) as zf:
        assert zf.read("a.txt.out") == b"alpha\n"
    finish(s, base, d, "lz-1")


@pytest.mark.parametrize("storage", ["fslink", "filesystem"])
def test_legacy_shared_filesystem(storage: str, docker_engine: Engine,
                                  deployment_factory) -> None:
    d = deployment_factory(docker_engine, extra_env=innetwork_env(storage))
    cube_tree(d.storebase)
    base = d.controller.base
    s = session(base)
    out = f"home/alice/feeds/feed_3/pl-app_{storage}/data"
    (d.storebase / out).mkdir(parents=True)
    jid = f"l{storage[:4]}-1"
    r = s.post(base + "jobs/", data=form(jid, input_dirs=["home/alice/uploads/study"],
                                         output_dir=out), timeout=120)
    assert r.status_code == 201, r.text
    assert r.json()["data"]["nfiles"] == 3
    assert wait_done(s, base, jid)["status"] == "finishedSuccessfully"
    listing = s.get(f"{base}jobs/{jid}/file/?job_output_path={out}", timeout=60).json()
    expected = (["a.txt.out", "home_bob_shared/c.txt.out", "sub/b.txt.out"] if storage == "fslink"
                else ["a.txt.out", "home_bob_shared.chrislink.out", "sub/b.txt.out"])
    assert (listing["job_output_path"], sorted(listing["rel_file_paths"])) == (out, expected)
    assert s.delete(f"{base}jobs/{jid}/", timeout=30).status_code == 204
    assert (d.storebase / out / "a.txt.out").exists()


def test_legacy_swift(docker_engine: Engine, swift_service, deployment_factory) -> None:
    env = {**innetwork_env("swift"), "SWIFT_AUTH_URL": swift_service.auth_url,
           "SWIFT_USERNAME": swift_service.user, "SWIFT_KEY": swift_service.key,
           "SWIFT_CONTAINER_NAME": "legacy"}
    d = deployment_factory(docker_engine, extra_env=env)
    conn = swift_service.connection()
    conn.put_object("legacy", "home/alice/uploads/s/a.txt", b"alpha\n")
    base = d.controller.base
    s = session(base)
    out = "home/alice/feeds/feed_4/pl-app_1/data"
    r = s.post(base + "jobs/", data=form("lsw-1", input_dirs=["home/alice/uploads/s"],
                                         output_dir=out), timeout=120)
    assert r.status_code == 201, r.text
    assert r.json()["data"]["nfiles"] == 1
    assert wait_done(s, base, "lsw-1")["status"] == "finishedSuccessfully"
    # The file GET with job_output_path uploads the outputs first, then lists them.
    listing = s.get(f"{base}jobs/lsw-1/file/?job_output_path={out}", timeout=120).json()
    assert listing == {"job_output_path": out, "rel_file_paths": ["a.txt.out"]}
    assert conn.get_object("legacy", f"{out}/a.txt.out")[1] == b"alpha\n"
    finish(s, base, d, "lsw-1")
