#!/usr/bin/env bash
# Makes sure a redis-server binary exists for the test suite (tests/redis_server.py starts its
# own throwaway servers on 127.0.0.1 and free ports; nothing here starts one). Idempotent:
# does nothing when redis-server is already on PATH (or $OLLAMA_SIDECAR_REDIS_SERVER is set).
# Installs Debian's redis-server (7.x) with apt-get otherwise; needs root or sudo.
set -euo pipefail

if [[ -n "${OLLAMA_SIDECAR_REDIS_SERVER:-}" && -x "${OLLAMA_SIDECAR_REDIS_SERVER}" ]]; then
    echo "redis-server: ${OLLAMA_SIDECAR_REDIS_SERVER} ($("${OLLAMA_SIDECAR_REDIS_SERVER}" --version))"
    exit 0
fi
if command -v redis-server >/dev/null 2>&1; then
    echo "redis-server: $(command -v redis-server) ($(redis-server --version))"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "redis-server is missing and apt-get is not available: install Redis >= 7 yourself," >&2
    echo "or point OLLAMA_SIDECAR_REDIS_SERVER at a redis-server binary." >&2
    exit 1
fi
SUDO=()
if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { echo "need root or sudo to apt-get install redis-server" >&2; exit 1; }
    SUDO=(sudo)
fi
echo "installing redis-server with apt-get"
export DEBIAN_FRONTEND=noninteractive
if ! "${SUDO[@]}" apt-get install -y --no-install-recommends redis-server >/dev/null; then
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" apt-get install -y --no-install-recommends redis-server >/dev/null
fi
# Debian's package may try to start a service; the tests never use it. Nothing to undo
# without systemd (containers), and a running system service on 6379 does not disturb the
# tests, which use free ports.
echo "redis-server: $(command -v redis-server) ($(redis-server --version))"
