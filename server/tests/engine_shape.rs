//! The engine is thin: its state lives in subsystems that own it (`Vms`, `Guests`, `Admission`, `Ops`, `Warm`,
//! ...), each with private fields behind a small API. A map or a lock added straight to `Engine` would be state
//! any handler could reach into; this test sends it to a subsystem instead.

/// The field lines of `pub struct Engine { ... }` in the source.
fn engine_fields(source: &str) -> Vec<String> {
    let start = source.find("pub struct Engine {").expect("struct Engine in engine/mod.rs");
    let body = &source[start..];
    let end = body.find("\n}").expect("end of struct Engine");
    body[..end]
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.starts_with("//") && l.contains(':'))
        .map(String::from)
        .collect()
}

/// A field that holds a collection or a std/parking_lot lock of its own, rather than a subsystem.
fn holds_raw_state(field: &str) -> bool {
    ["HashMap<", "BTreeMap<", "HashSet<", "Vec<", "Mutex<HashMap", "parking_lot::Mutex<", "Mutex<Vec"]
        .iter()
        .any(|t| field.contains(t))
}

#[test]
fn the_shape_check_sees_raw_state() {
    assert!(holds_raw_state("boots: Mutex<HashMap<String, BootInfo>>,"));
    assert!(holds_raw_state("pool: parking_lot::Mutex<Vec<PoolEntry>>,"));
    assert!(!holds_raw_state("pub(crate) vms: vm::Vms,"));
    let fields = engine_fields("pub struct Engine {\n    /// a: HashMap<\n    a: A,\n    b: Vec<u8>,\n}\n");
    assert_eq!(fields, ["a: A,", "b: Vec<u8>,"]);
}

#[test]
fn the_engine_holds_subsystems_not_maps_or_locks() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/engine/mod.rs");
    let fields = engine_fields(&std::fs::read_to_string(path).unwrap());
    assert!(fields.len() > 8, "found only {fields:?}");
    let raw: Vec<&String> = fields.iter().filter(|f| holds_raw_state(f)).collect();
    assert!(raw.is_empty(), "give this state to a subsystem that owns it (see engine/vm/state.rs): {raw:?}");
}
