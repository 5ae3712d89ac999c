//! Warm starts with real guests: clones restored from one template are distinct VMs (MAC, address, hostname,
//! RNG output, SSH host key, clock) that run commands, resolve by name and survive stop/start; a stale or
//! broken template is never restored (the VM boots cold and says why); the warm pool hands out ready VMs and
//! stays within host memory; the Debian cloud kernel still boots as the fallback to the lean kernel.
use std::time::Duration;

use banger_e2e::*;
use serde_json::{json, Value};

fn boot_mode(vm: &Value) -> &str {
    vm["boot"]["mode"].as_str().unwrap_or_else(|| panic!("no boot info in {vm}"))
}

fn cold_reason(vm: &Value) -> String {
    assert_eq!(boot_mode(vm), "cold", "{vm}");
    vm["boot"]["cold_reason"].as_str().unwrap_or_default().to_string()
}

/// What makes a guest itself, read from inside it.
struct Identity {
    mac: String,
    ip: String,
    hostname: String,
    random: String,
    host_key: String,
    clock_skew_secs: i64,
}

fn identity(d: &TestDaemon, vm: &str) -> Identity {
    let out = d.guest_ok(
        vm,
        "cat /sys/class/net/eth0/address; ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1; hostname; \
         head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
         for i in $(seq 50); do [ -f /etc/ssh/ssh_host_ed25519_key.pub ] && break; sleep 0.2; done; \
         cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub; date +%s",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 6, "identity of {vm}: {out}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    Identity {
        mac: lines[0].into(),
        ip: lines[1].into(),
        hostname: lines[2].into(),
        random: lines[3].into(),
        host_key: lines[4].into(),
        clock_skew_secs: (now - lines[5].parse::<i64>().unwrap()).abs(),
    }
}

#[test]
fn two_clones_of_one_template_are_distinct_vms_that_resolve_and_survive_stop_start() {
    let d = TestDaemon::start();
    d.register_test_image();
    let t = d.rpc("image.warm", json!({"memory_mib": 256}));
    assert_eq!(t["reused"], false, "{t}");
    assert!(t["build_ms"].as_u64().unwrap() > 0, "{t}");
    // The same inputs again: the template is reused, nothing is built.
    let again = d.rpc("image.warm", json!({"memory_mib": 256}));
    assert_eq!((again["reused"].clone(), again["generation"].clone()), (json!(true), t["generation"].clone()));

    // Let the template age, so a clone that kept its clock would be visibly behind the host.
    std::thread::sleep(Duration::from_secs(10));
    let a = d.rpc("vm.create", json!({"name": "clone-a", "memory_mib": 256}));
    let b = d.rpc("vm.create", json!({"name": "clone-b", "memory_mib": 256}));
    assert_eq!((boot_mode(&a), boot_mode(&b)), ("warm", "warm"), "{a}\n{b}");
    // Clones are contained like cold boots: each VMM as a uid of its own under the seccomp sandbox (the
    // kernel's view, through vm show).
    let contained = |vm: &str| d.rpc("vm.show", json!({"vm": vm}))["containment"].clone();
    let (ca, cb) = (contained("clone-a"), contained("clone-b"));
    assert_eq!((ca["contained"].clone(), ca["seccomp"].clone()), (json!(true), json!(true)), "{ca}");
    assert_eq!(cb["contained"], true, "{cb}");
    assert_ne!(ca["uid"], cb["uid"], "each clone has a uid of its own");
    assert_clone_cannot_write_its_template(&d, &a);

    let (ia, ib) = (identity(&d, "clone-a"), identity(&d, "clone-b"));
    assert_ne!(ia.mac, ib.mac, "MACs");
    assert_ne!(ia.mac, "52:54:00:b0:00:01", "clone-a kept the template's MAC");
    assert_ne!(ib.mac, "52:54:00:b0:00:01", "clone-b kept the template's MAC");
    assert_eq!((ia.ip.as_str(), ib.ip.as_str()), (a["ip"].as_str().unwrap(), b["ip"].as_str().unwrap()));
    assert_ne!(ia.ip, ib.ip);
    assert_eq!((ia.hostname.as_str(), ib.hostname.as_str()), ("clone-a", "clone-b"));
    assert_eq!(ia.random.len(), 64);
    assert_ne!(ia.random, ib.random, "both clones drew the same random bytes: the RNG was not reseeded");
    assert_ne!(ia.host_key, ib.host_key, "both clones have the same SSH host key");
    assert!(
        ia.clock_skew_secs <= 5 && ib.clock_skew_secs <= 5,
        "guest clocks are off the host's by {}/{} s",
        ia.clock_skew_secs,
        ib.clock_skew_secs
    );

    // Both run commands, reach each other by name, and the host reaches them by name.
    assert_eq!(d.guest_ok("clone-a", "getent hosts clone-b.vm | cut -d' ' -f1").trim(), ib.ip);
    assert_eq!(d.guest_ok("clone-b", "getent hosts clone-a | cut -d' ' -f1").trim(), ia.ip);
    d.guest_ok("clone-b", "mkdir -p /srv && echo served-by-b > /srv/index.html && busybox httpd -p 8080 -h /srv");
    assert_eq!(d.guest_ok("clone-a", "timeout 5 busybox wget -q -O - http://clone-b.vm:8080/"), "served-by-b\n");
    let ssh = d.vm_ssh("clone-a", &["hostname"]);
    assert!(ssh.status.success(), "ssh into a clone: {}", String::from_utf8_lossy(&ssh.stderr));
    assert_eq!(String::from_utf8_lossy(&ssh.stdout).trim(), "clone-a");

    // Work written before a stop is there after the start (a cold boot from the clone's own disks, which sit
    // on the template's), and the VM keeps its identity.
    d.guest_ok("clone-a", "echo kept > /root/marker && echo kept-too > /etc/marker && sync");
    d.rpc("vm.stop", json!({"vms": ["clone-a", "clone-b"]}));
    let started = d.rpc("vm.start", json!({"vms": ["clone-a", "clone-b"]}));
    for o in started["results"].as_array().unwrap() {
        assert_eq!(o["info"]["state"], "running", "{o}");
        assert_eq!(o["info"]["boot"]["mode"], "cold", "{o}");
    }
    assert_eq!(d.guest_ok("clone-a", "cat /root/marker /etc/marker"), "kept\nkept-too\n");
    let (ja, jb) = (identity(&d, "clone-a"), identity(&d, "clone-b"));
    assert_eq!((ja.mac, ja.ip.clone(), ja.hostname), (ia.mac, ia.ip.clone(), ia.hostname));
    assert_eq!((jb.ip.clone(), jb.hostname), (ib.ip.clone(), ib.hostname));
    assert_eq!(ja.host_key, ia.host_key, "the host key survives a restart");
    assert_eq!(d.guest_ok("clone-b", "getent hosts clone-a.vm | cut -d' ' -f1").trim(), ia.ip);

    // The template is kept while VMs sit on it; deleting them and the image removes it.
    d.rpc("vm.delete", json!({"vms": ["clone-a", "clone-b"]}));
    d.rpc("image.delete", json!({"image": "test"}));
    let templates = d.state_dir.join("templates");
    wait_until("the template to be removed with its image", Duration::from_secs(10), || {
        walk_files(&templates).is_empty()
    });
    d.assert_no_leaked_processes();
}

/// Regular files under a folder (recursively).
fn walk_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                out.extend(walk_files(&p));
            } else if p.is_file() {
                out.push(p);
            }
        }
    }
    out
}

