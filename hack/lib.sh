# What the hack/build-*.sh and hack/ensure-*.sh scripts share. Sourced, never run:
#
#   LOG_NAME=build-atlantis
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# It sets REPO_ROOT and the versions of hack/versions.env, and gives:
#   log / die               progress and errors on stderr, prefixed with [LOG_NAME]
#   cache_root              where slow builds are cached, outside the repository:
#                             ${ENHANCED_LOCKING_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/enhanced-locking}
#   cached_build            one build at a time per cache, into a stage, published atomically
#   go_module_file          a file the Go module proxy serves for a module version
#   go_directives           the "go" and "godebug" lines of a go.mod (stdin)
#   wrapper_build           go build inside a wrapper module, never downloading a toolchain
#   debian_packages         installs Debian's packages as root or with sudo
#   print_usage / help_if_asked
#                           a script's header comment, its --help
# shellcheck shell=bash

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091  # plain KEY=VALUE lines
source "${REPO_ROOT}/hack/versions.env"

log() { printf '[%s] %s\n' "${LOG_NAME:-hack}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# print_usage SCRIPT: SCRIPT's header comment, from its second line to `set -euo pipefail`
#   (what it does, its usage and environment): what its --help prints.
print_usage() { sed -n '2,/^set -euo/p' "$1" | sed '$d; s/^# \{0,1\}//'; }

# help_if_asked ARG...: with -h or --help first, prints the calling script's usage and exits 0,
#   before anything is checked, built or run.
help_if_asked() {
  case "${1:-}" in
    -h | --help) print_usage "${BASH_SOURCE[1]}"; exit 0 ;;
  esac
}

cache_root() {
  printf '%s\n' "${ENHANCED_LOCKING_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/enhanced-locking}"
}

# cached_build NAME KEY_DIR IS_COMPLETE BUILD [WHAT]
#   Builds into the cache directory KEY_DIR (named by the versions it holds) unless it is
#   complete already: `IS_COMPLETE KEY_DIR` succeeds. Holding the cache's lock for NAME (a
#   second caller waits, then finds the result), `BUILD SRC OUT` compiles in SRC and writes
#   into OUT, a staging directory that then replaces KEY_DIR in one rename: the versioned
#   directory appears whole or not at all, and a killed build leaves only a stage that the
#   next build removes. FORCE=1 rebuilds a complete one. WHAT names it in the log.
cached_build() {
  local name="$1" key_dir="$2" is_complete="$3" build="$4" what="${5:-$1}"
  local root stage started
  root="$(cache_root)"
  mkdir -p "$root"
  exec 9>"$root/.build-${name}.lock"
  if ! flock -n 9; then
    log "waiting for another build of ${what} to finish"
    flock 9
  fi
  if [[ "${FORCE:-0}" != 1 ]] && "$is_complete" "$key_dir"; then
    log "already built: $key_dir"
    return
  fi
  command -v go >/dev/null || die "the Go toolchain (go) is needed to build ${what}"
  # Holding the lock, any stage left for this name is from a build that was killed.
  rm -rf "$root/.build-${name}-"??????
  stage="$(mktemp -d "$root/.build-${name}-XXXXXX")"
  # shellcheck disable=SC2064
  trap "rm -rf '$stage'" EXIT
  trap 'exit 130' INT TERM
  started="$SECONDS"
  mkdir -p "$stage/src" "$stage/out"
  "$build" "$stage/src" "$stage/out"
  if [[ -e "$key_dir" ]]; then
    mv "$key_dir" "$stage/previous"
  fi
  mkdir -p "$(dirname "$key_dir")"
  mv -T "$stage/out" "$key_dir"
  log "built in $((SECONDS - started))s: $key_dir"
}

# go_module_file MODULE VERSION FIELD
#   The path of a file the Go module proxy serves for MODULE@VERSION: FIELD is GoMod (its
#   go.mod) or Info (JSON with the release "Time").
go_module_file() {
  local file
  file="$(go mod download -json "$1@$2" 2>/dev/null | sed -n "s/^\t\"$3\": \"\(.*\)\",\$/\1/p")"
  [[ -n "$file" && -f "$file" ]] || die "cannot download $1@$2 from the Go module proxy"
  printf '%s\n' "$file"
}

# The "go" and "godebug" lines of a go.mod on stdin, so that a wrapper module builds with the
# language version and GODEBUG defaults its upstream chose.
go_directives() {
  grep -E '^(go|godebug) ' || true
}

# wrapper_build DIR GO-BUILD-ARGUMENTS...
#   go build inside the wrapper module in DIR, static. GOTOOLCHAIN=local: a clear failure when
#   the local Go is older than the module asks, never a silent toolchain download.
wrapper_build() {
  local dir="$1"
  shift
  (cd "$dir" && CGO_ENABLED=0 GOTOOLCHAIN=local go build -mod=mod -trimpath "$@")
}

# debian_packages MISSING PACKAGE...
#   Installs Debian's PACKAGEs (apt-get, as root or with sudo; APT_OPTIONS adds options).
#   Without either, prints "MISSING: install Debian's packages (apt-get install PACKAGE...)"
#   and exits 1. Sets SUDO for what the caller runs after it.
debian_packages() {
  local missing="$1"
  shift
  if [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null 2>&1; then
    echo "${missing}: install Debian's packages (apt-get install $*)" >&2
    exit 1
  fi
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "installing $* from Debian's packages" >&2
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086  # APT_OPTIONS is a list of words
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq ${APT_OPTIONS:-} "$@" >/dev/null
}
