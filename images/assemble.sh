#!/usr/bin/env bash
# Assembles a bootable ext4 root filesystem from a recipe's root tar and the banger-agent binary.
# Usage: assemble.sh ROOTFS.tar AGENT_BINARY OUTPUT.ext4 [SIZE (default 2G)]
# The output is sparse: SIZE is the guest's disk size, not space used on the host.
set -euo pipefail
tar_in="$1"; agent="$2"; out="$3"; size="${4:-2G}"
dir="$(mktemp -d)"; trap 'rm -rf "$dir"' EXIT
tar -C "$dir" --numeric-owner -xf "$tar_in"
install -D -m 0755 "$agent" "$dir/usr/local/bin/banger-agent"
mkdir -p "$dir/etc/banger"
"$agent" version > "$dir/etc/banger/agent-version"
rm -f "$out.tmp"
mkfs.ext4 -q -F -L banger-root -d "$dir" "$out.tmp" "$size"
mv "$out.tmp" "$out"
