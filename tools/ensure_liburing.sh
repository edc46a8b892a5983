#!/usr/bin/env bash
# Make sure liburing's header and library are present for the native Prism build.
# Installs Debian/Ubuntu's liburing-dev when missing and we are root; otherwise says
# what to run. Exits non-zero only when FFLNODE_REQUIRE_NATIVE=1 and it cannot be had.
set -euo pipefail
if [ -e /usr/include/liburing.h ] || [ -e /usr/local/include/liburing.h ]; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "fflnode: installing liburing-dev for the native io_uring reader" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q liburing-dev >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q liburing-dev >/dev/null; }
    exit 0
fi
msg="fflnode: liburing-dev is missing; run 'sudo apt-get install liburing-dev' for the io_uring backend"
if [ "${FFLNODE_REQUIRE_NATIVE:-0}" = "1" ]; then
    echo "$msg" >&2
    exit 1
fi
echo "$msg (continuing with the fallback backend)" >&2
