#!/bin/sh
# Minimal guest check for scripts/vm/run.sh: ublk is available and dunnage runs.
set -e
echo "smoke: kernel $(uname -r)"
test -c /dev/ublk-control || { echo "smoke: /dev/ublk-control missing"; ls -l /dev; exit 1; }
ls -l /dev/ublk-control
dunnage --version
echo "smoke: ok"
