#!/usr/bin/env bash
# Makes sure a headless browser is installed for the console's browser tests: Debian's
# chromium and chromium-driver (the WebDriver the tests drive through selenium). Nothing is
# downloaded outside Debian's packages; nothing is started here.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
APT_OPTIONS=--no-install-recommends debian_packages "chromium is missing" \
  chromium chromium-driver fonts-dejavu-core
