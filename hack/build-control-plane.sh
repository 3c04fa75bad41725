#!/usr/bin/env bash
# Builds a Kubernetes control plane for the tests from Go modules:
#   etcd, kube-apiserver, kube-controller-manager, kubectl and helm.
#
# No container image or release tarball is needed: every binary is compiled
# from the Go module proxy with the local Go toolchain, at the versions named
# in hack/versions.env. The binaries are cached outside the repository, keyed
# by those versions, so the (slow) build happens once per machine:
#
#   ${ENHANCED_LOCKING_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/enhanced-locking}
#       /k8s-<K8S>-etcd-<ETCD>-helm-<HELM>/bin
#
# etcd is built first and cached on its own as well (/etcd-<ETCD>/bin/etcd): it is all the
# unit and integration tests need, so `make test` builds it alone (--etcd) before they start
# and builds the rest while they run; the full build then copies it instead of compiling it
# again.
#
# k8s.io/kubernetes is not meant to be used as a dependency: its go.mod
# requires its "staging" modules (k8s.io/api, k8s.io/client-go, ...) at
# v0.0.0 and replaces them with directories of its own source tree. So the
# build generates a small wrapper module that requires k8s.io/kubernetes and
# replaces each staging module with its published v0.<minor>.<patch> release.
# The list of staging modules is derived from the .mod file the proxy serves.
#
# Usage: hack/build-control-plane.sh [--etcd] [--print-bin-dir] [--force]
#   (no flag)        build if needed; print progress on stderr
#   --etcd           etcd alone (nothing to do when the full build is cached already)
#   --print-bin-dir  print the directory that holds (or will hold) the binaries
#                    (with --etcd: the one etcd is used from)
#   --force          rebuild even if the cache is complete
#
# Environment:
#   ENHANCED_LOCKING_K8S_BIN    a directory that already holds the binaries:
#                               used as is, nothing is built
#   ENHANCED_LOCKING_CACHE_DIR  the cache root (default above)
set -euo pipefail

# shellcheck disable=SC2034  # read by lib.sh's log
LOG_NAME="build-control-plane"
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BINARIES=(etcd kube-apiserver kube-controller-manager kubectl helm)

cache_key() {
  printf 'k8s-%s-etcd-%s-helm-%s\n' "${K8S_VERSION}" "${ETCD_VERSION}" "${HELM_VERSION}"
}

etcd_key() {
  printf 'etcd-%s\n' "${ETCD_VERSION}"
}

# The directory the binaries are used from: ENHANCED_LOCKING_K8S_BIN or the cache.
bin_dir() {
  if [[ -n "${ENHANCED_LOCKING_K8S_BIN:-}" ]]; then
    printf '%s\n' "${ENHANCED_LOCKING_K8S_BIN}"
  else
    printf '%s/%s/bin\n' "$(cache_root)" "$(cache_key)"
  fi
}

# The directory etcd is used from: that of the full build if it holds etcd, else etcd's own.
etcd_bin_dir() {
  if [[ -n "${ENHANCED_LOCKING_K8S_BIN:-}" || -x "$(bin_dir)/etcd" ]]; then
    bin_dir
  else
    printf '%s/%s/bin\n' "$(cache_root)" "$(etcd_key)"
  fi
}

# True when every binary is present and executable in directory $1.
complete_in() {
  local b
  for b in "${BINARIES[@]}"; do
    [[ -x "$1/$b" ]] || return 1
  done
}

# Prints the go.mod text that the proxy serves for module $1 at version $2.
upstream_mod() {
  local gomod
  gomod="$(go_module_file "$1" "$2" GoMod)"
  cat "$gomod"
}

# Prints the k8s.io staging modules of a k8s.io/kubernetes go.mod: the ones
# it requires at the placeholder version v0.0.0.
staging_modules() {
  awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" { print $1 }' | sort -u
}

# Writes a wrapper go.mod into directory $1 for module path $2; the rest of
# the go.mod text is read from stdin.
write_wrapper() {
  mkdir -p "$1"
  { printf 'module %s\n\n' "$2"; cat; } >"$1/go.mod"
}

