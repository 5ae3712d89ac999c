//! The VM network, with real guests: names resolve to addresses for guests and the host, guests reach each
//! other, never the host's services, and reach other networks only with NAT. A second namespace plays the
//! outside world (TEST-NET-2 addresses, owned by this test), so no traffic leaves the test's namespaces.
use std::process::Command;

use banger_e2e::*;

#[test]
fn guests_resolve_and_reach_each_other_and_the_host_reaches_them_by_name() {
    let d = TestDaemon::start();
    d.register_test_image();
    let a = d.rpc("vm.create", json!({"name": "alpha", "memory_mib": 256}));
    let b = d.rpc("vm.create", json!({"name": "beta", "memory_mib": 256}));
    let (a_ip, b_ip) = (a["ip"].as_str().unwrap().to_string(), b["ip"].as_str().unwrap().to_string());
    assert_ne!(a_ip, b_ip);
    assert_eq!(b["dns_name"], "beta.vm");

    // Names resolve inside guests, to the right addresses; bare names work through `search vm`.
    assert_eq!(d.guest_ok("alpha", "getent hosts beta.vm | cut -d' ' -f1").trim(), b_ip);
    assert_eq!(d.guest_ok("alpha", "getent hosts beta | cut -d' ' -f1").trim(), b_ip);

    // Guest to guest over TCP, by name.
    d.guest_ok("beta", "mkdir -p /srv && echo served-by-beta > /srv/index.html && busybox httpd -p 8080 -h /srv");
    assert_eq!(d.guest_ok("alpha", "timeout 5 busybox wget -q -O - http://beta.vm:8080/"), "served-by-beta\n");

    // Host to guest, by name (the host resolver in this namespace points at banger's DNS).
    let out = d.netns.exec(&[
        "python3",
        "-c",
        "import urllib.request as u; print(u.urlopen('http://beta.vm:8080/', timeout=5).read().decode(), end='')",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "served-by-beta\n", "{}", String::from_utf8_lossy(&out.stderr));

    // A stopped VM's name no longer resolves; its address stays reserved for it.
    d.rpc("vm.stop", json!({"vms": ["beta"]}));
    let out = d.netns.exec(&["getent", "hosts", "beta.vm"]);
    assert!(!out.status.success(), "beta.vm still resolves after stop");
    d.rpc("vm.start", json!({"vms": ["beta"]}));
    assert_eq!(d.rpc("vm.show", json!({"vm": "beta"}))["ip"], json!(b_ip));
    assert_eq!(d.guest_ok("alpha", "getent hosts beta.vm | cut -d' ' -f1").trim(), b_ip);

    d.rpc("vm.delete", json!({"vms": ["alpha", "beta"]}));
    d.assert_no_leaked_processes();
}

#[test]
fn guests_cannot_reach_host_services_and_reach_outside_only_with_nat() {
    let d = TestDaemon::start();
    let outside = OutsideWorld::new(&d.netns);
    d.register_test_image();
    // A service on the host side of the bridge: guests must not reach it (the daemon's own sockets alike).
    let mut host_service = Command::new("ip")
        .args(["netns", "exec", &d.netns.name, "python3", "-m", "http.server", "8099", "--bind", GATEWAY])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    d.rpc("vm.create", json!({"name": "walled", "memory_mib": 256}));
    d.rpc("vm.create", json!({"name": "natted", "memory_mib": 256, "nat": true}));
    let natted_ip = d.rpc("vm.show", json!({"vm": "natted"}))["ip"].as_str().unwrap().to_string();

    let fetch = "timeout 3 busybox wget -q -O - http://198.51.100.2:8080/hello.txt";
    assert_eq!(d.guest_ok("natted", fetch), "hello from outside\n");
    let log = outside.server_log();
    assert!(log.contains("198.51.100.1"), "the outside saw the masqueraded host address: {log}");
    assert!(!log.contains(&natted_ip), "the guest's own address leaked outside: {log}");
    assert_ne!(d.guest_sh("walled", fetch)["exit_code"], 0, "a VM without NAT reached the outside");

    for vm in ["walled", "natted"] {
        let r = d.guest_sh(vm, &format!("timeout 3 busybox wget -q -O - http://{GATEWAY}:8099/"));
        assert_ne!(r["exit_code"], 0, "{vm} reached a host service: {r}");
        // DNS on the host is the one thing allowed.
        assert_eq!(d.guest_ok(vm, "getent hosts walled.vm | wc -l").trim(), "1");
    }

    // The NAT rule lives exactly as long as the VM runs.
    let set = || {
        String::from_utf8_lossy(&d.netns.exec(&["nft", "list", "set", "inet", "banger", "nat_sources"]).stdout)
            .to_string()
    };
    assert!(set().contains(&natted_ip), "{}", set());
    d.rpc("vm.stop", json!({"vms": ["natted"]}));
    assert!(!set().contains(&natted_ip), "NAT rule survived stop: {}", set());

    let _ = host_service.kill();
    let _ = host_service.wait();
    d.rpc("vm.delete", json!({"vms": ["walled", "natted"]}));
    drop(outside);
}

#[test]
fn taps_come_from_a_warm_pool_and_nothing_network_leaks_across_a_crash() {
    let mut d = TestDaemon::start();
    d.register_test_image();
    assert_eq!(d.taps().len(), 2, "the warm pool holds two idle TAPs: {:?}", d.taps());
    d.rpc("vm.create", json!({"name": "one", "memory_mib": 256}));
    d.rpc("vm.create", json!({"name": "two", "memory_mib": 256}));
    d.rpc("vm.create", json!({"name": "three", "memory_mib": 256}));
    assert_eq!(d.taps().len(), 3, "three running VMs, pool drained: {:?}", d.taps());
    d.rpc("vm.delete", json!({"vms": ["one", "two"]}));
    assert_eq!(d.taps().len(), 3, "one in use, two back in the pool: {:?}", d.taps());

    // The daemon dies; the VM dies with nobody watching; the next daemon finds the leftovers.
    let three = d.rpc("vm.show", json!({"vm": "three"}));
    let pid = three["pid"].as_u64().unwrap() as i32;
    let jail = std::path::Path::new("/run/banger-jails").join(three["id"].as_str().unwrap());
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let memory_cgroup = cgroups.lines().find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()));
    assert!(jail.is_dir(), "{} while the VM runs", jail.display());
    d.crash_and_restart_with(|| {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        // A contained VMM is PID 1 of its own namespace: its death (the namespace torn down) trails the signal,
        // and the next daemon must meet a dead VM, not a dying one.
        wait_until("the VMM is dead", std::time::Duration::from_secs(10), || !process_alive(pid as u32));
    });
    assert_eq!(d.rpc("vm.show", json!({"vm": "three"}))["state"], "stopped");
    assert_eq!(d.taps().len(), 2, "only the warm pool is left: {:?}", d.taps());
    // Nor of its containment: the jail's folder and the cgroup of a VMM that died unwatched are gone.
    assert!(!jail.exists(), "{} left behind", jail.display());
    if let Some(path) = memory_cgroup {
        let dir = std::path::Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    let out = d.netns.exec(&["getent", "hosts", "three.vm"]);
    assert!(!out.status.success(), "a dead VM's name still resolves");
    d.rpc("vm.delete", json!({"vms": ["three"]}));
    d.assert_no_leaked_processes();
}

