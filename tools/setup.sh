#!/usr/bin/env bash
# Installs what the demo and the tests need, once: Debian packages (real servers, load
# tools, iptables, the NetfilterQueue build deps, Prometheus and promtool, chromium for the
# comparison report's page; debootstrap, systemd-nspawn, buildah and podman for the boot
# test and the container image) and a virtualenv in .venv with tcpcopyd.
# Sourced by tools/demo and tools/test; safe to run again (it only adds what is missing).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "$(id -u)" != 0 ]; then
    echo "run this as root (it installs packages and builds network namespaces)" >&2
    exit 1
fi
APT_PACKAGES=(python3 python3-venv python3-dev gcc libnetfilter-queue-dev iptables iproute2
              nginx-light memcached nghttp2-client curl wrk apache2-utils util-linux procps
              kmod tcpdump ethtool prometheus chromium
              debootstrap systemd-container buildah podman)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # do not start the packaged nginx/memcached services: the lab runs its own
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d.tcpcopyd
    chmod +x /usr/sbin/policy-rc.d.tcpcopyd
    had_policy=0; [ -e /usr/sbin/policy-rc.d ] && had_policy=1
    [ $had_policy = 0 ] && cp /usr/sbin/policy-rc.d.tcpcopyd /usr/sbin/policy-rc.d
    apt-get install -y -qq "${missing[@]}" >/dev/null
    [ $had_policy = 0 ] && rm -f /usr/sbin/policy-rc.d
    rm -f /usr/sbin/policy-rc.d.tcpcopyd
fi
# the group whose members may read the daemons' status (the Debian package makes it too)
getent group tcpcopyd >/dev/null || groupadd --system tcpcopyd
# the kernel's NFQUEUE support (built in on some kernels, modules on others)
modprobe -q nfnetlink_queue 2>/dev/null || true
modprobe -q xt_NFQUEUE 2>/dev/null || true
# the interpreter: $PYTHON, else the distribution's Python 3.11 (Debian 12's, the one the
# Debian package runs on: built with profile-guided and link-time optimisation, it runs the
# daemons 10-20 % cheaper than a plain source build such as pyenv's; BENCHMARKS.md), else
# python3 from PATH
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    PY=python3
    if [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import sys
sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
        PY=/usr/bin/python3
    fi
fi
VENV="$ROOT/.venv"
# a virtualenv of another interpreter is made again (and the compiled modules with it)
base_of() { "$1" -c 'import os, sys; print(os.path.realpath(sys._base_executable))'; }
if [ -x "$VENV/bin/python" ] && [ "$(base_of "$VENV/bin/python")" != "$(base_of "$PY")" ]; then
    echo "making $VENV again on $(base_of "$PY") (it was made on $(base_of "$VENV/bin/python"))"
    rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV"
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.tcpcopyd-installed"
# the compiled per-packet path (setup.py, tcpcopyd/native.py) is rebuilt when its library is
# missing or older than a source of it: an extension older than its .py would run stale code
# (TCPCOPYD_PURE=1 here builds and keeps the pure-Python package)
rebuild=0
[ -e "$stamp" ] || rebuild=1
for f in "$ROOT/pyproject.toml" "$ROOT/setup.py"; do
    [ "$f" -nt "$stamp" ] && rebuild=1
done
if [ -z "${TCPCOPYD_PURE:-}" ]; then
    lib="$(ls "$ROOT"/tcpcopyd_native__mypyc.*.so 2>/dev/null | head -1 || true)"
    [ -n "$lib" ] || rebuild=1
    compiled="$("$PY" -c 'import runpy, sys; n = runpy.run_path(sys.argv[1])
print("\n".join(str(n["source"](m, n["Path"](sys.argv[2]))) for m in n["COMPILED"]))' \
        "$ROOT/tcpcopyd/native.py" "$ROOT")"
    for f in "$ROOT/tcpcopyd/native.py" $compiled; do
        { [ -z "$lib" ] || [ "$f" -nt "$lib" ]; } && rebuild=1
    done
fi
if [ $rebuild = 1 ]; then
    echo "installing tcpcopyd (compiling its per-packet path) and its test tools into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e "$ROOT[test]"
    # what it did not recompile was up to date: mark the extensions as built from these sources
    find "$ROOT" -maxdepth 4 -name '*.so' -path "$ROOT/tcpcopyd*" -exec touch {} +
    touch "$stamp"
fi