/// What a compromised clone VMM would do to poison every later clone: write its template's RAM. The clone
/// maps a sealed memfd (`sealed_ram`), on every QEMU version: reopened read-write through the clone's own
/// descriptor (as the VMM can, and as QEMU before 8.2 does), a write is refused by the kernel, even to root;
/// and the template's RAM file is not in the clone's mount namespace at all.
fn assert_clone_cannot_write_its_template(d: &TestDaemon, vm: &Value) {
    use std::os::unix::fs::FileExt;
    let pid = d.qemu_pid(vm);
    let ram_fd = (3..64)
        .map(|fd| format!("/proc/{pid}/fd/{fd}"))
        .find(|p| std::fs::read_link(p).is_ok_and(|t| t.to_string_lossy().starts_with("/memfd:banger-template-ram")))
        .unwrap_or_else(|| {
            panic!(
                "the clone maps no sealed template RAM: {:?}",
                std::fs::read_dir(format!("/proc/{pid}/fd"))
                    .unwrap()
                    .flatten()
                    .map(|e| std::fs::read_link(e.path()).ok())
                    .collect::<Vec<_>>()
            )
        });
    let ram = std::fs::OpenOptions::new().read(true).write(true).open(&ram_fd).unwrap();
    let mut first = [0u8; 16];
    ram.read_exact_at(&mut first, 0).unwrap();
    let refused = ram.write_at(b"poisoned", 0).expect_err("a write to the template's RAM was allowed");
    assert_eq!(refused.raw_os_error(), Some(libc::EPERM), "{refused}");
    let hole = nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE;
    assert!(nix::fcntl::fallocate(&ram, hole, 0, 4096).is_err(), "a hole was punched in the template's RAM");
    let mut again = [0u8; 16];
    ram.read_exact_at(&mut again, 0).unwrap();
    assert_eq!(first, again);
    let ram_file = current_template(d).join("ram");
    assert!(ram_file.is_file(), "{}", ram_file.display());
    let seen_by_vmm = format!("/proc/{pid}/root{}", ram_file.display());
    assert!(std::fs::symlink_metadata(&seen_by_vmm).is_err(), "the clone's VMM sees the template's RAM file");
}

