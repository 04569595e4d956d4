#!/usr/bin/env bash
# Make a Docker engine reachable: use the one that answers, else install Debian's docker.io
# (when missing) and start dockerd in the background, then wait for it.
set -euo pipefail
log=${DOCKERD_LOG:-/tmp/model-sandbox-dockerd.log}

if docker info >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "ensure-docker: no Docker engine answers and this is not root: start one (or set DOCKER_HOST)" >&2
    exit 1
fi
if ! command -v dockerd >/dev/null 2>&1; then
    echo "ensure-docker: installing Debian's docker.io" >&2
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io >/dev/null
fi
echo "ensure-docker: starting dockerd (log: $log)" >&2
nohup dockerd >"$log" 2>&1 &
for _ in $(seq 1 60); do
    if docker info >/dev/null 2>&1; then
        echo "ensure-docker: engine is up" >&2
        exit 0
    fi
    sleep 1
done
echo "ensure-docker: dockerd did not come up within 60 s; last lines of $log:" >&2
tail -n 20 "$log" >&2 || true
exit 1
