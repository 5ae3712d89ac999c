//! Stamps one build identity (version, git commit, build time) into tools-schema. Every banger binary
//! (banger, bangerd, banger-agent) links this crate, so all three report the same tuple.
use std::process::Command;

fn main() {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = std::env::var("BANGER_COMMIT").ok().or_else(|| git(&["rev-parse", "--short=12", "HEAD"]));
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    let commit = match commit {
        Some(c) if dirty => format!("{c}-dirty"),
        Some(c) => c,
        None => "unknown".into(),
    };
    let build_time = std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|s| s.parse::<i64>().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
    });
    println!("cargo:rustc-env=BANGER_BUILD_COMMIT={commit}");
    println!("cargo:rustc-env=BANGER_BUILD_TIME={build_time}");
    if let Some(top) = git(&["rev-parse", "--show-toplevel"]) {
        // Re-stamp when HEAD moves or the index changes (commit or dirty flag).
        println!("cargo:rerun-if-changed={top}/.git/HEAD");
        println!("cargo:rerun-if-changed={top}/.git/index");
        if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={top}/.git/{r}");
        }
    }
    println!("cargo:rerun-if-env-changed=BANGER_COMMIT");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
}