# Compiles etcd in $1 into $2/bin/etcd (etcd's own cache directory) and runs it once.
build_etcd() {
  local work="$1/etcd" out="$2/bin" mod="go.etcd.io/etcd/server/v3" v="v${ETCD_VERSION}"
  log "building etcd with $(go env GOVERSION)"
  mkdir -p "$out"
  log "etcd ${v}: resolving ${mod}"
  {
    upstream_mod "$mod" "$v" | go_directives
    printf '\nrequire %s %s\n' "$mod" "$v"
  } | write_wrapper "$work" "enhanced-locking.build/etcd"
  log "etcd ${v}: compiling"
  wrapper_build "$work" -ldflags "-s -w" -o "$out/etcd" "$mod"
  "$out/etcd" --version >/dev/null
}

# True when the cache directory $1 holds etcd.
etcd_complete() {
  [[ -x "$1/bin/etcd" ]]
}

# etcd, cached on its own (its build holds its own lock: the full build, holding the control
# plane's, runs this script with --etcd and copies the result).
ensure_etcd() {
  if [[ "$FORCE" != 1 ]] && [[ -x "$(etcd_bin_dir)/etcd" ]]; then
    return
  fi
  cached_build etcd "$(cache_root)/$(etcd_key)" etcd_complete build_etcd etcd
}

build_kubernetes() {
  local work="$1/kubernetes" out="$2" v="v${K8S_VERSION}" staging_v upstream build_date
  local major minor
  staging_v="v0.${K8S_VERSION#*.}"
  major="${K8S_VERSION%%.*}"
  minor="${K8S_VERSION#*.}"
  minor="${minor%%.*}"
  log "kubernetes ${v}: resolving k8s.io/kubernetes and its staging modules at ${staging_v}"
  upstream="$(upstream_mod k8s.io/kubernetes "$v")"
  local staging module
  staging="$(staging_modules <<<"$upstream")"
  [[ -n "$staging" ]] || die "found no staging modules in the go.mod of k8s.io/kubernetes@${v}"
  log "kubernetes ${v}: $(wc -l <<<"$staging") staging modules"
  {
    go_directives <<<"$upstream"
    printf '\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$v"
    while read -r module; do
      printf '\t%s => %s %s\n' "$module" "$module" "$staging_v"
    done <<<"$staging"
    printf ')\n'
  } | write_wrapper "$work" "enhanced-locking.build/kubernetes"
  # The release date of the module stands in for the build date: the same
  # version then builds the same binaries on every machine.
  build_date="$(sed -n 's/.*"Time": *"\([^"]*\)".*/\1/p' "$(go_module_file k8s.io/kubernetes "$v" Info)")"
  local ldflags="-s -w" pkg key val
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    for key in gitVersion gitMajor gitMinor gitCommit gitTreeState buildDate; do
      case "$key" in
        gitVersion) val="$v" ;;
        gitMajor) val="$major" ;;
        gitMinor) val="$minor" ;;
        gitCommit) val="" ;;
        gitTreeState) val="clean" ;;
        buildDate) val="${build_date:-1970-01-01T00:00:00Z}" ;;
      esac
      ldflags+=" -X '${pkg}.${key}=${val}'"
    done
  done
  log "kubernetes ${v}: compiling kube-apiserver, kube-controller-manager and kubectl (the long part)"
  wrapper_build "$work" -ldflags "$ldflags" -o "$out/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kubectl
}

