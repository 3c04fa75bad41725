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

# shellcheck disable=SC2034  # read by lib.sh's log
LOG_NAME="build-atlantis"
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

key_dir() {
  printf '%s/atlantis-%s\n' "$(cache_root)" "${ATLANTIS_VERSION}"
}

bin_path() {
  if [[ -n "${ENHANCED_LOCKING_ATLANTIS_BIN:-}" ]]; then
    printf '%s\n' "${ENHANCED_LOCKING_ATLANTIS_BIN}"
  else
    printf '%s/bin/atlantis\n' "$(key_dir)"
  fi
}

# True when the cache directory $1 holds the binary.
complete_in() {
  [[ -x "$1/bin/atlantis" ]]
}

# Compiles Atlantis in $1 into $2/bin/atlantis.
build_atlantis() {
  local src="$1" out="$2" v="v${ATLANTIS_VERSION}"
  log "building Atlantis ${v} with $(go env GOVERSION) (a few minutes the first time)"
  mkdir -p "$out/bin"
  # A small wrapper module that requires Atlantis: `go install pkg@version` would ask the proxy
  # for the module's version list (to report deprecations), which a pinned proxy may refuse.
  {
    printf 'module enhanced-locking.build/atlantis\n\n'
    go_directives <"$(go_module_file github.com/runatlantis/atlantis "$v" GoMod)"
    printf '\nrequire github.com/runatlantis/atlantis %s\n' "$v"
  } >"$src/go.mod"
  wrapper_build "$src" -ldflags "-s -w -X main.version=${v}" -o "$out/bin/atlantis" \
    "github.com/runatlantis/atlantis"
  "$out/bin/atlantis" version | grep -qF "${v}" || die "the built binary does not report ${v}"
}

main() {
  local print_only=0
  FORCE=0
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --print-bin) print_only=1 ;;
      --force) FORCE=1 ;;
      -h | --help)
        print_usage "${BASH_SOURCE[0]}"
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
  if [[ "$FORCE" != 1 ]] && complete_in "$(key_dir)"; then
    return
  fi
  cached_build atlantis "$(key_dir)" complete_in build_atlantis Atlantis
}

main "$@"