/// The current template generation's folder.
fn current_template(d: &TestDaemon) -> std::path::PathBuf {
    let slots: Vec<_> = std::fs::read_dir(d.state_dir.join("templates")).unwrap().flatten().collect();
    assert_eq!(slots.len(), 1, "one template slot");
    std::fs::canonicalize(slots[0].path().join("current")).unwrap()
}

#[test]
fn a_stale_or_broken_template_is_never_restored() {
    let d = TestDaemon::start();
    d.register_test_image();
    let gen1 = d.rpc("image.warm", json!({"memory_mib": 256}))["generation"].clone();

    // Asked for: cold, and said so.
    let v = d.rpc("vm.create", json!({"name": "asked-cold", "memory_mib": 256, "boot": "cold"}));
    assert!(cold_reason(&v).contains("requested"), "{v}");
    // Another shape has no template.
    let v = d.rpc("vm.create", json!({"name": "other-shape", "memory_mib": 320}));
    assert!(cold_reason(&v).contains("no template"), "{v}");
    d.rpc("vm.delete", json!({"vms": ["asked-cold", "other-shape"]}));

    // Made by another banger build: stale.
    let dir = current_template(&d);
    let meta_path = dir.join("meta.json");
    let original = std::fs::read_to_string(&meta_path).unwrap();
    let mut meta: Value = serde_json::from_str(&original).unwrap();
    meta["inputs"]["banger"] = json!("0.0.1+an-older-build");
    std::fs::write(&meta_path, meta.to_string()).unwrap();
    let v = d.rpc("vm.create", json!({"name": "after-upgrade", "memory_mib": 256}));
    assert!(cold_reason(&v).contains("banger's version changed"), "{v}");
    assert_eq!(d.guest_ok("after-upgrade", "hostname").trim(), "after-upgrade");
    d.rpc("vm.delete", json!({"vms": ["after-upgrade"]}));
    std::fs::write(&meta_path, &original).unwrap();

    // Files cut short: never restored.
    let (ram, kept) = (dir.join("ram"), dir.join("ram.kept"));
    std::fs::rename(&ram, &kept).unwrap();
    std::fs::write(&ram, vec![0u8; 4096]).unwrap();
    let v = d.rpc("vm.create", json!({"name": "short-ram", "memory_mib": 256}));
    assert!(cold_reason(&v).contains("incomplete"), "{v}");
    d.rpc("vm.delete", json!({"vms": ["short-ram"]}));
    std::fs::rename(&kept, &ram).unwrap();

    // A device state QEMU cannot load: the restore fails, the clone's process and disks are gone, and the VM
    // boots cold, saying why.
    let state = dir.join("state");
    let saved = std::fs::read(&state).unwrap();
    std::fs::write(&state, b"this is not a QEMU migration stream").unwrap();
    let v = d.rpc("vm.create", json!({"name": "bad-state", "memory_mib": 256}));
    assert!(cold_reason(&v).contains("restoring the template failed"), "{v}");
    assert_eq!(d.guest_ok("bad-state", "hostname").trim(), "bad-state");
    assert_eq!(d.processes_of_this_test().len(), 1, "only the cold-booted VM runs: {:?}", d.processes_of_this_test());
    d.rpc("vm.delete", json!({"vms": ["bad-state"]}));
    std::fs::write(&state, saved).unwrap();

    // A template that failed to restore is marked failed and not tried again while its inputs stand: the next
    // create boots cold at once (no clone process is started), and image.warm will not quietly rebuild it...
    assert!(dir.join("restore-failed").is_file(), "the failed template is not marked");
    let v = d.rpc("vm.create", json!({"name": "not-retried", "memory_mib": 256}));
    assert!(cold_reason(&v).contains("marked failed"), "{v}");
    let refused = d.rpc_raw("image.warm", json!({"memory_mib": 256}));
    assert!(refused["error"]["message"].as_str().unwrap_or("").contains("marked failed"), "{refused}");
    let way_out = next_steps(&refused["error"]["data"]);
    assert!(way_out.iter().any(|(m, a)| m == "image.warm" && a["rebuild"] == true), "the way out: {refused}");
    d.rpc("vm.delete", json!({"vms": ["not-retried"]}));

    // ...until a rebuild is asked for: a new generation, restored again.
    let rebuilt = d.rpc("image.warm", json!({"memory_mib": 256, "rebuild": true}));
    assert_ne!(rebuilt["generation"], gen1, "{rebuilt}");
    let dir = current_template(&d);
    let v = d.rpc("vm.create", json!({"name": "warm-again", "memory_mib": 256}));
    assert_eq!(boot_mode(&v), "warm", "{v}");
    d.rpc("vm.delete", json!({"vms": ["warm-again"]}));

    // ...until the image's kernel changes: stale, and `image.warm` replaces it, saying why.
    let image = d.rpc("image.show", json!({"image": "test"}));
    let kernel = image["kernel"].as_str().unwrap().to_string();
    let f = std::fs::File::options().write(true).open(&kernel).unwrap();
    f.set_modified(std::time::SystemTime::now() + Duration::from_secs(5)).unwrap();
    let v = d.rpc("vm.create", json!({"name": "new-kernel", "memory_mib": 256}));
    assert!(cold_reason(&v).contains("kernel changed"), "{v}");
    let t = d.rpc("image.warm", json!({"memory_mib": 256}));
    assert_eq!(t["reused"], false);
    assert_ne!(t["generation"], gen1);
    assert!(t["replaced_because"].as_str().unwrap().contains("kernel changed"), "{t}");
    let v = d.rpc("vm.create", json!({"name": "on-new-template", "memory_mib": 256}));
    assert_eq!(boot_mode(&v), "warm", "{v}");
    // The old generation had no VM on it: it is gone; the running clone keeps the new one.
    let generations = std::fs::read_dir(dir.parent().unwrap()).unwrap().flatten();
    assert_eq!(generations.filter(|e| e.file_type().unwrap().is_dir()).count(), 1, "one generation left");
    d.rpc("vm.delete", json!({"vms": ["new-kernel", "on-new-template"]}));
    d.assert_no_leaked_processes();
}

