#!/usr/bin/env bash
# Make sure a dockerd answers on /var/run/docker.sock; start one in the background if not.
# Idempotent. Logs of a dockerd started here go to $DUNNAGE_DOCKERD_LOG
# (default /var/log/dunnage-dockerd.log).
set -euo pipefail

DOCKER=/usr/bin/docker # Debian's client, matching the 20.10 engine (never /usr/local/bin/docker)
LOG=${DUNNAGE_DOCKERD_LOG:-/var/log/dunnage-dockerd.log}
TIMEOUT=60

answering() { "$DOCKER" info >/dev/null 2>&1; }

answering && exit 0

if [ ! -x "$DOCKER" ] || ! command -v dockerd >/dev/null 2>&1; then
    echo "dockerd.sh: $DOCKER or dockerd missing; run scripts/install-deps.sh first" >&2
    exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "dockerd.sh: dockerd is not answering and starting it needs root" >&2
    exit 1
fi

# Only start one if no dockerd process is running already (it may still be starting up).
if ! pgrep -x dockerd >/dev/null 2>&1; then
    mkdir -p "$(dirname "$LOG")"
    echo "--- dockerd started by dunnage scripts/dockerd.sh at $(date -Is)" >>"$LOG"
    setsid dockerd </dev/null >>"$LOG" 2>&1 &
fi

for _ in $(seq 1 "$TIMEOUT"); do
    answering && exit 0
    sleep 1
done
echo "dockerd.sh: dockerd did not answer on /var/run/docker.sock within ${TIMEOUT}s; last log lines ($LOG):" >&2
tail -n 30 "$LOG" >&2 || true
exit 1
