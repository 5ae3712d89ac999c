#!/usr/bin/env bash
# Builds banger's initramfs: busybox-static, the modules listed in ./modules (plus their dependencies,
# in load order) and ./init. Usage: build.sh MODULES_DIR OUTPUT.cpio.gz
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
moddir="$1"; out="$2"
root="$(mktemp -d)"; trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,dev,proc,sys,newroot,lower,upper,lib/modules,etc}
cp /bin/busybox "$root/bin/busybox"
cp "$here/init" "$root/init"; chmod 0755 "$root/init"
declare -A seen=()
order=()
add() { # add MODULE_PATH after its dependencies; modules.dep lists deps so the last loads first
  local path="$1" deps
  [[ -n ${seen[$path]:-} ]] && return; seen[$path]=1
  deps="$(awk -v m="$path:" '$1==m {for (i=NF; i>1; i--) print $i}' "$moddir/modules.dep")"
  for d in $deps; do add "$d"; done
  order+=("$path")
}
while read -r name; do
  [[ -z $name || $name == \#* ]] && continue
  # The module whose path ends in /NAME.ko (index() is 0 when absent, so check it is positive).
  path="$(awk -F: -v n="/$name.ko" '{ i = index($1, n); if (i > 0 && i == length($1) - length(n) + 1) { print $1; exit } }' "$moddir/modules.dep")"
  [[ -n $path ]] || { echo "module $name not found in $moddir" >&2; exit 1; }
  add "$path"
done < "$here/modules"
for p in "${order[@]}"; do
  cp "$moddir/$p" "$root/lib/modules/"
  basename "$p" >> "$root/etc/modules-load"
done
(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) > "$out.tmp"
mv "$out.tmp" "$out"