build_helm() {
  local work="$1/helm" out="$2" mod="helm.sh/helm/v3" v="v${HELM_VERSION}"
  log "helm ${v}: resolving ${mod}"
  {
    upstream_mod "$mod" "$v" | go_directives
    printf '\nrequire %s %s\n' "$mod" "$v"
  } | write_wrapper "$work" "enhanced-locking.build/helm"
  # As helm's own Makefile does: the default Kubernetes version for charts
  # follows the client-go it is built with (v0.Y.Z means Kubernetes 1.Y).
  local client_go kmajor kminor
  client_go="$(cd "$work" && GOTOOLCHAIN=local go list -mod=mod -m -f '{{.Version}}' k8s.io/client-go)"
  client_go="${client_go#v}"
  kmajor="$((${client_go%%.*} + 1))"
  kminor="${client_go#*.}"
  kminor="${kminor%%.*}"
  local ldflags="-s -w -X ${mod}/internal/version.version=${v} -X ${mod}/internal/version.metadata="
  ldflags+=" -X ${mod}/internal/version.gitTreeState=clean"
  ldflags+=" -X ${mod}/pkg/lint/rules.k8sVersionMajor=${kmajor} -X ${mod}/pkg/lint/rules.k8sVersionMinor=${kminor}"
  ldflags+=" -X ${mod}/pkg/chartutil.k8sVersionMajor=${kmajor} -X ${mod}/pkg/chartutil.k8sVersionMinor=${kminor}"
  log "helm ${v}: compiling"
  wrapper_build "$work" -ldflags "$ldflags" -o "$out/helm" "${mod}/cmd/helm"
}

# Runs each fresh binary once, so a broken build never reaches the cache.
smoke_test() {
  local out="$1"
  "$out/etcd" --version >/dev/null
  "$out/kube-apiserver" --version | grep -qF "v${K8S_VERSION}" ||
    die "kube-apiserver does not report v${K8S_VERSION}"
  "$out/kube-controller-manager" --version >/dev/null
  "$out/kubectl" version --client >/dev/null
  "$out/helm" version --short >/dev/null
}

# Compiles every binary in $1 into $2/bin (etcd through its own cache), then runs each once.
build_all() {
  local src="$1" out="$2/bin"
  log "building with $(go env GOVERSION) (takes many minutes the first time)"
  mkdir -p "$out"
  local etcd_only=(--etcd)
  [[ "$FORCE" != 1 ]] || etcd_only+=(--force)
  "${BASH_SOURCE[0]}" "${etcd_only[@]}"
  cp "$(etcd_bin_dir)/etcd" "$out/etcd"
  build_kubernetes "$src" "$out"
  build_helm "$src" "$out"
  smoke_test "$out"
}

# True when the cache directory $1 holds every binary.
complete_key() {
  complete_in "$1/bin"
}

main() {
  local print_only=0 etcd_only=0
  FORCE=0
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --etcd) etcd_only=1 ;;
      --print-bin-dir) print_only=1 ;;
      --force) FORCE=1 ;;
      -h | --help)
        print_usage "${BASH_SOURCE[0]}"
        return
        ;;
      *) die "unknown argument: $1 (see --help)" ;;
    esac
    shift
  done
  if [[ "$print_only" == 1 && "$etcd_only" == 1 ]]; then
    etcd_bin_dir
    return
  fi
  if [[ "$print_only" == 1 ]]; then
    bin_dir
    return
  fi
  if [[ -n "${ENHANCED_LOCKING_K8S_BIN:-}" && "$etcd_only" == 1 ]]; then
    [[ -x "${ENHANCED_LOCKING_K8S_BIN}/etcd" ]] ||
      die "ENHANCED_LOCKING_K8S_BIN=${ENHANCED_LOCKING_K8S_BIN} lacks etcd"
    return
  fi
  if [[ -n "${ENHANCED_LOCKING_K8S_BIN:-}" ]]; then
    complete_in "${ENHANCED_LOCKING_K8S_BIN}" ||
      die "ENHANCED_LOCKING_K8S_BIN=${ENHANCED_LOCKING_K8S_BIN} lacks one of: ${BINARIES[*]}"
    log "using ENHANCED_LOCKING_K8S_BIN=${ENHANCED_LOCKING_K8S_BIN}"
    return
  fi
  if [[ "$etcd_only" == 1 ]]; then
    ensure_etcd
    return
  fi
  if [[ "$FORCE" != 1 ]] && complete_in "$(bin_dir)"; then
    return
  fi
  cached_build control-plane "$(cache_root)/$(cache_key)" complete_key build_all \
    "the control plane"
}

main "$@"
