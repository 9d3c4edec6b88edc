#!/usr/bin/env bash
# Makes the base image of pd-cluster from nothing: a minimal Debian root file system built with
# debootstrap from Debian's packages (etcd-server in it, the non-root user `pd` added, docs and
# caches dropped), then `docker import`ed. No registry is needed.
#
# The image is tagged pd-cluster-base:<hash of this script and its inputs>; when that tag exists
# already, nothing is rebuilt. Prints the tag on its last line.
#
# Usage: deploy/docker/rootfs.sh [--rebuild]
# Environment: PD_DEBIAN_SUITE (default bookworm), PD_DEBIAN_MIRROR (default: debootstrap's own),
# PD_BASE_PACKAGES (extra packages, comma-separated).
set -euo pipefail

suite=${PD_DEBIAN_SUITE:-bookworm}
mirror=${PD_DEBIAN_MIRROR:-}
# etcd-server: the compose file and a small Kubernetes install run etcd from this image too.
packages=etcd-server${PD_BASE_PACKAGES:+,$PD_BASE_PACKAGES}
# The uid/gid the nodes run as; numeric in the image so Kubernetes' runAsNonRoot can check it.
uid=10001
rebuild=0
[ "${1:-}" = "--rebuild" ] && rebuild=1

hash=$( { cat "$0"; echo "$suite $mirror $packages $uid"; } | sha256sum | cut -c1-16)
tag=pd-cluster-base:$hash
if [ "$rebuild" = 0 ] && docker image inspect "$tag" >/dev/null 2>&1; then
    echo "base image $tag is up to date" >&2
    echo "$tag"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || { echo "rootfs.sh: debootstrap needs root" >&2; exit 1; }
if ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >&2
fi

root=$(mktemp -d /var/tmp/pd-rootfs.XXXXXX)
cleanup() {
    # debootstrap may leave /proc or /sys mounted inside when it fails half-way.
    for m in proc sys dev/pts; do umount -l "$root/$m" 2>/dev/null || true; done
    rm -rf "$root"
}
trap cleanup EXIT

started=$(date +%s)
echo "debootstrap $suite (minbase + $packages) ..." >&2
log=$(mktemp /var/tmp/pd-debootstrap.XXXXXX.log)
# shellcheck disable=SC2086
if ! debootstrap --variant=minbase --include="$packages" "$suite" "$root" $mirror >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "rootfs.sh: debootstrap failed; its whole log is $log" >&2
    exit 1
fi
rm -f "$log"

# The user the nodes run as, with a home for tools that want one.
chroot "$root" groupadd --system --gid "$uid" pd
chroot "$root" useradd --system --uid "$uid" --gid pd --home-dir /home/pd --create-home \
    --shell /usr/sbin/nologin pd
# etcd's data directory, writable by that user (a volume mounted there keeps the ownership).
install -d -o "$uid" -g "$uid" "$root/var/lib/etcd"

# What a server image does not need: docs, man pages, translations, package caches and logs.
# Later installs keep them out too.
cat > "$root/etc/dpkg/dpkg.cfg.d/01-pd-cluster-nodoc" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
CFG
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$root/usr/share/man" "$root/usr/share/info" "$root/usr/share/locale" \
    "$root/usr/share/lintian" "$root/var/cache/apt/"*.bin "$root/var/cache/apt/archives/"*.deb \
    "$root/var/lib/apt/lists/"* "$root/var/log/"* "$root/tmp/"*
# docker manages these per container.
: > "$root/etc/hostname"
rm -f "$root/etc/resolv.conf"

tar --numeric-owner -C "$root" -c . | docker import \
    --message "pd-cluster base: debootstrap $suite minbase + $packages" - "$tag" >&2
echo "base image $tag built in $(( $(date +%s) - started )) s" >&2
echo "$tag"
