//! Identity and logins synced into guests at every boot, from a host home the test makes (never the real one).
use std::path::Path;

use banger_e2e::*;

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

#[test]
fn git_identity_and_agent_logins_reach_the_guest_with_mode_0600_and_are_refreshed_at_start() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    write(&h.join(".gitconfig"), "[user]\n\tname = Ada O'Lovelace\n\temail = ada@example.com\n");
    write(&h.join(".claude/.credentials.json"), "{\"claudeAiOauth\":\"first\"}");
    write(&h.join(".pi/agent/auth.json"), "{\"pi\":\"secret\"}");
    // No opencode login on this host: it is skipped with a warning.
    let d = TestDaemon::start_with_config(&format!("[guest_sync]\nhome = \"{}\"\n", h.display()));
    d.register_test_image();
    d.rpc("vm.create", json!({"name": "synced", "memory_mib": 256}));

    assert_eq!(
        d.guest_ok("synced", "stat -c '%a %U' /root/.claude/.credentials.json /root/.pi/agent/auth.json"),
        "600 root\n600 root\n"
    );
    assert_eq!(d.guest_ok("synced", "cat /root/.claude/.credentials.json"), "{\"claudeAiOauth\":\"first\"}");
    assert_eq!(d.guest_ok("synced", "cat /root/.pi/agent/auth.json"), "{\"pi\":\"secret\"}");
    assert_eq!(d.guest_sh("synced", "test -e /root/.local/share/opencode/auth.json")["exit_code"], 1);
    assert_eq!(
        d.guest_ok("synced", "git config --global user.name; git config --global user.email"),
        "Ada O'Lovelace\nada@example.com\n"
    );
    assert!(
        d.daemon_output().contains("skipped /root/.local/share/opencode/auth.json"),
        "the missing login is reported: {}",
        d.daemon_output()
    );
    // Doctor tells the human which logins guests will not get.
    let report = d.rpc("doctor.run", json!({}));
    let check = report["checks"].as_array().unwrap().iter().find(|c| c["name"] == "agent-logins").unwrap().clone();
    assert_eq!(check["status"], "warn", "{check}");
    assert!(check["detail"].as_str().unwrap().contains("opencode/auth.json"), "{check}");

    // A new login on the host reaches the guest at its next start; a login that vanished from the host
    // leaves the guest's copy alone.
    write(&h.join(".claude/.credentials.json"), "{\"claudeAiOauth\":\"second\"}");
    std::fs::remove_file(h.join(".pi/agent/auth.json")).unwrap();
    d.rpc("vm.restart", json!({"vms": ["synced"]}));
    assert_eq!(d.guest_ok("synced", "cat /root/.claude/.credentials.json"), "{\"claudeAiOauth\":\"second\"}");
    assert_eq!(d.guest_ok("synced", "cat /root/.pi/agent/auth.json"), "{\"pi\":\"secret\"}");
    d.rpc("vm.delete", json!({"vms": ["synced"]}));
}
