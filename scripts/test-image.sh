#!/usr/bin/env bash
# Build the local image dunnage-test-busybox:latest (FROM scratch + Debian's static busybox).
# No registry is reachable on these machines, so nothing may be pulled. Skips if the image exists.
set -euo pipefail

DOCKER=/usr/bin/docker # Debian's client, matching the 20.10 engine
IMAGE=dunnage-test-busybox:latest
BUSYBOX=/bin/busybox
ROOT=$(cd "$(dirname "$0")/.." && pwd)

if "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1; then
    exit 0
fi
if [ ! -x "$BUSYBOX" ]; then
    echo "test-image.sh: $BUSYBOX missing; install busybox-static (scripts/install-deps.sh)" >&2
    exit 1
fi
case "$(LC_ALL=C ldd "$BUSYBOX" 2>&1 || true)" in
*"not a dynamic executable"* | *"statically linked"*) ;;
*)
    echo "test-image.sh: $BUSYBOX is not statically linked; install busybox-static (scripts/install-deps.sh)" >&2
    exit 1
    ;;
esac

ctx=$(mktemp -d /tmp/dunnage-test-image.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
cp "$BUSYBOX" "$ctx/busybox"
cp "$ROOT/fixtures/docker/busybox/Dockerfile" "$ctx/Dockerfile"

if ! out=$(DOCKER_BUILDKIT=0 "$DOCKER" build -t "$IMAGE" "$ctx" 2>&1 </dev/null); then
    echo "$out" >&2
    echo "test-image.sh: docker build of $IMAGE failed" >&2
    exit 1
fi
