#!/usr/bin/env bash
# Makes sure redis-server is installed (Debian's package). Tests start their own servers on
# free loopback ports; nothing is started here.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
debian_packages "redis-server is missing" redis-server
# The package starts a system service on port 6379; tests never use it, so stop it.
($SUDO systemctl disable --now redis-server >/dev/null 2>&1 || $SUDO service redis-server stop >/dev/null 2>&1) || true
