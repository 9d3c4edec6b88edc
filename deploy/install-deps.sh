#!/usr/bin/env bash
# Installs the system packages the build and the cluster need, when missing (Debian/Ubuntu):
# etcd for membership, protoc and its well-known types for etcd-client's build script, and
# python3 with pip (and venv) for fetching the model and checking the Helm chart, and a TrueType
# font for the charts pd-bench draws.
set -euo pipefail

missing=()
command -v etcd >/dev/null || missing+=(etcd-server)
command -v protoc >/dev/null || missing+=(protobuf-compiler)
[ -n "${PROTOC_INCLUDE:-}" ] || [ -e /usr/include/google/protobuf/descriptor.proto ] ||
    missing+=(libprotobuf-dev)
command -v python3 >/dev/null || missing+=(python3)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
# The chart checks install their packages into a virtual environment.
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || [ -n "${PD_PLOT_FONT:-}" ] ||
    missing+=(fonts-dejavu-core)
if [ "${#missing[@]}" -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${missing[@]}"
fi
