from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from controller.config import DEV_PASSWORD, DEV_USER, load_config
from controller.errors import ConfigError


def test_dev_mode_uses_documented_credentials() -> None:
    config = load_config({}, dev=True)
    assert (config.pfcon_user, config.pfcon_password) == (DEV_USER, DEV_PASSWORD)
    assert config.storage_env == "zipfile" and not config.innetwork
    assert (config.listen_host, config.listen_port) == ("0.0.0.0", 30005)
    assert load_config({"PFLEET_DEV": "yes"}).dev is True


def test_production_requires_each_secret_by_name() -> None:
    with pytest.raises(ConfigError) as err:
        load_config({"PFCON_USER": "u"})
    names = " ".join(err.value.problems)
    assert "SECRET_KEY" in names and "PFCON_PASSWORD" in names
    assert "PFCON_USER" not in names


def test_every_problem_is_listed_at_once() -> None:
    env = {"SECRET_KEY": "k", "PFCON_USER": "u", "PFCON_PASSWORD": "p",
           "STORAGE_ENV": "swift", "CONTAINER_ENV": "cromwell", "JOB_LOGS_TAIL": "many",
           "PFLEET_LISTEN": "nowhere", "REMOVE_JOBS": "perhaps", "PFLEET_MAX_FILES": "0"}
    with pytest.raises(ConfigError) as err:
        load_config(env)
    text = str(err.value)
    for name in ("STORAGE_ENV", "CONTAINER_ENV", "JOB_LOGS_TAIL", "PFLEET_LISTEN",
                 "REMOVE_JOBS", "PFLEET_MAX_FILES"):
        assert name in text
    assert len(err.value.problems) == 6


def test_volume_type_must_suit_container_env() -> None:
    with pytest.raises(ConfigError, match="COMPUTE_VOLUME_TYPE: kubernetes supports "
                                          "kubernetes_pvc"):
        load_config({"CONTAINER_ENV": "kubernetes", "COMPUTE_VOLUME_TYPE": "host"}, dev=True)
    assert load_config({"CONTAINER_ENV": "podman"}, dev=True).compute_volume_type == "host"


def test_pfcon_names_are_read() -> None:
    config = load_config({"JOB_LOGS_TAIL": "7", "STOREBASE_MOUNT": "/sb",
                          "PFLEET_STATE_DIR": "/st", "PFLEET_LISTEN": "127.0.0.1:9",
                          "REMOVE_JOBS": "no"}, dev=True)
    assert config.job_logs_tail == 7 and config.storebase_mount == Path("/sb")
    assert config.state_dir == Path("/st") and config.listen_port == 9
    assert config.remove_jobs is False


def test_controller_refuses_to_start_and_names_what_is_missing(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "pfleet-controller"
    result = subprocess.run([str(exe)], env={"PATH": "/usr/bin:/bin",
                                             "PFLEET_STATE_DIR": str(tmp_path)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    for name in ("SECRET_KEY", "PFCON_USER", "PFCON_PASSWORD"):
        assert name in result.stderr
    assert "Traceback" not in result.stderr
