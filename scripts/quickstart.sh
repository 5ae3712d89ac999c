#!/usr/bin/env bash
# banger's main job on a fresh machine: set the host up, build and install banger, start the daemon,
# register the default image, boot a sandbox, run a command in it, and print what to do next.
# Safe to run again: every step reuses what is already there.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
[[ $(id -u) == 0 ]] || { echo "quickstart: run it with sudo (bangerd manages VMs, disks and network devices): sudo ./scripts/quickstart.sh" >&2; exit 1; }
command -v cargo >/dev/null || { echo "quickstart: cargo is not on root's PATH; keep yours: sudo env \"PATH=\$PATH\" ./scripts/quickstart.sh" >&2; exit 1; }

"$ROOT/scripts/setup-host.sh"
log "building banger (release)"
cargo build -q --release --workspace --bins
agent="$(build_agent)"
install -m 0755 target/release/banger target/release/bangerd "$agent" /usr/local/bin/
rootfs="$(assemble_image debian-minimal "$agent")"

# A daemon from an older build is replaced, so CLI and daemon always agree.
if banger daemon ping >/dev/null 2>&1; then
  same="$(banger version --json | python3 -c 'import json,sys; v=json.load(sys.stdin); print(v["cli"] == v["daemon"])')"
  if [[ $same != True ]]; then
    log "restarting bangerd onto the new build"
    banger daemon stop
  fi
fi
# The daemon must serve the socket group set-up configured (members use banger without sudo).
if banger daemon ping >/dev/null 2>&1 && [[ $(stat -c %G /run/banger/bangerd.sock 2>/dev/null) != banger ]]; then
  log "restarting bangerd so members of the group banger can use it"
  banger daemon stop
fi
banger daemon start

image="debian-minimal-$(basename "$rootfs" .ext4 | rev | cut -d- -f1 | rev)"
if ! banger image show "$image" >/dev/null 2>&1; then
  # banger's lean kernel (setup-host.sh builds it): one ELF for QEMU and Firecracker, no initramfs.
  banger image register --name "$image" --default \
    --kernel "$CACHE/kernel/lean/vmlinux" --kernel-elf "$CACHE/kernel/lean/vmlinux" \
    --rootfs "$rootfs" --work-seed "${rootfs%.ext4}.work.ext4"
else
  banger image promote "$image" >/dev/null
fi

# Everything the first VM needs, checked before it is made; a failure stops here with doctor's fixes.
if ! banger doctor >"$CACHE/tmp/doctor.txt"; then
  cat "$CACHE/tmp/doctor.txt" >&2
  echo >&2
  echo "quickstart: banger doctor found a problem (the FAIL lines above, each with its fix:); fix it and run this again" >&2
  exit 1
fi
grep -E '^\[(WARN|FAIL)\]' -A1 "$CACHE/tmp/doctor.txt" >&2 || true

if banger vm show quickstart >/dev/null 2>&1; then
  banger vm start quickstart
else
  banger vm create --name quickstart
fi
echo
echo "\$ banger vm exec quickstart -- sh -c 'uname -sr; . /etc/os-release; echo \$PRETTY_NAME'"
banger vm exec quickstart -- sh -c 'uname -sr; . /etc/os-release; echo $PRETTY_NAME'
cat <<'NEXT'

banger is up, with a sandbox named "quickstart". Next:
  banger vm exec quickstart -- sh -c 'echo hello from the guest'   run anything inside it
  banger vm list                                                   see your sandboxes (add --json for scripts)
  banger vm create --name work --vcpus 2 --memory 1024             make another one
  banger doctor                                                    check the host, and see which VMM it uses
  claude mcp add banger -- banger mcp                              give Claude Code the banger tools
  banger vm delete quickstart                                      clean up
NEXT
if [[ -n ${SUDO_USER:-} && $SUDO_USER != root ]]; then
  echo
  echo "As $SUDO_USER (in the group banger; log in again or run \`newgrp banger\` once) you need no sudo for any of these."
fi
