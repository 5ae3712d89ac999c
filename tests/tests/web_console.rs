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

/// Where the console's login URL comes from, checked the way a user would see it.
fn login_url(d: &TestDaemon) -> String {
    // daemon.status and `banger daemon status` give the login URL; the token behind it is private to root.
    let url = d.rpc("daemon.status", json!({}))["web_url"].as_str().expect("daemon.status has web_url").to_string();
    assert!(url.starts_with("http://127.0.0.1:") && url.contains("/login?token="), "{url}");
    assert!(!url.starts_with("http://127.0.0.1:0/"), "port 0 is replaced by the bound port: {url}");
    let human = String::from_utf8_lossy(&d.cli(&["daemon", "status"]).stdout).to_string();
    assert!(human.contains(&format!("console   {url}")), "{human}");
    let token_file = d.state_dir.join("web-token");
    assert_eq!(std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(url.ends_with(std::fs::read_to_string(&token_file).unwrap().trim()));
    url
}

/// Starts tests/web/console.cjs SCENARIO in the daemon's namespace with the given environment.
fn browser(d: &TestDaemon, scenario: &str, env: &[(&str, &str)]) -> Driver {
    let playwright = std::env::var("BANGER_TEST_PLAYWRIGHT")
        .expect("BANGER_TEST_PLAYWRIGHT is not set: scripts/test.sh installs playwright-core and sets it");
    assert!(Path::new("/usr/bin/chromium").exists(), "no /usr/bin/chromium: scripts/setup-host.sh installs it");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &d.netns.name, "node"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("web/console.cjs"))
        .arg(scenario)
        .env("BANGER_TEST_PLAYWRIGHT", &playwright)
        .env("WEB_URL", login_url(d))
        .env("SHOTS", d.dir.path().join("screenshots"))
        // Chromium's profile lands in the test's directory, so the harness finds and ends a stray browser.
        .env("TMPDIR", d.dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        // A file, not a pipe: a pipe nobody reads until the end would block the driver once it fills.
        .stderr(std::fs::File::create(d.dir.path().join(format!("browser-{scenario}.err"))).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Driver(cmd.spawn().expect("running node"))
}

impl Driver {
    /// Echoes the driver's output, answers `READY` with `on_ready`, and fails the test if the run failed.
    fn finish(mut self, d: &TestDaemon, scenario: &str, mut on_ready: impl FnMut()) -> Vec<String> {
        let mut stdin = self.0.stdin.take().unwrap();
        let mut transcript = vec![];
        for line in BufReader::new(self.0.stdout.take().unwrap()).lines() {
            let line = line.unwrap();
            println!("browser: {line}");
            if line == "READY" {
                on_ready();
                writeln!(stdin, "go").unwrap();
            }
            transcript.push(line);
        }
        let status = self.0.wait().unwrap();
        let stderr = std::fs::read_to_string(d.dir.path().join(format!("browser-{scenario}.err"))).unwrap_or_default();
        assert!(status.success(), "browser run failed:\n{}\n{stderr}", transcript.join("\n"));
        transcript
    }
}

/// Checks the screenshots exist, prints their paths, and copies them to $BANGER_TEST_SCREENSHOTS if set
/// (the test's directory is deleted when it ends).
fn screenshots(d: &TestDaemon, names: &[&str]) {
    let shots = d.dir.path().join("screenshots");
    let keep = std::env::var_os("BANGER_TEST_SCREENSHOTS").map(std::path::PathBuf::from);
    for name in names {
        let shot = shots.join(format!("{name}.png"));
        let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
        assert!(size > 1000, "screenshot {} is missing or empty", shot.display());
        println!("screenshot {}", shot.display());
        if let Some(dir) = &keep {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::copy(&shot, dir.join(format!("{name}.png"))).unwrap();
        }
    }
}

#[test]
fn a_browser_builds_an_image_with_live_stages_and_cancels_a_second_build() {
    let d = TestDaemon::start_with_config("[web]\nlisten = \"127.0.0.1:0\"");
    d.register_test_image();
    let quick = d.dir.path().join("quick.sh");
    std::fs::write(&quick, "#!/bin/sh\necho built-in-the-browser > \"$1/etc/web-built\"\n").unwrap();
    let pid_file = d.dir.path().join("slow.pid");
    let slow = d.dir.path().join("slow.sh");
    std::fs::write(&slow, format!("#!/bin/sh\nsleep 600 &\necho $! > {}\nwait\n", pid_file.display())).unwrap();
    for s in [&quick, &slow] {
        std::fs::set_permissions(s, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let (quick_s, slow_s) = (quick.display().to_string(), slow.display().to_string());
    let driver = browser(&d, "image", &[("QUICK_SCRIPT", &quick_s), ("SLOW_SCRIPT", &slow_s)]);
    driver.finish(&d, "image", || panic!("the image scenario never waits"));

    let images = d.rpc("image.list", json!({}));
    let names: Vec<&str> = images["images"].as_array().unwrap().iter().filter_map(|i| i["name"].as_str()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.contains(&"webbuilt") && !names.contains(&"webslow"), "{names:?}");
    // The cancel reached the script: its child is gone.
    let sleeper: u32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    wait_until("the cancelled script's child to die", std::time::Duration::from_secs(10), || !process_alive(sleeper));
    screenshots(&d, &["10-build-running", "11-build-done", "12-build-customizing", "13-build-cancelled"]);
}

#[test]
fn a_browser_logs_in_creates_a_vm_watches_it_boot_opens_its_ports_then_stops_and_deletes_it() {
    let d = TestDaemon::start_with_config("[web]\nlisten = \"127.0.0.1:0\"");
    d.register_test_image();
    let vm = "webvm";
    let driver = browser(&d, "vm", &[("VM_NAME", vm)]);
    let transcript = driver.finish(&d, "vm", || {
        // The VM the browser created is real: give it a web server for the ports page to link.
        let vms = d.rpc("vm.list", json!({}));
        let names: Vec<&str> = vms["vms"].as_array().unwrap().iter().filter_map(|v| v["name"].as_str()).collect();
        assert_eq!(names, [vm], "only the browser's VM exists: the cross-site POSTs created nothing");
        assert_eq!(d.rpc("vm.show", json!({"vm": vm}))["state"], "running");
        d.guest_ok(
            vm,
            &format!("mkdir -p /srv && echo served-by-{vm} > /srv/index.html && busybox httpd -p 8080 -h /srv"),
        );
        // And a session, for the VM page to list.
        d.rpc("session.start", json!({"vm": vm, "name": "webjob", "command": ["sleep", "600"]}));
    });
    assert!(transcript.iter().any(|l| l == "READY"), "the browser never saw the VM ready");

    // What the browser did, seen from the daemon: the VM is gone, and nothing of it is left running.
    assert_eq!(d.rpc("vm.list", json!({}))["vms"], json!([]));
    d.assert_no_leaked_processes();
    screenshots(&d, &["01-dashboard", "03-created", "04-vm", "05-ports", "06-guest-page", "08-stopped", "09-deleted"]);
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

/// Fetches console pages as a logged-in browser would (the token exchanged for the session cookie), with
/// Python's urllib in the daemon's namespace; returns each page's raw HTML.
fn fetch_pages(d: &TestDaemon, paths: &[&str]) -> Vec<String> {
    let script = r#"
import http.cookiejar, json, sys, urllib.request
login = sys.argv[1]
base = login.split("/login")[0]
opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
opener.open(login, timeout=10).read()
print(json.dumps([opener.open(base + p, timeout=30).read().decode() for p in sys.argv[2:]]))
"#;
    let url = login_url(d);
    let mut args = vec!["python3", "-c", script, &url];
    args.extend_from_slice(paths);
    let out = d.netns.exec(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn attack_markup_from_a_guest_is_inert_in_the_console() {
    let d = TestDaemon::start_with_config("[web]\nlisten = \"127.0.0.1:0\"");
    d.register_test_image();
    d.rpc("vm.create", json!({"name": "marked", "memory_mib": 256}));
    // A listener whose process name and command line are markup, a session whose command is, and a console
    // line that is: all of it reaches the console's pages.
    let listener = r#"
        use Socket;
        open(my $c, ">", "/proc/self/comm") or die; print $c "<script>"; close $c;
        socket(S, PF_INET, SOCK_STREAM, 0) or die; setsockopt(S, SOL_SOCKET, SO_REUSEADDR, 1);
        bind(S, sockaddr_in(7777, INADDR_ANY)) or die; listen(S, 5) or die; sleep 600;
    "#;
    d.guest_ok(
        "marked",
        &format!(
            "setsid perl -e '{listener}' '\"><script>alert(1)</script>' </dev/null >/dev/null 2>&1 &
             echo '<script>alert(2)</script>banger-console-markup' > /dev/console"
        ),
    );
    d.rpc(
        "session.start",
        json!({"vm": "marked", "command": ["sh", "-c", "sleep 600 # <img src=x onerror=alert(3)>"]}),
    );
    wait_until("the guest listener", std::time::Duration::from_secs(30), || {
        d.rpc("vm.ports", json!({"vm": "marked"}))["ports"]
            .as_array()
            .is_some_and(|p| p.iter().any(|x| x["port"] == 7777))
    });
    wait_until("the console line", std::time::Duration::from_secs(30), || {
        d.rpc("vm.logs", json!({"vm": "marked"}))["lines"].to_string().contains("banger-console-markup")
    });

    let pages = fetch_pages(&d, &["/vms/marked/ports", "/vms/marked"]);
    let (ports, vm) = (&pages[0], &pages[1]);
    for (name, html) in [("ports", ports), ("vm", vm)] {
        assert!(!html.contains("<script>") && !html.contains("<img"), "live markup on the {name} page:\n{html}");
    }
    // It is shown, as text.
    assert!(ports.contains("&lt;script&gt;"), "the process name is not shown:\n{ports}");
    assert!(ports.contains("&quot;&gt;&lt;script&gt;alert(1)"), "the command line is not shown:\n{ports}");
    assert!(vm.contains("&lt;script&gt;alert(2)&lt;/script&gt;banger-console-markup"), "console line:\n{vm}");
    assert!(vm.contains("&lt;img src=x onerror=alert(3)&gt;"), "session command:\n{vm}");
    d.rpc("vm.delete", json!({"vms": ["marked"]}));
    d.assert_no_leaked_processes();
}
