#!/usr/bin/env bash
# Starts a local Kubernetes control plane for manual work (the one the e2e
# tests use): builds the binaries if needed, then runs until Ctrl-C and prints
# the `export KUBECONFIG=...` line to use it from another shell.
#
# Usage: hack/cluster-up.sh [--workdir DIR]
# Environment: PYTHON (default: .venv/bin/python if present, else python3),
#   plus those of hack/build-control-plane.sh.
set -euo pipefail

# shellcheck disable=SC2034  # read by lib.sh's log
LOG_NAME="cluster-up"
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
help_if_asked "$@"
cd "${REPO_ROOT}"

"${REPO_ROOT}/hack/build-control-plane.sh"

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "${REPO_ROOT}/.venv/bin/python" ]]; then
    PYTHON="${REPO_ROOT}/.venv/bin/python"
  else
    PYTHON=python3
  fi
fi
exec "${PYTHON}" -m tests.support.controlplane up "$@"
