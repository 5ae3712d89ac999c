#!/usr/bin/env bash
# Recipe: debian-minimal. Debian bookworm (minbase) with what banger's features use inside a guest:
# git (workspace prepare/export), iproute2, procps, OpenSSH server (vm ssh), busybox's small network tools
# (nc, wget, ping). Output: a tar of the root filesystem; banger adds its guest agent when it assembles
# the image. Usage: recipe.sh OUTPUT.tar
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib/debian.sh"
out="$1"
dir="$(mktemp -d)"; trap 'rm -rf "$dir"' EXIT
debian_rootfs "$dir" ""
finish_rootfs "$dir" debian-minimal "$out"
