#!/usr/bin/env bash
# Programs the test suite starts besides Python packages: PostgreSQL (the control plane's shared
# store, tests/integration/test_control.py) and Chromium (the dashboard, test_dashboard.py), and the
# library python graders' sandbox loads (libseccomp), from Debian's packages. Nothing is installed
# when all are already there.
set -euo pipefail
need=()
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  need+=(postgresql)
fi
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  need+=(chromium)
fi
if ! ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2'; then
  need+=(libseccomp2)
fi
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: the tests need ${need[*]}; install them with your package manager" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
echo "installing ${need[*]} (Debian packages) for the tests"
$sudo apt-get update -q >/dev/null
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
