# Shared by quickstart.sh and test.sh. Source it; it defines functions and CACHE/ROOT.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${BANGER_CACHE:-/var/cache/banger}"
AGENT_TARGET=x86_64-unknown-linux-gnu

log() { printf '[%s %s] %s\n' "$(basename "$0" .sh)" "$(date +%H:%M:%S)" "$*" >&2; }

# Builds banger-agent as a static binary (it runs inside guests, whatever libc they have) and prints its path.
build_agent() {
  (cd "$ROOT" && RUSTFLAGS='-C target-feature=+crt-static' cargo build -q --release -p banger-agent --target "$AGENT_TARGET")
  echo "$ROOT/target/$AGENT_TARGET/release/banger-agent"
}

# Builds the attack tests' hostile agent (tests/fake-agent), static like the real one, and prints its path.
build_fake_agent() {
  (cd "$ROOT" && RUSTFLAGS='-C target-feature=+crt-static' cargo build -q --release -p banger-fake-agent --target "$AGENT_TARGET")
  echo "$ROOT/target/$AGENT_TARGET/release/banger-fake-agent"
}

# assemble_image RECIPE AGENT: prints the path of an ext4 root filesystem built from the recipe's cached root
# tar plus this agent (its work seed is next to it, ending in .work.ext4). Cached by content, so it is rebuilt only when the recipe or the agent changes.
assemble_image() {
  local recipe="$1" agent="$2" tar hash out
  tar="$(readlink -f "$CACHE/rootfs/$recipe.tar")"
  hash="$(cat "$tar.sha256" 2>/dev/null || sha256sum "$tar" | cut -c1-16 | tee "$tar.sha256")"
  hash="$(printf '%s %s %s' "$hash" "$(sha256sum "$agent" | cut -c1-16)" "$(sha256sum "$ROOT/images/assemble.sh" | cut -c1-16)" | sha256sum | cut -c1-12)"
  out="$CACHE/images/$recipe-$hash.ext4"
  mkdir -p "$CACHE/images"
  if [[ ! -f $out ]]; then
    log "assembling image $recipe ($hash)"
    "$ROOT/images/assemble.sh" "$tar" "$agent" "$out" >&2
    # Keep the twelve newest builds of each recipe (several work trees may test different agents at once).
    ls -1t "$CACHE/images/$recipe"-*[0-9a-f].ext4 | tail -n +13 | while read -r old; do rm -f "$old" "${old%.ext4}.work.ext4"; done
  fi
  echo "$out"
}
