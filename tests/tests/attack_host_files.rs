//! Attacks from a hostile guest (and from other local users) on the host's files and terminal, each
//! performed for real and each asserting the host held (issue 15, findings 1, 2, 3 and 7).
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use banger_e2e::*;

fn create_vm(d: &TestDaemon, name: &str) {
    d.register_test_image();
    let vm = d.cli_json(&["vm", "create", "--name", name, "--memory", "512"]);
    assert_eq!(vm["state"], "running");
}

fn sh(script: &str) -> std::process::Output {
    Command::new("sh").args(["-c", script]).output().unwrap()
}

/// Finding 1: a setuid binary made in the guest and copied out with `vm cp` must not arrive setuid (nor
/// with more than the user's umask allows), and a symlink planted at the old predictable temporary name
/// must not be followed.
#[test]
fn attack_vm_cp_setuid_binary_and_planted_temporary_symlink() {
    let d = TestDaemon::start();
    create_vm(&d, "cp1");
    let modes = d.guest_ok(
        "cp1",
        "cp /usr/bin/true /root/tool && chmod 4755 /root/tool && printf x > /root/all && chmod 7777 /root/all
         stat -c %a /root/tool /root/all",
    );
    assert_eq!(modes, "4755\n7777\n");
    let guest_sum = d.guest_ok("cp1", "sha256sum < /root/tool");

    let out_dir = tempfile::tempdir().unwrap();
    let victim = out_dir.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    let dst = out_dir.path().join("tool");
    // What the old code opened, following links: DST.banger-part.
    std::os::unix::fs::symlink(&victim, out_dir.path().join("tool.banger-part")).unwrap();

    let banger = bin("banger");
    let cp = |umask: &str, from: &str, to: &Path| {
        let script = format!(
            "umask {umask}; exec env BANGER_SOCKET='{}' '{}' vm cp {from} '{}'",
            d.socket.display(),
            banger.display(),
            to.display()
        );
        let out = sh(&script);
        assert!(out.status.success(), "vm cp: {}", String::from_utf8_lossy(&out.stderr));
    };
    cp("027", "cp1:/root/tool", &dst);
    let mode = std::fs::metadata(&dst).unwrap().mode() & 0o7777;
    assert_eq!(mode, 0o750, "guest mode 4755 under umask 027: rwx only, less the umask (got {mode:o})");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious", "the planted symlink was followed");
    let host_sum = sh(&format!("sha256sum < '{}'", dst.display())).stdout;
    assert_eq!(String::from_utf8_lossy(&host_sum), guest_sum, "the bytes arrive intact");

    let all = out_dir.path().join("all");
    cp("022", "cp1:/root/all", &all);
    let mode = std::fs::metadata(&all).unwrap().mode() & 0o7777;
    assert_eq!(mode, 0o755, "guest mode 7777 under umask 022 (got {mode:o})");

    // Nothing but the two copies, the victim and the planted link: no temporary left behind.
    let mut names: Vec<String> =
        std::fs::read_dir(out_dir.path()).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into()).collect();
    names.sort();
    assert_eq!(names, ["all", "tool", "tool.banger-part", "victim"]);
}

