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
    // Reproducible: SOURCE_DATE_EPOCH if set, else the commit's own time. Wall-clock time would differ
    // between compilations of this crate in one build (cargo compiles it again for another feature set,
    // e.g. for the tests), and then banger and bangerd from the same tree would disagree.
    let build_time = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .or_else(|| git(&["log", "-1", "--format=%ct", "HEAD"]).and_then(|s| s.parse().ok()))
        .unwrap_or(0);
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