#[test]
fn vsock_guests_boot_cold_and_say_why() {
    // Only the decision is checked here (the vsock guest itself is booted by
    // guest_lifecycle::guests_are_managed_over_vsock_too): the create says why it boots cold, then is cancelled.
    let d = TestDaemon::start_with_config("qemu_channel = \"vsock\"");
    d.register_test_image();
    let e = d.rpc_raw("image.warm", json!({}));
    assert!(e["error"]["message"].as_str().unwrap().contains("vsock"), "{e}");
    let op = d.rpc("vm.create_begin", json!({"name": "vs", "memory_mib": 256}));
    wait_until("the create to say why it boots cold", Duration::from_secs(30), || {
        let s = d.rpc("operation.status", json!({"id": op["id"]}));
        s["detail"].as_str().is_some_and(|t| t.contains("cold boot") && t.contains("vsock"))
    });
    let done = d.rpc("operation.cancel", json!({"id": op["id"]}));
    if done["state"] == "succeeded" {
        d.rpc("vm.delete", json!({"vms": ["vs"]}));
    } else {
        assert_eq!(done["state"], "cancelled", "{done}");
    }
    d.assert_no_leaked_processes();
}

fn pool_status(d: &TestDaemon) -> Value {
    d.rpc("daemon.status", json!({}))["warm_pool"].clone()
}

