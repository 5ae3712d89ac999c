#!/usr/bin/env bash
# Runs banger's whole test suite: unit tests, schema snapshots, and end-to-end tests that boot real guests
# (under QEMU on hosts without hardware KVM). Sets the host up first (idempotent and cached), so it works on a
# fresh machine. Extra arguments go to cargo nextest (e.g. a test name filter).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

"$ROOT/scripts/setup-host.sh"
command -v cargo-nextest >/dev/null || { log "installing cargo-nextest"; cargo install -q --locked cargo-nextest; }

log "building the workspace"
cargo build -q --workspace --bins
agent="$(build_agent)"
rootfs="$(assemble_image debian-minimal "$agent")"

export BANGER_TEST_KERNEL="$CACHE/kernel/default/vmlinuz"
export BANGER_TEST_KERNEL_ELF="$CACHE/kernel/default/vmlinux"
export BANGER_TEST_INITRD="$CACHE/kernel/default/initramfs.cpio.gz"
export BANGER_TEST_ROOTFS="$rootfs"
export BANGER_TEST_WORK_SEED="${rootfs%.ext4}.work.ext4"
export BANGER_TEST_AGENT="$agent"
log "running the tests"
exec cargo nextest run --workspace --profile ci "$@"
