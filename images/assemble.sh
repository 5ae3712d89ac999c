#!/usr/bin/env bash
# Assembles a bootable ext4 root filesystem from a recipe's root tar (or a root folder, which it changes in
# place) and the banger-agent binary, plus the image's work seed: /root as its own ext4 (label banger-work),
# which every VM of the image clones for its work disk.
# Usage: assemble.sh ROOTFS.tar|ROOT_DIR AGENT_BINARY OUTPUT.ext4 [SIZE (default 2G)]
# Writes OUTPUT.ext4 and OUTPUT.work.ext4 (next to it, with .work before .ext4). Both are sparse.
# BANGER_IMAGE_STAMP, when set, is written to /etc/banger/image.json: the build a VM can tell it runs.
set -euo pipefail
src="$1"; agent="$2"; out="$3"; size="${4:-2G}"
if [[ -d $src ]]; then
  dir="$src"
else
  dir="$(mktemp -d)"; trap 'rm -rf "$dir"' EXIT
  tar -C "$dir" --numeric-owner -xf "$src"
fi
install -D -m 0755 "$agent" "$dir/usr/local/bin/banger-agent"
mkdir -p "$dir/etc/banger"
"$agent" version > "$dir/etc/banger/agent-version"
if [[ -n ${BANGER_IMAGE_STAMP:-} ]]; then
  printf '%s\n' "$BANGER_IMAGE_STAMP" > "$dir/etc/banger/image.json"
fi
work="${out%.ext4}.work.ext4"
mkdir -p "$dir/root"
rm -f "$work.tmp" "$out.tmp"
mkfs.ext4 -q -F -L banger-work -d "$dir/root" "$work.tmp" 1G
mkfs.ext4 -q -F -L banger-root -d "$dir" "$out.tmp" "$size"
mv "$work.tmp" "$work"
mv "$out.tmp" "$out"
