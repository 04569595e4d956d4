#!/usr/bin/env bash
# Make a headless Chromium available for the HTML report's browser test
# (tests/container/test_report_html.py): use the one on PATH, else install Debian's `chromium`
# when running as root. Without root and without a browser it says so and exits 0: the test
# then skips, except under CI=true, where it fails.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "ensure-chromium: no chromium on PATH and this is not root: the browser test will not run" >&2
    [ "${CI:-}" = true ] && exit 1
    exit 0
fi
echo "ensure-chromium: installing Debian's chromium" >&2
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
command -v chromium >/dev/null
