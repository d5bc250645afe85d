#!/usr/bin/env bash
# The Kubernetes manifests under k8s/, checked offline (no cluster needed).
#
#   scripts/validate-manifests.sh install   install the tools (idempotent)
#   scripts/validate-manifests.sh           install them, then run tests/test_manifests.py
#
# The checks themselves live in tests/test_manifests.py (part of the normal
# pytest run): yamllint, `kubectl kustomize` of the base and every overlay,
# kubernetes-validate --strict, the CRD objects against their schemas, checkov,
# `promtool check rules`, PromQL parsing, every metric name against a running
# sidecar's /metrics, the sidecar config through check-config, the shutdown
# grace, and the security settings of every container. A missing tool makes
# those tests fail, never skip.
#
# Where the tools go:
#   - checkov, kubernetes-validate and yamllint: their own virtualenv,
#     .cache/manifest-tools/venv (checkov pins aiohttp and packaging below the
#     project's own ranges; kept apart, it cannot hold the project's versions
#     back). Exact versions: a new checkov brings new checks, so bump on purpose.
#   - promql-parser and jsonschema, which the tests import: into the project's
#     Python ($PYTHON, default .venv/bin/python, else python3).
#   - promtool: extracted from Debian's `prometheus` package into
#     .cache/manifest-tools/bin (no server installed, nothing started).
#   - kubectl (with its built-in kustomize): preinstalled on the project's
#     machines; this script only checks that it is there.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS=.cache/manifest-tools
CLI_TOOLS=("checkov==3.3.30" "kubernetes-validate==1.37.0" "yamllint==1.38.0")
TEST_LIBS=("promql-parser>=0.11,<1" "jsonschema>=4.18,<5")

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

install_tools() {
    # The command-line tools, in their own virtualenv.
    if [[ ! -x "$TOOLS/venv/bin/python" ]]; then
        python3 -m venv "$TOOLS/venv"
    fi
    local installed missing=()
    installed=$("$TOOLS/venv/bin/python" -m pip freeze --disable-pip-version-check 2>/dev/null || true)
    for spec in "${CLI_TOOLS[@]}"; do
        grep -qixF -e "$spec" <<<"$installed" || missing+=("$spec")
    done
    if ((${#missing[@]})); then
        echo "== installing ${missing[*]} into $TOOLS/venv"
        "$TOOLS/venv/bin/python" -m pip install --quiet --disable-pip-version-check "${CLI_TOOLS[@]}"
    fi

    # The libraries the tests import, in the project's Python.
    if ! "$PYTHON" -c "import promql_parser, jsonschema" 2>/dev/null; then
        echo "== installing ${TEST_LIBS[*]} with $PYTHON"
        "$PYTHON" -m pip install --quiet --disable-pip-version-check "${TEST_LIBS[@]}"
    fi

    # promtool, out of Debian's prometheus package (a static binary).
    if [[ ! -x "$TOOLS/bin/promtool" ]]; then
        echo "== extracting promtool from Debian's prometheus package into $TOOLS/bin"
        local work
        work=$(mktemp -d)
        # _apt cannot write into a root-only mktemp directory; let it.
        chmod 755 "$work"
        if ! (cd "$work" && apt-get download prometheus >/dev/null 2>&1); then
            if [[ $(id -u) -eq 0 ]]; then
                apt-get update -qq >/dev/null
            else
                sudo apt-get update -qq >/dev/null
            fi
            (cd "$work" && apt-get download prometheus >/dev/null)
        fi
        dpkg-deb -x "$work"/prometheus_*.deb "$work/x"
        mkdir -p "$TOOLS/bin"
        install -m 755 "$work/x/usr/bin/promtool" "$TOOLS/bin/promtool"
        rm -rf "$work"
    fi

    if ! command -v kubectl >/dev/null; then
        echo "kubectl is missing: the tests render k8s/ with 'kubectl kustomize'." >&2
        echo "It is preinstalled on the project's machines; elsewhere install kubectl >= 1.27." >&2
        exit 1
    fi

    echo "== manifest tools: $("$TOOLS/venv/bin/checkov" --version 2>/dev/null | tail -1) (checkov)," \
        "$("$TOOLS/venv/bin/kubernetes-validate" --version 2>&1 | tail -1)," \
        "$("$TOOLS/venv/bin/yamllint" --version 2>&1)," \
        "$("$TOOLS/bin/promtool" --version 2>&1 | head -1 | cut -d' ' -f1-3)," \
        "kubectl $(kubectl version --client 2>/dev/null | head -1 | awk '{print $3}')"
}

case "${1:-check}" in
    install)
        install_tools
        ;;
    check)
        install_tools
        exec "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_manifests.py
        ;;
    *)
        echo "usage: $0 [install|check]" >&2
        exit 2
        ;;
esac