/// A repository like a user's, owned by another user (the daemon runs as root): `conf/secret` tracked.
fn user_repo() -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("banger-atk-ws-").tempdir().unwrap();
    let out = Command::new("sh")
        .args([
            "-ec",
            "git init -q -b main . && git config user.name Ada && git config user.email ada@example.invalid
             mkdir conf && echo 'tracked config' > conf/settings && echo hello > a.txt
             git add -A && git commit -q -m first && chown -R 65534:65534 .",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    dir
}

/// Runs a shell script in `dir` as the repository's owner (uid 65534), as the user would.
fn as_owner(dir: &Path, script: &str) -> String {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-ec", script])
        .current_dir(dir)
        .env("HOME", dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Finding 2: a guest's patch turns a tracked directory into a symlink to a root-only host directory; it
/// passes the export check and applies on the host, and the next prepare must not ship what the link points
/// at. Then a repository whose config names a filter program: host git must never run it.
#[test]
fn attack_workspace_symlinked_parent_and_repository_filter() {
    let d = TestDaemon::start();
    create_vm(&d, "ws1");
    let repo = user_repo();
    let secret_dir = tempfile::Builder::new().prefix("banger-atk-root-only-").tempdir().unwrap();
    std::fs::set_permissions(secret_dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let secret = secret_dir.path().join("settings");
    std::fs::write(&secret, "TOPSECRET-root-only").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let path = repo.path().to_str().unwrap();

    d.rpc("workspace.prepare", json!({"vm": "ws1", "path": path}));
    d.guest_ok("ws1", &format!("cd /root/repo && rm -rf conf && ln -s '{}' conf", secret_dir.path().display()));
    let export = d.rpc("workspace.export", json!({"vm": "ws1", "check_repo": path}));
    assert_eq!(export["check"]["clean"], true, "the typechange patch applies: {export}");
    let patch_file = repo.path().join(".git/guest.patch");
    std::fs::write(&patch_file, export["patch"].as_str().unwrap()).unwrap();
    as_owner(repo.path(), "git apply --index .git/guest.patch && test -L conf");

    // The next prepare: git lists conf/settings; the old code found it "present" through the link and tar
    // followed the parent out of the repository.
    let r = d.rpc("workspace.prepare", json!({"vm": "ws1", "path": path, "force": true}));
    assert!(r["files"].as_u64().is_some(), "{r}");
    let found = d.guest_sh("ws1", "grep -rs TOPSECRET /root/repo /root/.banger-workspace; echo done");
    assert!(
        !found["stdout"].as_str().unwrap().contains("TOPSECRET"),
        "a root-only host file reached the guest: {found}"
    );
    let link = d.guest_ok("ws1", "readlink /root/repo/conf");
    assert_eq!(link.trim(), secret_dir.path().display().to_string(), "the symlink itself is copied, as text");

    // A repository that names a filter program (and an fsmonitor and textconv) for every file.
    let marker = PathBuf::from(format!("/tmp/banger-atk-filter-ran-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    as_owner(
        repo.path(),
        &format!(
            "printf '* filter=x diff=x\\n' > .gitattributes && git add .gitattributes && git commit -q -m attrs
             git config filter.x.clean 'touch {m}; cat' && git config filter.x.required true
             git config core.fsmonitor 'touch {m}; false' && git config diff.x.textconv 'touch {m}; cat'
             touch -d 2001-01-01 a.txt && echo changed >> a.txt",
            m = marker.display()
        ),
    );
    let _ = std::fs::remove_file(&marker);
    d.rpc("workspace.prepare", json!({"vm": "ws1", "path": path, "force": true}));
    d.guest_ok("ws1", "cd /root/repo && echo guest >> a.txt");
    let export = d.rpc("workspace.export", json!({"vm": "ws1", "check_repo": path}));
    assert!(export["check"].is_object(), "{export}");
    assert!(!marker.exists(), "host git ran a program from the repository's config");
    // The marker program is real: the owner's own git runs it.
    as_owner(repo.path(), "git diff --quiet HEAD -- a.txt || true");
    assert!(marker.exists(), "the filter the test planted never runs, so the test proves nothing");
    let _ = std::fs::remove_file(&marker);
}

/// A local user and group for one test, removed on drop.
struct LocalUser {
    name: String,
}

impl LocalUser {
    fn new() -> LocalUser {
        let name = format!("bgatk{}", std::process::id());
        let _ = sh(&format!("userdel {name} 2>/dev/null; groupdel {name} 2>/dev/null"));
        let out = sh(&format!("groupadd {name} && useradd -M -N -g {name} -s /usr/sbin/nologin {name}"));
        assert!(out.status.success(), "useradd: {}", String::from_utf8_lossy(&out.stderr));
        LocalUser { name }
    }

    /// Runs `args` as this user; their output.
    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("setpriv")
            .args([&format!("--reuid={}", self.name), &format!("--regid={}", self.name), "--init-groups"])
            .args(args)
            .env("HOME", "/")
            .output()
            .unwrap()
    }
}

impl Drop for LocalUser {
    fn drop(&mut self) {
        let _ = sh(&format!("userdel {n}; groupdel {n} 2>/dev/null", n = self.name));
    }
}

/// Every file and directory below `dir` (symlinks not followed) with its mode.
fn walk(dir: &Path, out: &mut Vec<(PathBuf, std::fs::Metadata)>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        let is_dir = m.is_dir();
        out.push((e.path(), m));
        if is_dir {
            walk(&e.path(), out);
        }
    }
}

/// Finding 3: disks, database, logs and images are the daemon's alone. A local user in the socket group
/// (who may use the daemon) reads none of them, and cannot make the daemon republish a file they could not
/// read; devices and fifos are no images.
#[test]
fn attack_state_dir_secrets_unreadable_by_other_users() {
    let user = LocalUser::new();
    let mut d = TestDaemon::start_with_config(&format!("socket_group = \"{}\"", user.name));
    // The test's own directory is 0700; the socket in it must be reachable for the group member.
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    create_vm(&d, "sec1");
    d.rpc(
        "session.start",
        json!({"vm": "sec1", "name": "agent", "command": ["sleep", "600"],
               "env": {"ANTHROPIC_API_KEY": "sk-ant-attack-secret"}}),
    );
    d.guest_ok("sec1", "echo guest-secret > /root/.credentials.json && sync");

    let check_modes = |d: &TestDaemon| {
        let state_mode = std::fs::metadata(&d.state_dir).unwrap().mode() & 0o7777;
        assert_eq!(state_mode, 0o750, "the state directory with a socket group");
        let mut all = vec![];
        walk(&d.state_dir, &mut all);
        let open: Vec<String> = all
            .iter()
            // Group bits are allowed only for the contained VMMs' own groups (a VM's gid, the image readers'
            // group: ids from the containment range no account has); nothing is ever open to others.
            .filter(|(_, m)| {
                let vmm_group = m.gid() >= 1_900_000_000;
                (m.is_file() || m.is_dir()) && m.mode() & if vmm_group { 0o007 } else { 0o077 } != 0
            })
            .map(|(p, m)| format!("{:o} {}", m.mode() & 0o7777, p.display()))
            .collect();
        assert!(open.is_empty(), "state files others can read:\n{}", open.join("\n"));
        all
    };
    let all = check_modes(&d);
    let names = |suffix: &str| -> Vec<PathBuf> {
        all.iter()
            .filter(|(p, m)| m.is_file() && p.to_string_lossy().ends_with(suffix))
            .map(|(p, _)| p.clone())
            .collect()
    };
    let mut secrets = vec![];
    for suffix in ["root.qcow2", "work.qcow2", "banger.db", "bangerd.log", "rootfs.ext4", "work-seed.ext4"] {
        let found = names(suffix);
        assert!(!found.is_empty(), "no {suffix} in the state directory");
        secrets.extend(found);
    }
    secrets.extend(names("banger.db-wal"));
    for f in &secrets {
        let out = user.run(&["head", "-c", "1", f.to_str().unwrap()]);
        assert!(!out.status.success(), "{} read {}", user.name, f.display());
    }

    // State left world-readable by an older daemon is made private at the next start.
    let disk = names("work.qcow2").remove(0);
    std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(d.state_dir.join("bangerd.log"), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(d.state_dir.join("vms"), std::fs::Permissions::from_mode(0o755)).unwrap();
    d.restart();
    check_modes(&d);

    // image.register: the group member names a root-only file.
    let private = tempfile::Builder::new().prefix("banger-atk-img-").tempdir().unwrap();
    std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let root_only = private.path().join("root-only.ext4");
    std::fs::write(&root_only, "root's secret disk").unwrap();
    std::fs::set_permissions(&root_only, std::fs::Permissions::from_mode(0o600)).unwrap();
    let kernel = test_image().kernel;
    let socket = d.socket.to_str().unwrap().to_string();
    let banger = bin("banger");
    let out = user.run(&[
        "env",
        &format!("BANGER_SOCKET={socket}"),
        banger.to_str().unwrap(),
        "image",
        "register",
        "--name",
        "stolen",
        "--kernel",
        &kernel,
        "--rootfs",
        root_only.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a root-only file was registered for {}", user.name);
    assert!(stderr.contains("rootfs") && stderr.contains("not readable by every local user"), "{stderr}");
    // Devices, fifos and links to them are no image files, and naming one never blocks the daemon.
    let fifo = private.path().join("fifo");
    assert!(sh(&format!("mkfifo '{}'", fifo.display())).status.success());
    let link = private.path().join("link-to-zero");
    std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
    for bad in ["/dev/zero", fifo.to_str().unwrap(), link.to_str().unwrap()] {
        let r = d.rpc_raw("image.register", json!({"name": "bad", "kernel": kernel, "rootfs": bad}));
        let e = &r["error"]["data"];
        assert_eq!(e["code"], "invalid_argument", "{bad}: {r}");
        assert!(e["message"].as_str().unwrap().contains("not a regular file"), "{bad}: {r}");
    }
    let images = d.rpc("image.list", json!({}));
    assert_eq!(images["images"].as_array().unwrap().len(), 1, "{images}");
}

/// Finding 7: a guest names a listening process with an OSC 52 clipboard write and a 100k-character
/// command line, and writes an escape sequence to its console; the CLI prints neither raw and does not break.
#[test]
fn attack_terminal_injection_through_ports_and_console() {
    let d = TestDaemon::start();
    create_vm(&d, "term1");
    // comm is set from inside (a process may rename itself); the long argument is its command line.
    let listener = r#"
        use Socket;
        open(my $c, ">", "/proc/self/comm") or die; print $c "\e]52;c;aGk=\a"; close $c;
        socket(S, PF_INET, SOCK_STREAM, 0) or die; setsockopt(S, SOL_SOCKET, SO_REUSEADDR, 1);
        bind(S, sockaddr_in(7777, INADDR_ANY)) or die; listen(S, 5) or die; sleep 600;
    "#;
    let script = format!(
        "long=\"$(printf '\\033]52;c;SGVsbG8=\\007')$(head -c 100000 /dev/zero | tr '\\0' A)\"
         setsid perl -e '{listener}' \"$long\" </dev/null >/dev/null 2>&1 &
         printf '\\033]52;c;Y29uc29sZQ==\\007 banger-console-attack\\n' > /dev/console"
    );
    d.guest_ok("term1", &script);
    wait_until("the guest listener", std::time::Duration::from_secs(30), || {
        d.cli_json(&["vm", "ports", "term1"])["ports"].as_array().is_some_and(|p| p.iter().any(|x| x["port"] == 7777))
    });

    let out = d.cli(&["vm", "ports", "term1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "vm ports failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!out.stdout.contains(&0x1b) && !out.stdout.contains(&0x07), "raw escape in vm ports:\n{text}");
    let row = text.lines().find(|l| l.contains("7777")).unwrap_or_else(|| panic!("no row for 7777:\n{text}"));
    assert!(row.contains("\\x1b]52;c;aGk=\\x07"), "the process name is shown escaped: {row}");
    assert!(row.chars().count() < 400, "a 100k-character command stretched the table: {} chars", row.len());
    // --json keeps the exact value (its escaping makes it inert).
    let json = d.cli_json(&["vm", "ports", "term1"]);
    let port = json["ports"].as_array().unwrap().iter().find(|p| p["port"] == 7777).unwrap();
    assert_eq!(port["process"], "\u{1b}]52;c;aGk=\u{7}");
    assert!(
        port["command"].as_str().unwrap().contains("\u{1b}]52;c;SGVsbG8=\u{7}AAAA"),
        "{}",
        &port["command"].to_string()[..200]
    );

    wait_until("the console line", std::time::Duration::from_secs(30), || {
        String::from_utf8_lossy(&d.cli(&["vm", "logs", "term1"]).stdout).contains("banger-console-attack")
    });
    let out = d.cli(&["vm", "logs", "term1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.stdout.contains(&0x1b) && !out.stdout.contains(&0x07), "raw escape in vm logs");
    assert!(text.contains("\\x1b]52;c;Y29uc29sZQ==\\x07 banger-console-attack"), "escaped console line");
}
