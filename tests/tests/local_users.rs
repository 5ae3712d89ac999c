//! Other users of the workstation: a member of the daemon's socket group uses banger without root; anyone
//! else is refused, and told which group grants access.
use std::process::{Command, Output};

use banger_e2e::*;
use serde_json::Value;

/// A group and two users made for this test (one in the group, one not), removed when it ends.
struct LocalUsers {
    group: String,
    member: String,
    outsider: String,
}

impl LocalUsers {
    fn create() -> LocalUsers {
        let tag = std::process::id();
        let u = LocalUsers {
            group: format!("bgt-g{tag}"),
            member: format!("bgt-in{tag}"),
            outsider: format!("bgt-out{tag}"),
        };
        run(&["groupadd", &u.group]);
        run(&["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", "-G", &u.group, &u.member]);
        run(&["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", &u.outsider]);
        u
    }

    /// Runs the CLI as `user` (its own uid, gid and groups, no root).
    fn cli_as(&self, user: &str, d: &TestDaemon, args: &[&str]) -> Output {
        Command::new("setpriv")
            .args([&format!("--reuid={user}"), "--regid=users", "--init-groups", "--"])
            .arg(bin("banger"))
            .args(args)
            .env("BANGER_SOCKET", &d.socket)
            .env("HOME", "/nonexistent")
            .env_remove("XDG_RUNTIME_DIR")
            .output()
            .expect("running banger as another user")
    }
}

impl Drop for LocalUsers {
    fn drop(&mut self) {
        for user in [&self.member, &self.outsider] {
            let _ = Command::new("userdel").arg(user).output();
        }
        let _ = Command::new("groupdel").arg(&self.group).output();
    }
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

#[test]
fn a_member_of_the_socket_group_uses_banger_without_root_and_others_are_told_how_to_get_access() {
    let users = LocalUsers::create();
    let d = TestDaemon::start_with_config(&format!("socket_group = \"{}\"", users.group));
    // The test's folder holds the socket: let the group through it, as /run/banger lets everyone.
    run(&["chgrp", &users.group, d.dir.path().to_str().unwrap()]);
    run(&["chmod", "0750", d.dir.path().to_str().unwrap()]);
    d.register_test_image();

    let created = json_of(&users.cli_as(&users.member, &d, &["vm", "create", "--name", "by-member", "--json"]));
    assert_eq!(created["name"], "by-member", "{created}");
    let out = users.cli_as(&users.member, &d, &["vm", "exec", "by-member", "--", "sh", "-c", "echo hello-$((40+2))"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hello-42");

    // Someone outside the group is refused before anything happens, with the group named in the hint.
    let out = users.cli_as(&users.outsider, &d, &["vm", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied"), "{err}");
    assert!(err.contains(&format!("usermod -aG {} {}", users.group, users.outsider)), "{err}");
    let out = users.cli_as(&users.outsider, &d, &["vm", "delete", "by-member"]);
    assert!(!out.status.success());
    assert_eq!(d.rpc("vm.show", serde_json::json!({"vm": "by-member"}))["name"], "by-member", "the VM is still there");

    let out = users.cli_as(&users.member, &d, &["vm", "delete", "by-member"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(d.rpc("vm.list", serde_json::json!({}))["vms"].as_array().unwrap().len(), 0);
    d.assert_no_leaked_processes();
}

#[test]
fn the_cli_refuses_a_socket_planted_by_another_user() {
    let users = LocalUsers::create();
    let d = TestDaemon::start();
    // Another (non-root) user's socket where the CLI would look: the CLI must not send it anything.
    let planted_dir = tempfile::Builder::new().prefix("banger-planted-").tempdir().unwrap();
    run(&["chmod", "0777", planted_dir.path().to_str().unwrap()]);
    let planted = planted_dir.path().join("bangerd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&planted).unwrap();
    let uid = nix::unistd::User::from_name(&users.outsider).unwrap().unwrap().uid;
    nix::unistd::chown(&planted, Some(uid), None).unwrap();
    listener.set_nonblocking(true).unwrap();
    let out = Command::new(bin("banger"))
        .args(["vm", "exec", "x", "--env", "GITHUB_TOKEN=secret", "--", "true"])
        .env("BANGER_SOCKET", &planted)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a socket owned by root or by you"), "{err}");
    // Nobody connected to the planted socket.
    assert!(listener.accept().is_err(), "the CLI connected to another user's socket");
    drop(d);
}
