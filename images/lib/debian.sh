# Shared by the Debian recipes. Source it; it defines debian_rootfs and finish_rootfs.

# debian_rootfs DIR PACKAGES: debootstraps Debian bookworm (minbase) into DIR with the packages every banger
# guest uses (iproute2, procps, git for workspaces, OpenSSH for vm ssh, busybox's small network tools) plus
# PACKAGES (comma-separated, may be empty). Runs on the host with the host's network, never in a guest.
debian_rootfs() {
  local dir="$1" extra="$2" mirror="${BANGER_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
  local pkgs="iproute2,procps,git,openssh-server,ca-certificates,less,busybox${extra:+,$extra}"
  debootstrap --variant=minbase --include="$pkgs" bookworm "$dir" "$mirror" >/dev/null
}

# finish_rootfs DIR HOSTNAME OUTPUT.tar: strips what must not be shared between VMs or is only a cache, and
# writes the root tar. Host keys are deleted here and generated per VM at first boot, so no secret is ever
# baked into an image.
finish_rootfs() {
  local dir="$1" name="$2" out="$3"
  rm -f "$dir"/etc/ssh/ssh_host_*
  rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* "$dir"/root/.npm "$dir"/tmp/*
  echo "$name" > "$dir/etc/hostname"
  tar -C "$dir" --numeric-owner -cf "$out.tmp" .
  mv "$out.tmp" "$out"
}
