#!/usr/bin/env bash
# Runs banger's whole test suite: unit tests, schema snapshots, and end-to-end tests that boot real guests
# (under QEMU on hosts without hardware KVM). Sets the host up first (idempotent and cached), so it works on a
# fresh machine. Extra arguments go to cargo nextest (e.g. a test name filter).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

"$ROOT/scripts/setup-host.sh" --tests
command -v cargo-nextest >/dev/null || { log "installing cargo-nextest"; cargo install -q --locked cargo-nextest; }

log "building the workspace"
cargo build -q --workspace --bins
agent="$(build_agent)"
rootfs="$(assemble_image debian-minimal "$agent")"

# Guests boot banger's lean kernel (no initramfs) by default; one test boots the Debian cloud kernel fallback.
export BANGER_TEST_KERNEL="$CACHE/kernel/lean/vmlinux"
export BANGER_TEST_KERNEL_ELF="$CACHE/kernel/lean/vmlinux"
export BANGER_TEST_CLOUD_KERNEL="$CACHE/kernel/default/vmlinuz"
export BANGER_TEST_CLOUD_KERNEL_ELF="$CACHE/kernel/default/vmlinux"
export BANGER_TEST_CLOUD_INITRD="$CACHE/kernel/default/initramfs.cpio.gz"
export BANGER_TEST_ROOTFS="$rootfs"
export BANGER_TEST_WORK_SEED="${rootfs%.ext4}.work.ext4"
export BANGER_TEST_AGENT="$agent"
BANGER_TEST_FAKE_AGENT="$(build_fake_agent)"
export BANGER_TEST_FAKE_AGENT
# Independent MCP clients the tests drive banger with: the official Python SDK and the MCP Inspector CLI.
# Pinned, installed once into the cache.
MCP_PY_VERSION=2.3.0
INSPECTOR_VERSION=2.12.0
# The web console's browser test drives Debian's chromium (setup-host.sh installs it) with playwright-core.
PLAYWRIGHT_VERSION=1.65.1
if [[ ! -x $CACHE/venv/mcp-$MCP_PY_VERSION/bin/python ]]; then
  log "installing the Python MCP SDK (mcp==$MCP_PY_VERSION)"
  rm -rf "$CACHE/venv/mcp-$MCP_PY_VERSION.tmp"
  python3 -m venv "$CACHE/venv/mcp-$MCP_PY_VERSION.tmp"
  "$CACHE/venv/mcp-$MCP_PY_VERSION.tmp/bin/pip" install -q "mcp==$MCP_PY_VERSION"
  mv "$CACHE/venv/mcp-$MCP_PY_VERSION.tmp" "$CACHE/venv/mcp-$MCP_PY_VERSION"
fi
if [[ ! -x $CACHE/npm/inspector-$INSPECTOR_VERSION/node_modules/.bin/mcp-inspector ]]; then
  log "installing the MCP Inspector ($INSPECTOR_VERSION)"
  rm -rf "$CACHE/npm/inspector-$INSPECTOR_VERSION"
  mkdir -p "$CACHE/npm/inspector-$INSPECTOR_VERSION"
  (cd "$CACHE/npm/inspector-$INSPECTOR_VERSION" && npm install -q --no-fund --no-audit --loglevel=error \
    "@modelcontextprotocol/inspector@$INSPECTOR_VERSION" >/dev/null)
fi
if [[ ! -f $CACHE/npm/playwright-core-$PLAYWRIGHT_VERSION/node_modules/playwright-core/package.json ]]; then
  log "installing playwright-core ($PLAYWRIGHT_VERSION)"
  rm -rf "$CACHE/npm/playwright-core-$PLAYWRIGHT_VERSION"
  mkdir -p "$CACHE/npm/playwright-core-$PLAYWRIGHT_VERSION"
  (cd "$CACHE/npm/playwright-core-$PLAYWRIGHT_VERSION" && npm install -q --no-fund --no-audit --loglevel=error \
    "playwright-core@$PLAYWRIGHT_VERSION" >/dev/null)
fi
# The coding agents' own CLIs, at the versions the debian-agent image installs (read from its recipe), check
# that they see banger connected.
AGENT_CLIS="$(grep -oE '(@anthropic-ai/claude-code|opencode-ai)@[0-9.]+' "$ROOT/images/debian-agent/recipe.sh" | sort | tr '\n' ' ')"
AGENT_CLIS_DIR="$CACHE/npm/agent-clis-$(echo "$AGENT_CLIS" | sha256sum | cut -c1-12)"
if [[ ! -x $AGENT_CLIS_DIR/node_modules/.bin/claude || ! -x $AGENT_CLIS_DIR/node_modules/.bin/opencode ]]; then
  log "installing the agent CLIs ($AGENT_CLIS)"
  rm -rf "$AGENT_CLIS_DIR" "$AGENT_CLIS_DIR.tmp"
  mkdir -p "$AGENT_CLIS_DIR.tmp"
  # shellcheck disable=SC2086 # one word per package
  (cd "$AGENT_CLIS_DIR.tmp" && npm install -q --no-fund --no-audit --loglevel=error $AGENT_CLIS >/dev/null)
  mv "$AGENT_CLIS_DIR.tmp" "$AGENT_CLIS_DIR"
fi
export BANGER_TEST_CLAUDE="$AGENT_CLIS_DIR/node_modules/.bin/claude"
export BANGER_TEST_OPENCODE="$AGENT_CLIS_DIR/node_modules/.bin/opencode"
export BANGER_TEST_PLAYWRIGHT="$CACHE/npm/playwright-core-$PLAYWRIGHT_VERSION/node_modules/playwright-core"
export BANGER_TEST_PYTHON_MCP="$CACHE/venv/mcp-$MCP_PY_VERSION/bin/python"
export BANGER_TEST_MCP_INSPECTOR="$CACHE/npm/inspector-$INSPECTOR_VERSION/node_modules/.bin/mcp-inspector"
log "running the tests"
exec cargo nextest run --workspace --profile ci "$@"
