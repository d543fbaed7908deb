#!/usr/bin/env bash
# Installs the external tools the deploy tests use into .tools/bin (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .tools/bin
