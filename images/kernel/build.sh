#!/usr/bin/env bash
# Builds banger's lean guest kernel: build.sh SOURCE.tar.xz OUTPUT_DIR
# SOURCE is Debian's linux-source-6.1 tarball (/usr/src/linux-source-6.1.tar.xz). The configuration is
# `allnoconfig` plus lean.config (next to this script); OUTPUT_DIR receives `vmlinux` (the ELF that QEMU boots
# through PVH and Firecracker boots directly) and `config` (the resolved configuration). About 6 minutes on
# two cores. The output directory is written whole or not at all.
set -euo pipefail
src="$1"
out="$2"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/banger-kernel.XXXXXX")"
trap 'rm -rf "$work"' EXIT

tar -xf "$src" -C "$work"
tree="$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -1)"
cd "$tree"
make -s allnoconfig
./scripts/kconfig/merge_config.sh -n -m .config "$here/lean.config" >/dev/null
make -s olddefconfig
# Every option of the fragment must have survived: a missing dependency drops an option silently.
missing=0
while IFS= read -r line; do
  [[ $line =~ ^CONFIG_ ]] || continue
  grep -qxF "$line" .config || { echo "kernel config: $line did not take (a dependency is missing)" >&2; missing=1; }
done <"$here/lean.config"
((missing == 0)) || exit 1
make -s -j"$(nproc)" vmlinux
mkdir -p "$out.new"
cp vmlinux "$out.new/vmlinux"
cp .config "$out.new/config"
rm -rf "$out"
mv "$out.new" "$out"
