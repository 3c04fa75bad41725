#!/usr/bin/env bash
# Builds the Atlantis server binary that the tests run against, from the Go module proxy.
#
# `go install github.com/runatlantis/atlantis@v<ATLANTIS_VERSION>` with the local Go toolchain,
# at the version named in hack/versions.env. The binary is cached outside the repository, keyed
# by that version, under the same cache root as the control plane:
#
#   ${ENHANCED_LOCKING_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/enhanced-locking}
#       /atlantis-<ATLANTIS_VERSION>/bin/atlantis
#
# Usage: hack/build-atlantis.sh [--print-bin] [--force]
#   (no flag)    build if needed; print progress on stderr
#   --print-bin  print the path of the binary (built or not)
#   --force      rebuild even if the cache holds a binary
#
# Environment:
#   ENHANCED_LOCKING_ATLANTIS_BIN  an Atlantis binary to use as is: nothing is built
#   ENHANCED_LOCKING_CACHE_DIR     the cache root (default above)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091  # plain KEY=VALUE lines
source "${REPO_ROOT}/hack/versions.env"

log() { printf '[build-atlantis] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

cache_root() {
  printf '%s\n' "${ENHANCED_LOCKING_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/enhanced-locking}"
}

bin_path() {
  if [[ -n "${ENHANCED_LOCKING_ATLANTIS_BIN:-}" ]]; then
    printf '%s\n' "${ENHANCED_LOCKING_ATLANTIS_BIN}"
  else
    printf '%s/atlantis-%s/bin/atlantis\n' "$(cache_root)" "${ATLANTIS_VERSION}"
  fi
}

# Prints the path of the go.mod that the proxy serves for Atlantis.
module_file() {
  local file
  file="$(go mod download -json "github.com/runatlantis/atlantis@v${ATLANTIS_VERSION}" 2>/dev/null |
    sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p')"
  [[ -n "$file" && -f "$file" ]] ||
    die "cannot download github.com/runatlantis/atlantis@v${ATLANTIS_VERSION} from the Go module proxy"
  printf '%s\n' "$file"
}

build() {
  local root final stage started v="v${ATLANTIS_VERSION}"
  root="$(cache_root)"
  final="$(bin_path)"
  mkdir -p "$root"
  # One build at a time per cache; a second caller waits, then finds the binary.
  exec 9>"$root/.build-atlantis.lock"
  if ! flock -n 9; then
    log "waiting for another build of Atlantis to finish"
    flock 9
  fi
  if [[ "${FORCE:-0}" != 1 && -x "$final" ]]; then
    log "already built: $final"
    return
  fi
  command -v go >/dev/null || die "the Go toolchain (go) is needed to build Atlantis"
  rm -rf "$root"/.build-atlantis-*
  stage="$(mktemp -d "$root/.build-atlantis-XXXXXX")"
  # shellcheck disable=SC2064
  trap "rm -rf '$stage'" EXIT
  trap 'exit 130' INT TERM
  started="$SECONDS"
  log "building Atlantis ${v} with $(go env GOVERSION) (a few minutes the first time)"
  # A small wrapper module that requires Atlantis: `go install pkg@version` would ask the proxy
  # for the module's version list (to report deprecations), which a pinned proxy may refuse.
  mkdir -p "$stage/src" "$stage/bin"
  {
    printf 'module enhanced-locking.build/atlantis\n\n'
    grep -E '^(go|godebug) ' "$(module_file)" || true
    printf '\nrequire github.com/runatlantis/atlantis %s\n' "$v"
  } >"$stage/src/go.mod"
  # GOTOOLCHAIN=local: a clear failure when the local Go is older than Atlantis's go.mod asks,
  # never a silent toolchain download.
  (cd "$stage/src" && CGO_ENABLED=0 GOTOOLCHAIN=local go build -mod=mod -trimpath \
    -ldflags "-s -w -X main.version=${v}" -o "$stage/bin/atlantis" "github.com/runatlantis/atlantis")
  rm -rf "$stage/src"
  "$stage/bin/atlantis" version | grep -qF "${v}" || die "the built binary does not report ${v}"
  # Publish atomically: the versioned directory appears whole or not at all.
  mkdir -p "$(dirname "$(dirname "$final")")"
  rm -rf "$(dirname "$(dirname "$final")")"
  mv -T "$stage" "$(dirname "$(dirname "$final")")"
  trap - EXIT
  log "built in $((SECONDS - started))s: $final"
}

main() {
  local print_only=0
  FORCE=0
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --print-bin) print_only=1 ;;
      --force) FORCE=1 ;;
      -h | --help)
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
        return
        ;;
      *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
  done
  if [[ "$print_only" == 1 ]]; then
    bin_path
    return
  fi
  if [[ -n "${ENHANCED_LOCKING_ATLANTIS_BIN:-}" ]]; then
    [[ -x "${ENHANCED_LOCKING_ATLANTIS_BIN}" ]] ||
      die "ENHANCED_LOCKING_ATLANTIS_BIN=${ENHANCED_LOCKING_ATLANTIS_BIN} is not an executable"
    log "using ENHANCED_LOCKING_ATLANTIS_BIN=${ENHANCED_LOCKING_ATLANTIS_BIN}"
    return
  fi
  if [[ "$FORCE" != 1 && -x "$(bin_path)" ]]; then
    return
  fi
  build
}

main "$@"
