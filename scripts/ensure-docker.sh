#!/usr/bin/env bash
# Make a Docker engine reachable: use the one that answers, else install Debian's docker.io
# (when missing) and start dockerd in the background, then wait for it.
#
# MODEL_SANDBOX_RUNSC=1 (or --runsc): also register gVisor for `--runtime runsc`: install
# Debian's runsc when missing, add the runtime "model-sandbox-runsc" to /etc/docker/daemon.json
# (other keys kept) and make dockerd reload it with SIGHUP (runtimes are reloadable: running
# containers and the engine stay up; dockerd is never restarted here).
set -euo pipefail
log=${DOCKERD_LOG:-/tmp/model-sandbox-dockerd.log}
want_runsc=${MODEL_SANDBOX_RUNSC:-0}
if [ "${1:-}" = "--runsc" ]; then
    want_runsc=1
fi
daemon_json=${DOCKER_DAEMON_JSON:-/etc/docker/daemon.json}
runsc_log_dir=/var/log/model-sandbox/runsc
# runtimeArgs of the runtime (sandbox/_gvisor.py RUNTIME_ARGS; a unit test keeps them equal)
runsc_args=(
    "--platform=ptrace"
    "--network=none"
    "--host-uds=open"
    "--oci-seccomp"
    "--debug"
    "--debug-command=boot"
    "--debug-log=/var/log/model-sandbox/runsc/"
    "--strace"
    "--strace-syscalls=open,openat,creat,socket,socketpair,clone,fork,vfork,execve,execveat,seccomp,unlink,unlinkat,rename,renameat,renameat2,link,linkat,symlink,symlinkat,chmod,fchmodat,memfd_create"
)

register_runsc() {
    if [ "$(id -u)" != 0 ]; then
        echo "ensure-docker: registering gVisor needs root (it edits $daemon_json)" >&2
        return 1
    fi
    if ! command -v runsc >/dev/null 2>&1; then
        echo "ensure-docker: installing Debian's runsc (gVisor)" >&2
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q runsc >/dev/null
    fi
    mkdir -p "$runsc_log_dir"
    chmod 0755 "$runsc_log_dir"  # root's: the sentry writes here; no container mounts it
    mkdir -p "$(dirname "$daemon_json")"
    changed=$(python3 - "$daemon_json" "$(command -v runsc)" "${runsc_args[@]}" <<'PY'
import json, os, sys
path, binary, args = sys.argv[1], sys.argv[2], sys.argv[3:]
try:
    with open(path) as f:
        doc = json.load(f)
except FileNotFoundError:
    doc = {}
want = {"path": binary, "runtimeArgs": args}
runtimes = doc.setdefault("runtimes", {})
if runtimes.get("model-sandbox-runsc") == want:
    print("no")
    sys.exit(0)
runtimes["model-sandbox-runsc"] = want
tmp = path + ".model-sandbox.tmp"
with open(tmp, "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
os.replace(tmp, path)
print("yes")
PY
)
    if [ "$changed" = yes ] || ! docker info --format '{{json .Runtimes}}' 2>/dev/null \
            | grep -q '"model-sandbox-runsc"'; then
        pid=$(pidof dockerd || true)
        if [ -z "$pid" ]; then
            echo "ensure-docker: $daemon_json has the runtime, but no local dockerd to reload" >&2
            return 1
        fi
        echo "ensure-docker: reloading dockerd's configuration (SIGHUP to $pid)" >&2
        kill -HUP $pid
    fi
    for _ in $(seq 1 20); do
        if docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"model-sandbox-runsc"'; then
            echo "ensure-docker: gVisor runtime model-sandbox-runsc registered" >&2
            return 0
        fi
        sleep 0.5
    done
    echo "ensure-docker: dockerd did not load the runtime model-sandbox-runsc from $daemon_json" >&2
    return 1
}

if docker info >/dev/null 2>&1; then
    if [ "$want_runsc" = 1 ]; then
        register_runsc
    fi
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
        if [ "$want_runsc" = 1 ]; then
            register_runsc
        fi
        exit 0
    fi
    sleep 1
done
echo "ensure-docker: dockerd did not come up within 60 s; last lines of $log:" >&2
tail -n 20 "$log" >&2 || true
exit 1
