#!/usr/bin/env bash
# Runs the end-to-end suite against a kind cluster that runs the real image:
#
#   kind create cluster -> docker build -> kind load -> helm install (and the upgrade that
#   creates the default LockPolicy/LockMigration) -> rollout and Ready -> helm test ->
#   E2E_CLUSTER=kind pytest tests/e2e
#
# On failure it dumps what is needed to see why (pods, events, the operator's log, `kind
# export logs`) into the artifacts directory, then deletes the cluster (KEEP_CLUSTER=1 keeps it).
#
# It needs a Docker engine and the `kind` command, and images: the kind node image
# (kindest/node, or KIND_NODE_IMAGE), the Python base of the Dockerfile (PYTHON_IMAGE) and the
# `helm test` image (tests.image of the chart). They are pulled from their registries, or must
# already be in the local Docker (`docker load -i ...`) where no registry is reachable. On a
# machine without Docker images it cannot run; the same suite runs there against the local
# control plane (`make test-e2e`). See docs/06-kubernetes.md.
#
# Usage: hack/kind-e2e.sh [pytest arguments]
# Environment:
#   KIND_CLUSTER_NAME  cluster name (default enhanced-locking-e2e)
#   KIND_NODE_IMAGE    node image for `kind create cluster --image` (default: kind's own)
#   PYTHON_IMAGE       base image of the Dockerfile (default: the Dockerfile's)
#   ARTIFACTS          where the kubeconfig and the failure dumps go (default: a temp dir)
#   KEEP_CLUSTER=1     keep the cluster afterwards
#   HELM_TEST=0        skip `helm test` (when the test image cannot be pulled)
#   PYTHON             the interpreter with the project installed (default .venv/bin/python)
set -euo pipefail

# shellcheck disable=SC2034  # read by lib.sh's log
LOG_NAME="kind-e2e"
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
help_if_asked "$@"
cd "${REPO_ROOT}"

CLUSTER="${KIND_CLUSTER_NAME:-enhanced-locking-e2e}"
NAMESPACE=enhanced-locking
RELEASE=enhanced-locking
CHART=charts/enhanced-locking
APP_VERSION="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "${CHART}/Chart.yaml")"
IMAGE="enhanced-locking:${APP_VERSION}"   # the chart's default image.repository:appVersion
ARTIFACTS="${ARTIFACTS:-$(mktemp -d -t enhanced-locking-kind-XXXXXX)}"
PYTHON="${PYTHON:-${REPO_ROOT}/.venv/bin/python}"

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed); kind needs one"
command -v kind >/dev/null || die "kind is not installed (https://kind.sigs.k8s.io)"
[[ -x "${PYTHON}" ]] || die "${PYTHON} is missing: run \`make venv\` first"

# kubectl and helm at the versions of hack/versions.env, as for the local control plane.
"${REPO_ROOT}/hack/build-control-plane.sh"
BIN_DIR="$("${REPO_ROOT}/hack/build-control-plane.sh" --print-bin-dir)"
export PATH="${BIN_DIR}:${PATH}"
export KUBECONFIG="${ARTIFACTS}/kubeconfig"
mkdir -p "${ARTIFACTS}"
log "artifacts in ${ARTIFACTS}"

dump() {
  local out="${ARTIFACTS}/dump"
  mkdir -p "${out}"
  log "dumping cluster state into ${out}"
  kubectl get all,lockpolicies,lockmigrations,events -A -o wide >"${out}/objects.txt" 2>&1 || true
  kubectl describe pods -n "${NAMESPACE}" >"${out}/pods.txt" 2>&1 || true
  kubectl logs -n "${NAMESPACE}" "deployment/${RELEASE}" --all-containers --previous \
    >"${out}/operator-previous.log" 2>&1 || true
  kubectl logs -n "${NAMESPACE}" "deployment/${RELEASE}" --all-containers \
    >"${out}/operator.log" 2>&1 || true
  helm status "${RELEASE}" -n "${NAMESPACE}" --show-resources >"${out}/helm-status.txt" 2>&1 || true
  kind export logs "${out}/kind" --name "${CLUSTER}" >/dev/null 2>&1 || true
  tail -n 50 "${out}/operator.log" >&2 || true
}

finish() {
  local status=$?
  if [[ ${status} -ne 0 ]]; then
    dump
  fi
  if [[ "${KEEP_CLUSTER:-0}" == 1 ]]; then
    log "keeping cluster ${CLUSTER} (KUBECONFIG=${KUBECONFIG})"
  else
    kind delete cluster --name "${CLUSTER}" >/dev/null 2>&1 || true
  fi
  exit "${status}"
}
trap finish EXIT

log "creating kind cluster ${CLUSTER}"
kind create cluster --name "${CLUSTER}" --kubeconfig "${KUBECONFIG}" --wait 180s \
  ${KIND_NODE_IMAGE:+--image "${KIND_NODE_IMAGE}"}

log "building ${IMAGE}"
docker build -t "${IMAGE}" \
  ${PYTHON_IMAGE:+--build-arg "PYTHON_IMAGE=${PYTHON_IMAGE}"} \
  --build-arg "VERSION=${APP_VERSION}" \
  --build-arg "REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  .
kind load docker-image "${IMAGE}" --name "${CLUSTER}"

# The helm test image, when it is already here (else the node pulls it).
TEST_IMAGE="$(
  "${PYTHON}" -c 'import sys, yaml; t = yaml.safe_load(open(sys.argv[1]))["tests"]["image"]
print(t["repository"] + ":" + t["tag"])' "${CHART}/values.yaml"
)"
if docker image inspect "${TEST_IMAGE}" >/dev/null 2>&1; then
  kind load docker-image "${TEST_IMAGE}" --name "${CLUSTER}"
fi

log "installing the chart: CRDs, operator, the default LockPolicy and LockMigration"
helm install "${RELEASE}" "${CHART}" -n "${NAMESPACE}" --create-namespace \
  --set image.pullPolicy=Never --wait --timeout 5m
kubectl rollout status -n "${NAMESPACE}" "deployment/${RELEASE}" --timeout=180s
kubectl wait -n "${NAMESPACE}" --for=condition=Ready --timeout=120s \
  lockpolicy/default lockmigration/to-enhanced

if [[ "${HELM_TEST:-1}" != 0 ]]; then
  log "helm test"
  helm test "${RELEASE}" -n "${NAMESPACE}" --logs --timeout 3m
fi

log "running the e2e suite against the kind cluster"
E2E_CLUSTER=kind "${PYTHON}" -m pytest tests/e2e -p no:cacheprovider "$@"
log "passed"