#[test]
fn ports_lists_listeners_with_processes_labels_web_services_and_shows_each_once() {
    let d = TestDaemon::start();
    d.register_test_image();
    d.rpc("vm.create", json!({"name": "webby", "memory_mib": 256}));
    d.guest_ok(
        "webby",
        "mkdir -p /srv && echo hi > /srv/index.html && busybox httpd -p 8080 -h /srv \
        && busybox httpd -p 127.0.0.1:9090 -h /srv && (busybox nc -l -p 7000 >/dev/null 2>&1 &) && sleep 0.3",
    );
    let r = d.rpc("vm.ports", json!({"vm": "webby"}));
    let ports = r["ports"].as_array().unwrap();
    let find =
        |port: u64| ports.iter().find(|p| p["port"] == port).unwrap_or_else(|| panic!("no port {port}: {r}")).clone();
    let web = find(8080);
    assert_eq!(web["proto"], "http", "{web}");
    assert_eq!(web["endpoint"], "http://webby.vm:8080/");
    assert_eq!(web["process"], "busybox");
    assert!(web["command"].as_str().unwrap().contains("httpd -p 8080"), "{web}");
    let local = find(9090);
    assert_eq!(local["endpoint"], "127.0.0.1:9090 (guest only)", "{local}");
    let raw = find(7000);
    assert_eq!(raw["proto"], "tcp", "{raw}");
    assert_eq!(raw["endpoint"], "webby.vm:7000");
    // Shown once each, whatever mix of IPv4 and IPv6 sockets the programs bound.
    let mut keys: Vec<(String, String)> =
        ports.iter().map(|p| (p["proto"].to_string(), p["endpoint"].to_string())).collect();
    let n = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), n, "duplicate rows: {r}");
    // The human table.
    let out = d.cli(&["vm", "ports", "webby"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.starts_with("PROTO") && table.contains("ENDPOINT") && table.contains("http://webby.vm:8080/"),
        "{table}"
    );
    d.rpc("vm.delete", json!({"vms": ["webby"]}));
}

#[test]
fn vm_ssh_and_plain_ssh_by_name_log_in_with_the_managed_key() {
    let d = TestDaemon::start();
    d.register_test_image();
    d.rpc("vm.create", json!({"name": "shelly", "memory_mib": 256}));
    let key = d.rpc("daemon.status", json!({}))["ssh_key"].as_str().unwrap().to_string();
    assert!(std::path::Path::new(&key).exists(), "managed key generated at {key}");
    // The image carried no host key; this VM made its own.
    // The guest makes its host key and starts sshd right after its agent answers.
    let r = d.guest_ok(
        "shelly",
        "for i in $(seq 100); do [ -f /root/.ssh/authorized_keys ] && [ -f /etc/ssh/ssh_host_ed25519_key.pub ] && break; \
         sleep 0.1; done; ls /etc/ssh/ssh_host_ed25519_key && cat /root/.ssh/authorized_keys",
    );
    assert!(r.contains("banger-managed"), "{r}");
    let out = d.vm_ssh("shelly", &["sh", "-c", "echo $(id -un)@$(hostname)"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "root@shelly\n", "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("shelly is still running"), "reminder on exit");
    // Plain ssh with the managed config block: `ssh shelly.vm`.
    let config = d.dir.path().join("ssh_config");
    let out = d.netns.exec(&["ssh", "-F", config.to_str().unwrap(), "-o", "BatchMode=yes", "shelly.vm", "hostname"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "shelly\n", "{}", String::from_utf8_lossy(&out.stderr));
    d.rpc("vm.delete", json!({"vms": ["shelly"]}));
}
