#!/usr/bin/env bash
# Builds the image and runs it the way the chart does: read-only root filesystem, an empty
# /tmp, a volume at /data, every capability dropped, no privilege escalation, the image's
# numeric user. Checks /readyz, takes and releases a lock, then stops it with SIGTERM and
# expects a clean exit. Containers use the host's network and listen on 127.0.0.1 only.
#
# Usage: hack/image-smoke.sh [--debootstrap-base]
#   --debootstrap-base  build the base image locally instead of pulling python:3.11-slim:
#                       Debian bookworm (CPython 3.11) by debootstrap from Debian's packages,
#                       with this machine's CA bundle, imported with `docker import`. For
#                       machines that reach Debian's and PyPI's mirrors but no image registry.
# Environment:
#   PYTHON_IMAGE   the base image (default: the Dockerfile's; ignored with --debootstrap-base)
#   IMAGE          the tag to build (default enhanced-locking:<appVersion>)
#   DOCKER_HOST    as for docker
set -euo pipefail

# shellcheck disable=SC2034  # read by lib.sh's log
LOG_NAME="image-smoke"
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
help_if_asked "$@"
debootstrap_base=0
for arg in "$@"; do
  case "${arg}" in
    --debootstrap-base) debootstrap_base=1 ;;
    *) die "unknown argument: ${arg} (see --help)" ;;
  esac
done
cd "${REPO_ROOT}"

APP_VERSION="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/enhanced-locking/Chart.yaml)"
IMAGE="${IMAGE:-enhanced-locking:${APP_VERSION}}"
NAME="enhanced-locking-smoke-$$"

docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed)"

if [[ "${debootstrap_base}" == 1 ]]; then
  command -v debootstrap >/dev/null || die "debootstrap is missing (apt-get install debootstrap)"
  PYTHON_IMAGE=local/python:3.11-bookworm
  if ! docker image inspect "${PYTHON_IMAGE}" >/dev/null 2>&1; then
    rootfs="$(mktemp -d -t python-rootfs-XXXXXX)"
    log "debootstrap of bookworm with CPython 3.11 into ${rootfs}"
    debootstrap --variant=minbase \
      --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
      bookworm "${rootfs}" http://deb.debian.org/debian >/dev/null
    # The machine's trust store: where TLS to PyPI goes through a proxy with its own CA.
    cp /etc/ssl/certs/ca-certificates.crt "${rootfs}/etc/ssl/certs/ca-certificates.crt"
    rm -rf "${rootfs}"/var/cache/apt/archives/*.deb "${rootfs}"/var/lib/apt/lists/*
    tar -C "${rootfs}" -c . | docker import - "${PYTHON_IMAGE}" >/dev/null
    rm -rf "${rootfs}"
  fi
fi

log "building ${IMAGE}"
DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}" docker build --network host -t "${IMAGE}" \
  ${PYTHON_IMAGE:+--build-arg "PYTHON_IMAGE=${PYTHON_IMAGE}"} \
  --build-arg "REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)" . >&2

port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
volume="$(docker volume create)"
cleanup() {
  docker rm -f "${NAME}" >/dev/null 2>&1 || true
  docker volume rm "${volume}" >/dev/null 2>&1 || true
}
trap cleanup EXIT

log "running it read-only on 127.0.0.1:${port}"
docker run -d --name "${NAME}" --network host --read-only --tmpfs /tmp \
  --cap-drop ALL --security-opt no-new-privileges -v "${volume}:/data" \
  "${IMAGE}" serve --host 127.0.0.1 --port "${port}" --enhanced-locking-enabled >/dev/null

url="http://127.0.0.1:${port}"
for _ in $(seq 60); do
  if curl -fsS --noproxy '*' "${url}/readyz" >/dev/null 2>&1; then break; fi
  sleep 0.5
done
curl -fsS --noproxy '*' "${url}/readyz" >/dev/null || { docker logs "${NAME}" >&2; die "/readyz did not answer 200"; }
[[ "$(docker exec "${NAME}" id -u)" != 0 ]] || die "the container runs as root"
curl -fsS --noproxy '*' -X POST "${url}/v1/locks" -H 'content-type: application/json' \
  -d '{"project": {"repoFullName": "acme/infra", "path": "."}, "pull": {"num": 1}}' |
  grep -q '"acquired":true' || die "the lock was not acquired"
curl -fsS --noproxy '*' -X DELETE "${url}/v1/locks/by-key?key=acme/infra/./default/" >/dev/null
docker exec "${NAME}" test -s /data/enhanced-locking.db || die "no store in /data"

docker stop -t 20 "${NAME}" >/dev/null
code="$(docker inspect "${NAME}" --format '{{.State.ExitCode}}')"
[[ "${code}" == 0 ]] || { docker logs "${NAME}" >&2; die "exit code ${code} after SIGTERM"; }
log "passed: ${IMAGE} serves read-only as user $(docker run --rm --entrypoint id "${IMAGE}" -u) and stops cleanly"
