#!/usr/bin/env bash
# Recipe: debian-minimal. Debian bookworm (minbase) with what banger's features use inside a guest:
# git (workspace prepare/export), iproute2, procps, OpenSSH server (vm ssh). Output: a tar of the root
# filesystem; banger adds its guest agent when it assembles the image. busybox brings small network tools
# (nc, wget, ping) that tests and users reach for. Host keys are deleted here and
# generated per VM at first boot, so no secret is ever baked into an image.
# Usage: recipe.sh OUTPUT.tar
set -euo pipefail
out="$1"
mirror="${BANGER_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
dir="$(mktemp -d)"; trap 'rm -rf "$dir"' EXIT
debootstrap --variant=minbase \
  --include=iproute2,procps,git,openssh-server,ca-certificates,less,busybox \
  bookworm "$dir" "$mirror" >/dev/null
rm -f "$dir"/etc/ssh/ssh_host_*
rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
echo "debian-minimal" > "$dir/etc/hostname"
tar -C "$dir" --numeric-owner -cf "$out.tmp" .
mv "$out.tmp" "$out"
