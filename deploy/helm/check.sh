#!/usr/bin/env bash
# Checks the Helm chart without a Kubernetes cluster (see test_chart.py): renders it with Helm's
# engine for every values file, validates the objects strictly against two Kubernetes versions,
# lints it, and checks the deployment policy. Installs its hash-pinned Python packages into a
# virtual environment under .cache/ once per requirements.txt.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
req="$here/requirements.txt"
venv="$repo/.cache/helm-venv-$(sha256sum "$req" | cut -c1-12)"
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.installed" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --require-hashes \
        --only-binary=:all: -r "$req"
    touch "$venv/.installed"
fi
cd "$here"
exec "$venv/bin/python" -m unittest -v test_chart "$@"
