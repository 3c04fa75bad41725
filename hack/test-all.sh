#!/usr/bin/env bash
# `make test`: every tier, with the slow builds running while the tests that do not need them do.
#
# On a fresh machine the Kubernetes binaries and Atlantis take many minutes to compile, and
# only the e2e tier (the control plane, helm) and the Go tests (Atlantis) need them. So, with
# etcd already built (a prerequisite of `make test`: the unit and integration tests' store):
#
#   1. hack/build-control-plane.sh, then hack/build-atlantis.sh, start in the background,
#      niced, their output to build/test-builds/<name>.log;
#   2. the unit and integration tiers run meanwhile;
#   3. the e2e tier runs: its fixtures wait for the control-plane build if it is still running
#      (tests/support/background_builds.py) and fail naming its log if it failed;
#   4. beside it, once the Atlantis build is done, the Go tests, their output to
#      build/test-builds/test-go.log, printed whole once the e2e tier is done (so neither
#      tier's lines are mixed into the other's).
#
# A build that fails fails `make test`, its log's tail printed; one that succeeds prints one
# line. A build or the Go tests still running when a tier fails are stopped. Each build holds
# its cache's lock (hack/lib.sh), so it never races another build of the same cache: it waits
# for it.
#
# Usage: hack/test-all.sh   (from the Makefile: VENV and MAKE name the venv and make)
set -euo pipefail

# shellcheck disable=SC2034  # read by lib.sh's log
LOG_NAME="test"
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
help_if_asked "$@"

cd "$REPO_ROOT"
# Every tier's log ends with its 30 slowest tests (setup, call and teardown each) and the test
# files that took longest in all: where the time of `make test` goes, in every CI log.
PYTEST=("${VENV:-.venv}/bin/python" -m pytest --durations=30 --durations-by-file=20)
BUILDS=(control-plane atlantis)

# The directory the background builds report in, read by the tests' support code: for each
# build, <name>.log from the start, then <name>.status with its exit status when it ends.
export ENHANCED_LOCKING_BUILD_LOGS="${REPO_ROOT}/build/test-builds"
rm -rf "$ENHANCED_LOCKING_BUILD_LOGS"
mkdir -p "$ENHANCED_LOCKING_BUILD_LOGS"

# Every build's log exists from the start: a test that needs one waits for it even while an
# earlier one still runs.
for name in "${BUILDS[@]}"; do
  : >"$ENHANCED_LOCKING_BUILD_LOGS/${name}.log"
done
# The builds run one after the other (the control plane first: the e2e tier comes before the
# Go tests) in a process group of their own, so that they can be stopped together.
setsid nice -n 10 bash -c '
  for name in "$@"; do
    started="$SECONDS"
    status=0
    "hack/build-${name}.sh" >"$ENHANCED_LOCKING_BUILD_LOGS/${name}.log" 2>&1 || status=$?
    echo "$((SECONDS - started))" >"$ENHANCED_LOCKING_BUILD_LOGS/${name}.seconds"
    echo "$status" >"$ENHANCED_LOCKING_BUILD_LOGS/${name}.status"
  done' background-builds "${BUILDS[@]}" &
builder=$!
echo "$builder" >"$ENHANCED_LOCKING_BUILD_LOGS/builder.pid"
log "building ${BUILDS[*]} in the background (logs: build/test-builds/)"

go_tests=""
stop_background() {
  if [[ -n "$go_tests" ]] && kill -0 "$go_tests" 2>/dev/null; then
    log "stopping the Go tests (the tests failed or were interrupted)"
    kill -TERM -- "-$go_tests" 2>/dev/null || true
    wait "$go_tests" 2>/dev/null || true
  fi
  if kill -0 "$builder" 2>/dev/null; then
    log "stopping the background builds (the tests failed or were interrupted)"
    kill -TERM -- "-$builder" 2>/dev/null || true
    wait "$builder" 2>/dev/null || true
  fi
}
trap stop_background EXIT

# await NAME: waits for the background build NAME; one line if it succeeded, else the tail of
# its log and how to build it by hand, and a failure.
await() {
  local name="$1" logfile="$ENHANCED_LOCKING_BUILD_LOGS/$1.log"
  local status_file="$ENHANCED_LOCKING_BUILD_LOGS/$1.status"
  if [[ ! -e "$status_file" ]]; then
    log "waiting for the background build of ${name}"
    while [[ ! -e "$status_file" ]] && kill -0 "$builder" 2>/dev/null; do
      sleep 2
    done
  fi
  local status
  status="$(cat "$status_file" 2>/dev/null || echo "none (the build was killed)")"
  if [[ "$status" == 0 ]]; then
    log "${name}: ready (built in $(cat "$ENHANCED_LOCKING_BUILD_LOGS/$1.seconds")s in the background; log: ${logfile#"$REPO_ROOT"/})"
    return
  fi
  tail -n 40 "$logfile" >&2 || true
  die "the background build of ${name} failed (exit status ${status}); its log: ${logfile#"$REPO_ROOT"/}; build it by hand: make ${name}"
}

# The tests start many `enhanced-locking` processes (serve, the CLI, kubectl locking).
# Where Python writes no bytecode (PYTHONDONTWRITEBYTECODE, as in many CI images) each of them
# compiled the package again, about 0.17 s a start: compiled once here, they all load it.
"${VENV:-.venv}/bin/python" -m compileall -q operator
"${PYTEST[@]}" tests/unit tests/integration

# The Go tests beside the e2e tier, in a process group of their own (job control on for that
# one start) so that a failing e2e tier stops them with every process they started.
go_log="$ENHANCED_LOCKING_BUILD_LOGS/test-go.log"
set -m
(
  for name in "${BUILDS[@]}"; do
    await "$name"
  done
  "${MAKE:-make}" test-go
) </dev/null >"$go_log" 2>&1 &
go_tests=$!
set +m
log "the Go tests run beside the e2e tier once Atlantis is built (log: ${go_log#"$REPO_ROOT"/})"

"${PYTEST[@]}" tests/e2e

if kill -0 "$go_tests" 2>/dev/null; then
  log "waiting for the Go tests"
fi
go_status=0
wait "$go_tests" || go_status=$?
go_tests=""
log "the Go tests' output (${go_log#"$REPO_ROOT"/}):"
cat "$go_log"
if [[ "$go_status" != 0 ]]; then
  die "the Go tests did not pass (exit status ${go_status}: a failed build or test, above); their log: ${go_log#"$REPO_ROOT"/}; run them by hand: make test-go"
fi
