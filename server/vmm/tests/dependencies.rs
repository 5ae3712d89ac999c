//! banger-vmm is what a client (the CLI's bench) links to boot a VMM: none of the daemon's server-side
//! stacks may come with it.
#[test]
fn the_vmm_crate_pulls_in_no_daemon_stack() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new(env!("CARGO"))
        .args(["tree", "--offline", "-e", "normal", "--prefix", "none", "-p", "banger-vmm", "--manifest-path"])
        .arg(format!("{dir}/Cargo.toml"))
        .output()
        .expect("cargo tree runs");
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(tree.contains("tokio "), "cargo tree listed nothing useful:\n{tree}");
    for banned in ["rusqlite", "axum", "hickory", "rmcp", "banger-server"] {
        let found: Vec<&str> = tree.lines().filter(|l| l.starts_with(banned)).collect();
        assert!(found.is_empty(), "banger-vmm depends on {banned}: {found:?}");
    }
}
