#!/usr/bin/env bash
# Prepare this checkout for `make run|test|lint|bench`. Idempotent; a no-op (< 0.1 s) when
# everything is already there.
#   1. system packages (root on Debian): docker.io podman busybox-static iproute2 util-linux
#      util-linux-extra (fincore, for the copy tests' page-cache checks)
#      memcached (for the test suite's OpenStack Swift), slurm-wlm munge charliecloud-runtime
#      (the SLURM agent's tests), debootstrap (the Ansible tests' host image), openssl (the
#      TLS tests make their certificates with the README's openssl commands)
#      (+ python3/python3-venv when there is no usable Python 3.11 or no Debian python3.11,
#      which the test image is made from)
#   2. .venv with `pip install -e '.[test]'`, redone only when pyproject.toml is newer than
#      .venv/.installed
# Environment: PYTHON (interpreter for the venv, default python3), PFLEET_SKIP_APT=1.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

log() { echo "bootstrap: $*" >&2; }

mkdir -p .pfleet
exec 9>.pfleet/.bootstrap.lock
flock -w 600 9 || { log "another bootstrap holds .pfleet/.bootstrap.lock"; exit 1; }

PYTHON=${PYTHON:-python3}
python_ok() {
    "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1
}

# ---- 1. system packages -------------------------------------------------------------
missing=()
for cmd in dockerd podman ip nsenter fincore memcached slurmctld munged ch-run debootstrap \
           openssl; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
# The test images need a *static* busybox (the plain busybox package is dynamic).
if [ ! -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then
    missing+=(busybox-static)
fi
packages=(docker.io podman busybox-static iproute2 util-linux util-linux-extra memcached
          slurm-wlm munge charliecloud-runtime debootstrap openssl)
if [ ! -x /usr/bin/python3.11 ]; then
    missing+=(/usr/bin/python3.11)
    packages+=(python3)
fi
# The interpreter only matters when the venv has to be (re)created.
need_venv=0
if [ ! -d .venv ] || ! .venv/bin/python -c '' >/dev/null 2>&1; then
    need_venv=1
fi
if [ $need_venv = 1 ] && ! python_ok "$PYTHON"; then
    missing+=("python>=3.11 with venv")
    packages+=(python3 python3-venv)
fi

if [ ${#missing[@]} -gt 0 ]; then
    if [ "${PFLEET_SKIP_APT:-0}" = 1 ]; then
        log "missing: ${missing[*]} (PFLEET_SKIP_APT=1, not installing)"
    elif [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        log "missing: ${missing[*]}; install as root: apt-get install -y ${packages[*]}"
    else
        log "missing: ${missing[*]} -> apt-get install ${packages[*]}"
        export DEBIAN_FRONTEND=noninteractive
        # Without systemd, docker.io's postinst would start dockerd via /etc/init.d with
        # its default 172.17.0.0/16 bridge. Forbid service starts during the install.
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
            chmod +x /usr/sbin/policy-rc.d
            trap 'rm -f /usr/sbin/policy-rc.d' EXIT
        fi
        apt-get update -qq
        apt-get install -y -qq "${packages[@]}" >/dev/null
    fi
fi
if [ $need_venv = 1 ] && ! python_ok "$PYTHON"; then
    if python_ok /usr/bin/python3; then
        PYTHON=/usr/bin/python3
    else
        log "no Python >= 3.11 with the venv module (tried $PYTHON, /usr/bin/python3)"
        exit 1
    fi
fi

# ---- 2. virtualenv --------------------------------------------------------------------
if [ -d .venv ] && ! .venv/bin/python -c '' >/dev/null 2>&1; then
    log ".venv is broken (its interpreter is gone); recreating it"
    rm -rf .venv
fi
if [ ! -d .venv ]; then
    log "creating .venv with $PYTHON"
    "$PYTHON" -m venv .venv
fi
if [ ! -e .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
    log "pip install -e '.[test]'"
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
    touch .venv/.installed
fi
