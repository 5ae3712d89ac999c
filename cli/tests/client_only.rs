//! The CLI is a client: it links tools-schema and banger-client, never the daemon library or what only the
//! daemon needs (SQLite, the web console's axum, the DNS server, an MCP server).

/// Packages the `banger` binary must not link, by name or name prefix.
const DAEMON_ONLY: &[&str] = &["banger-server", "rusqlite", "libsqlite3-sys", "axum", "hickory-", "rmcp"];

#[test]
fn the_cli_never_links_the_daemon() {
    let out = std::process::Command::new(env!("CARGO"))
        .args(["tree", "--offline", "-p", "banger-cli", "-e", "normal,build", "--prefix", "none", "--no-dedupe"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo tree");
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    let tree = String::from_utf8_lossy(&out.stdout);
    let mut linked: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| DAEMON_ONLY.iter().any(|bad| name.starts_with(bad)))
        .collect();
    linked.sort();
    linked.dedup();
    assert!(
        linked.is_empty(),
        "banger-cli links daemon-only packages: {linked:?}\n  (`cargo tree -p banger-cli -i <name>` says through what)"
    );
    assert!(tree.lines().any(|l| l.starts_with("banger-client ")), "the CLI talks to the daemon through banger-client");
}
