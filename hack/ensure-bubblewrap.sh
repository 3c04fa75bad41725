#!/usr/bin/env bash
# Makes sure bubblewrap (bwrap) is installed (Debian's package). The chart's e2e tests run the
# operator the way the image runs it (user 65532, read-only root filesystem, only /data and
# /tmp writable) in a bubblewrap sandbox, since no container engine runs here.
set -euo pipefail
if command -v bwrap >/dev/null 2>&1; then
  exit 0
fi
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
debian_packages "bwrap is missing" bubblewrap
