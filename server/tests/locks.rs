//! No lock in the daemon or its VMM drivers can be poisoned: they are parking_lot's, whose guards a panic
//! simply releases. A std Mutex held by a panicking task (say, the per-VM lock table) would make every later
//! `lock().unwrap()` panic too, and take the daemon down with it.

/// A std lock on this line, comments aside.
fn names_a_std_lock(line: &str) -> bool {
    let code = line.split("//").next().unwrap_or_default();
    if code.contains("std::sync::Mutex") || code.contains("std::sync::RwLock") {
        return true;
    }
    code.trim_start().starts_with("use std::sync::{")
        && code.split(|c: char| !c.is_alphanumeric() && c != '_').any(|w| w == "Mutex" || w == "RwLock")
}

#[test]
fn the_lock_check_sees_std_locks() {
    for bad in ["use std::sync::{Arc, Mutex};", "let m: std::sync::Mutex<u8>;", "use std::sync::RwLock;"] {
        assert!(names_a_std_lock(bad), "missed: {bad}");
    }
    for fine in ["use std::sync::Arc;", "use parking_lot::Mutex;", "// std::sync::Mutex poisons", "tokio::sync::Mutex"]
    {
        assert!(!names_a_std_lock(fine), "flagged: {fine}");
    }
}

#[test]
fn the_daemon_and_the_drivers_use_no_lock_that_poisons() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut dirs = vec![root.join("src"), root.join("vmm/src")];
    let (mut scanned, mut offenders) = (0, vec![]);
    while let Some(path) = dirs.pop() {
        if path.is_dir() {
            dirs.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        scanned += 1;
        for (n, line) in std::fs::read_to_string(&path).unwrap().lines().enumerate() {
            if names_a_std_lock(line) {
                offenders.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(scanned > 30, "found only {scanned} sources");
    assert!(offenders.is_empty(), "use parking_lot's Mutex/RwLock:\n{}", offenders.join("\n"));
}
