#!/usr/bin/env bash
# Make sure a Docker engine answers for `make run`.
# Uses DOCKER_HOST when set, else unix:///var/run/docker.sock. When nothing answers, starts
# dockerd in the background (there is no systemd here) with container networks only in
# 198.18.0.0/15, pidfile /var/run/pfleet-dockerd.pid, log .pfleet/dockerd.log, and waits
# (bounded, ~30 s) until it answers. Stop it later with: kill "$(cat /var/run/pfleet-dockerd.pid)"
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HOST=${DOCKER_HOST:-unix:///var/run/docker.sock}
PIDFILE=/var/run/pfleet-dockerd.pid
LOG=$ROOT/.pfleet/dockerd.log

answers() { timeout 5 docker -H "$HOST" version >/dev/null 2>&1; }

command -v docker >/dev/null || { echo "ensure-docker: no docker CLI; run scripts/bootstrap.sh" >&2; exit 1; }
answers && exit 0

case "$HOST" in
unix://*) ;;
*)
    echo "ensure-docker: DOCKER_HOST=$HOST does not answer and is not a local unix socket;" \
        "start that engine yourself" >&2
    exit 1
    ;;
esac
command -v dockerd >/dev/null || { echo "ensure-docker: no dockerd; run scripts/bootstrap.sh" >&2; exit 1; }
if [ "$(id -u)" != 0 ]; then
    echo "ensure-docker: $HOST does not answer and only root can start dockerd" >&2
    exit 1
fi

mkdir -p "$(dirname "$LOG")"
echo "ensure-docker: starting dockerd on $HOST (log: $LOG)" >&2
# setsid + nohup: the daemon outlives `make run` and is not hit by its Ctrl-C.
setsid nohup dockerd \
    -H "$HOST" \
    --pidfile "$PIDFILE" \
    --bip 198.18.0.1/24 \
    --default-address-pool base=198.18.64.0/18,size=24 \
    </dev/null >>"$LOG" 2>&1 &
pid=$!

deadline=$((SECONDS + 30))
for _ in $(seq 1 300); do
    answers && { echo "ensure-docker: dockerd (pid $pid) is up" >&2; exit 0; }
    if ! kill -0 "$pid" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
        break
    fi
    sleep 0.1
done
echo "ensure-docker: dockerd did not answer on $HOST within 30 s; last lines of $LOG:" >&2
tail -n 20 "$LOG" >&2 || true
if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
fi
exit 1
