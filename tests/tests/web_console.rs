//! The web console in a real browser: headless Chromium (Debian's `chromium`) driven by playwright-core
//! (npm; scripts/test.sh installs it pinned and exports BANGER_TEST_PLAYWRIGHT) through tests/web/console.cjs.
//! The browser runs in the daemon's network namespace, where the console listens on 127.0.0.1.
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use banger_e2e::*;

/// Ends the browser driver by PID if the test fails half-way.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn a_browser_logs_in_creates_a_vm_watches_it_boot_opens_its_ports_then_stops_and_deletes_it() {
    let playwright = std::env::var("BANGER_TEST_PLAYWRIGHT")
        .expect("BANGER_TEST_PLAYWRIGHT is not set: scripts/test.sh installs playwright-core and sets it");
    assert!(Path::new("/usr/bin/chromium").exists(), "no /usr/bin/chromium: scripts/setup-host.sh installs it");
    let d = TestDaemon::start_with_config("[web]\nlisten = \"127.0.0.1:0\"");
    d.register_test_image();

    // daemon.status and `banger daemon status` give the login URL; the token behind it is private to root.
    let url = d.rpc("daemon.status", json!({}))["web_url"].as_str().expect("daemon.status has web_url").to_string();
    assert!(url.starts_with("http://127.0.0.1:") && url.contains("/login?token="), "{url}");
    assert!(!url.starts_with("http://127.0.0.1:0/"), "port 0 is replaced by the bound port: {url}");
    let human = String::from_utf8_lossy(&d.cli(&["daemon", "status"]).stdout).to_string();
    assert!(human.contains(&format!("console   {url}")), "{human}");
    let token_file = d.state_dir.join("web-token");
    assert_eq!(std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(url.ends_with(std::fs::read_to_string(&token_file).unwrap().trim()));

    let shots = d.dir.path().join("screenshots");
    // A file, not a pipe: a pipe nobody reads until the end would block the driver once it fills.
    let stderr_path = d.dir.path().join("browser.err");
    let vm = "webvm";
    let child = Command::new("ip")
        .args(["netns", "exec", &d.netns.name, "node"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("web/console.cjs"))
        .env("BANGER_TEST_PLAYWRIGHT", &playwright)
        .env("WEB_URL", &url)
        .env("SHOTS", &shots)
        .env("VM_NAME", vm)
        // Chromium's profile lands in the test's directory, so the harness finds and ends a stray browser.
        .env("TMPDIR", d.dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("running node");
    let mut driver = Driver(child);
    let mut stdin = driver.0.stdin.take().unwrap();
    let stdout = BufReader::new(driver.0.stdout.take().unwrap());
    let mut transcript = vec![];
    for line in stdout.lines() {
        let line = line.unwrap();
        println!("browser: {line}");
        if line == "READY" {
            // The VM the browser created is real: give it a web server for the ports page to link.
            let vms = d.rpc("vm.list", json!({}));
            let names: Vec<&str> = vms["vms"].as_array().unwrap().iter().filter_map(|v| v["name"].as_str()).collect();
            assert_eq!(names, [vm], "only the browser's VM exists: the cross-site POSTs created nothing");
            assert_eq!(d.rpc("vm.show", json!({"vm": vm}))["state"], "running");
            d.guest_ok(
                vm,
                &format!("mkdir -p /srv && echo served-by-{vm} > /srv/index.html && busybox httpd -p 8080 -h /srv"),
            );
            writeln!(stdin, "go").unwrap();
        }
        transcript.push(line);
    }
    let status = driver.0.wait().unwrap();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert!(status.success(), "browser run failed:\n{}\n{stderr}", transcript.join("\n"));
    assert!(transcript.iter().any(|l| l == "READY"), "the browser never saw the VM ready");

    // What the browser did, seen from the daemon: the VM is gone, and nothing of it is left running.
    assert_eq!(d.rpc("vm.list", json!({}))["vms"], json!([]));
    d.assert_no_leaked_processes();
    for name in ["01-dashboard", "03-created", "05-ports", "06-guest-page", "08-stopped", "09-deleted"] {
        let shot = shots.join(format!("{name}.png"));
        let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
        assert!(size > 1000, "screenshot {} is missing or empty", shot.display());
        println!("screenshot {}", shot.display());
    }
}

#[test]
fn a_non_loopback_listen_address_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[web]\nlisten = \"0.0.0.0:7878\"\n").unwrap();
    let out = Command::new(bin("bangerd"))
        .env("BANGER_SOCKET", dir.path().join("s.sock"))
        .env("BANGER_STATE_DIR", dir.path().join("state"))
        .env("BANGER_CONFIG", &config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("web.listen `0.0.0.0:7878` is not a loopback address"), "{err}");
    assert!(!dir.path().join("state").exists(), "nothing was created");
}