#[test]
fn the_warm_pool_hands_out_ready_vms_refills_and_stays_within_host_memory() {
    let mut d = TestDaemon::start_with_config(
        "default_memory_mib = 256\n[warm]\npool_size = 1\npools = { second = 1 }\nauto_build = false",
    );
    d.register_test_image();
    let img = test_image();
    d.rpc(
        "image.register",
        json!({"name": "second", "kernel": img.kernel, "kernel_elf": img.kernel_elf, "rootfs": img.rootfs,
               "work_seed": img.work_seed}),
    );
    // Registering the images fills their pools (building each one's template first).
    wait_until("the pools to fill", Duration::from_secs(180), || pool_status(&d)["ready"] == 2);
    let status = d.cli(&["daemon", "status"]);
    let status = String::from_utf8_lossy(&status.stdout);
    let line = status.lines().find(|l| l.starts_with("warm pool")).unwrap_or_default();
    assert!(line.contains("test 1/1 ready") && line.contains("second 1/1 ready"), "{status}");
    let v = d.rpc("vm.create", json!({"name": "pooled"}));
    assert_eq!(boot_mode(&v), "pool", "{v}");
    let other = d.rpc("vm.create", json!({"name": "pooled-second", "image": "second"}));
    assert_eq!((boot_mode(&other), other["image"].as_str()), ("pool", Some("second")), "{other}");
    assert_eq!(d.guest_ok("pooled-second", "hostname").trim(), "pooled-second");
    d.rpc("vm.delete", json!({"vms": ["pooled-second"]}));
    let i = identity(&d, "pooled");
    assert_eq!((i.hostname.as_str(), i.ip.as_str()), ("pooled", v["ip"].as_str().unwrap()));
    assert!(i.clock_skew_secs <= 5);
    // Its new address came without a flush of the link: the IPv6 link-local address (of its new MAC) is there.
    let v6 = d.guest_ok("pooled", "cat /proc/net/if_inet6");
    assert!(v6.lines().any(|l| l.starts_with("fe80") && !l.ends_with(" lo")), "{v6}");
    let out = d.netns.exec(&["getent", "hosts", "pooled.vm"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).split_whitespace().next(), v["ip"].as_str());
    // It keeps the uid it was pooled with (recorded when it was handed out): its VMM runs as it, and so does
    // the VMM of its next start.
    let show = || d.rpc("vm.show", json!({"vm": "pooled"}));
    let pooled_uid = show()["containment"]["uid"].as_u64().unwrap();
    let vmm_uid = |vm: &Value| proc_status(d.qemu_pid(vm), "Uid").split_whitespace().next().unwrap().to_string();
    assert_eq!(vmm_uid(&show()), pooled_uid.to_string());
    d.rpc("vm.stop", json!({"vm": "pooled"}));
    d.rpc("vm.start", json!({"vm": "pooled"}));
    assert_eq!(show()["containment"]["uid"], pooled_uid, "the uid was kept across stop and start");
    assert_eq!(vmm_uid(&show()), pooled_uid.to_string());
    // It refills in the background; another shape is not served from it.
    wait_until("the pools to refill", Duration::from_secs(120), || pool_status(&d)["ready"] == 2);
    let v = d.rpc("vm.create", json!({"name": "bigger", "memory_mib": 320}));
    assert_eq!(boot_mode(&v), "cold", "{v}");
    assert_eq!(pool_status(&d)["ready"], 2);
    d.rpc("vm.delete", json!({"vms": ["pooled", "bigger"]}));

    // A daemon stop ends pooled VMs (they have no record); the next start refills.
    d.restart();
    wait_until("the pools to fill after a restart", Duration::from_secs(120), || pool_status(&d)["ready"] == 2);
    assert_eq!(d.processes_of_this_test().len(), 2, "two pooled VMs: {:?}", d.processes_of_this_test());
    drop(d);

    // With less host memory available than the reserve asks for, nothing is pooled.
    let d = TestDaemon::start_with_config(
        "default_memory_mib = 256\n[warm]\npool_size = 2\nauto_build = false\npool_reserve_mib = 100000000",
    );
    d.register_test_image();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        pool_status(&d),
        json!({"size": 2, "ready": 0, "filling": 0, "vcpus": 1, "memory_mib": 256,
               "images": [{"image": "test", "size": 2, "ready": 0, "filling": 0}]})
    );
    assert!(d.daemon_output().contains("host memory is short"), "the log says why the pool is empty");
    assert!(d.processes_of_this_test().is_empty());
}

#[test]
fn the_debian_cloud_kernel_with_its_initramfs_still_boots() {
    let d = TestDaemon::start();
    let var =
        |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set; run the suite with scripts/test.sh"));
    let img = test_image();
    d.rpc(
        "image.register",
        json!({"name": "cloud", "kernel": var("BANGER_TEST_CLOUD_KERNEL"), "kernel_elf": var("BANGER_TEST_CLOUD_KERNEL_ELF"),
               "initrd": var("BANGER_TEST_CLOUD_INITRD"), "rootfs": img.rootfs, "work_seed": img.work_seed, "make_default": true}),
    );
    d.rpc("vm.create", json!({"name": "cloudy", "memory_mib": 256}));
    let release = d.guest_ok("cloudy", "uname -r");
    assert!(release.contains("cloud"), "booted {release}");
    assert_eq!(d.guest_ok("cloudy", "findmnt -no SOURCE /root >/dev/null && echo mounted"), "mounted\n");
}
