//! Attacks from one guest on the others' identity (issue 15, finding 6): a root guest takes another VM's
//! address or MAC, or a NAT VM's address, or answers SSH in another VM's place. Each test performs the attack
//! from a real guest and asserts the host held: the victim keeps its traffic, the attacker's frames are counted
//! as dropped by its TAP's filter (`table bridge banger`), and ssh refuses a host key it did not pin.
use std::time::{Duration, Instant};

use banger_e2e::*;

/// The guest's NIC, whatever the kernel named it (the one Ethernet interface with a device).
const NIC: &str = "IF=$(for i in /sys/class/net/*; do [ -e $i/device ] && basename $i; done | head -1)";

fn mac_of(d: &TestDaemon, vm: &str) -> String {
    d.guest_ok(vm, &format!("{NIC}; cat /sys/class/net/$IF/address")).trim().to_string()
}

fn ip_of(d: &TestDaemon, vm: &str) -> String {
    d.rpc("vm.show", json!({"vm": vm}))["ip"].as_str().unwrap().to_string()
}

fn bridge_table(d: &TestDaemon) -> String {
    let out = d.netns.exec(&["nft", "list", "table", "bridge", "banger"]);
    assert!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The name of the per-TAP chain that pins `mac` (`tap_<TAP>`).
fn chain_of(d: &TestDaemon, mac: &str) -> String {
    let table = bridge_table(d);
    let mut chain = None;
    for line in table.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("chain ").and_then(|l| l.strip_suffix(" {")) {
            chain = Some(name.to_string());
        }
        if line.starts_with(&format!("ether saddr != {mac} ")) {
            return chain.expect("a rule inside a chain");
        }
    }
    panic!("no TAP filter pins {mac}:\n{table}");
}

/// Packets counted by the rule of `chain` whose comment is `comment`.
fn dropped(d: &TestDaemon, chain: &str, comment: &str) -> u64 {
    let out = d.netns.exec(&["nft", "list", "chain", "bridge", "banger", chain]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.contains(&format!("comment \"{comment}\"")))
        .unwrap_or_else(|| panic!("no rule `{comment}` in {chain}:\n{text}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "packets").expect("a counter");
    words[at + 1].parse().unwrap()
}

/// The MAC the host's neighbour table holds for `ip`, after resolving it afresh (so whoever answers ARP now
/// decides, not an old entry) with a TCP connection to port 8080 (the host has no ping).
fn resolve_afresh(d: &TestDaemon, ip: &str) -> String {
    let _ = d.netns.exec(&["ip", "neigh", "flush", "to", ip]);
    let connect = format!("import socket; socket.create_connection(('{ip}', 8080), timeout=3).close()");
    let _ = d.netns.exec(&["python3", "-c", &connect]);
    let out = d.netns.exec(&["ip", "neigh", "show", "to", ip]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace().skip_while(|w| *w != "lladdr").nth(1).unwrap_or("").to_string()
}

/// The host's neighbour entry for `ip` on the bridge, as `ip neigh` shows it.
fn neighbour(d: &TestDaemon, ip: &str) -> String {
    String::from_utf8_lossy(&d.netns.exec(&["ip", "neigh", "show", "to", ip, "dev", "banger0"]).stdout)
        .trim()
        .to_string()
}

/// Takes away the host's pinned neighbour entry for `ip` (as if banger had not pinned it), so that only the
/// bridge filter stands between what guests answer and what the host learns.
fn unpin(d: &TestDaemon, ip: &str) {
    let out = d.netns.exec(&["ip", "neigh", "del", ip, "dev", "banger0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn fetch_from_host(d: &TestDaemon, url: &str) -> String {
    let script = format!("import urllib.request as u; print(u.urlopen('{url}', timeout=5).read().decode(), end='')");
    let out = d.netns.exec(&["python3", "-c", &script]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn serve(d: &TestDaemon, vm: &str) {
    d.guest_ok(vm, &format!("mkdir -p /srv && echo served-by-{vm} > /srv/index.html && busybox httpd -p 8080 -h /srv"));
}

#[test]
fn attack_guest_takes_another_guests_address_with_gratuitous_arp_and_its_frames_are_dropped() {
    let d = TestDaemon::start();
    d.register_test_image();
    d.rpc("vm.create", json!({"name": "alpha", "memory_mib": 256}));
    d.rpc("vm.create", json!({"name": "beta", "memory_mib": 256}));
    let (a_ip, a_mac, b_mac) = (ip_of(&d, "alpha"), mac_of(&d, "alpha"), mac_of(&d, "beta"));
    serve(&d, "alpha");
    serve(&d, "beta");
    assert_eq!(resolve_afresh(&d, &a_ip), a_mac);
    let b_chain = chain_of(&d, &b_mac);
    let arp_before = dropped(&d, &b_chain, "ARP claiming another MAC or address");
    let ip_before = dropped(&d, &b_chain, "spoofed source address");

    // beta takes alpha's address and announces it, both ways busybox knows, and talks from it (to the
    // gateway's MAC given by hand: its own ARP from alpha's address would be dropped first).
    let gw_mac =
        String::from_utf8_lossy(&d.netns.exec(&["cat", "/sys/class/net/banger0/address"]).stdout).trim().to_string();
    let attack = format!(
        "{NIC}; ip addr add {a_ip}/24 dev $IF && busybox arping -U -c 3 -w 3 -I $IF {a_ip}; \
         busybox arping -A -c 3 -w 3 -I $IF {a_ip}; ip neigh replace {GATEWAY} lladdr {gw_mac} dev $IF nud permanent; \
         busybox ping -c 3 -W 1 -I {a_ip} {GATEWAY}; true"
    );
    d.guest_ok("beta", &attack);
    assert!(d.guest_ok("beta", "ip -o -4 addr").contains(&a_ip), "the attack took place");

    // Two layers hold. The host's entry for alpha's address is pinned to alpha's MAC, whatever beta announces.
    let entry = neighbour(&d, &a_ip);
    assert!(entry.contains(&a_mac) && entry.contains("PERMANENT"), "{entry}");
    // With the pin taken away, the host still maps alpha's address to alpha when it asks again (beta's kernel
    // now answers ARP for that address too): the bridge filter drops beta's answers. What it reaches is alpha.
    unpin(&d, &a_ip);
    for _ in 0..3 {
        assert_eq!(resolve_afresh(&d, &a_ip), a_mac, "the host's neighbour entry for alpha moved to beta");
        assert_eq!(fetch_from_host(&d, &format!("http://{a_ip}:8080/")), "served-by-alpha\n");
    }
    assert!(dropped(&d, &b_chain, "ARP claiming another MAC or address") > arp_before, "beta's ARP was not dropped");
    assert!(dropped(&d, &b_chain, "spoofed source address") > ip_before, "beta's IPv4 from alpha's address passed");
    // beta with its own address is not cut off.
    assert_eq!(fetch_from_host(&d, &format!("http://{}:8080/", ip_of(&d, "beta"))), "served-by-beta\n");

    d.rpc("vm.delete", json!({"vms": ["alpha", "beta"]}));
    assert!(!bridge_table(&d).contains(&format!("ether saddr != {a_mac}")), "a deleted VM's filter stayed");
    d.assert_no_leaked_processes();
}

#[test]
fn attack_guest_spoofs_another_guests_mac_and_the_bridge_never_learns_it() {
    let d = TestDaemon::start();
    d.register_test_image();
    d.rpc("vm.create", json!({"name": "alpha", "memory_mib": 256}));
    d.rpc("vm.create", json!({"name": "beta", "memory_mib": 256}));
    let (a_ip, b_ip, a_mac, b_mac) = (ip_of(&d, "alpha"), ip_of(&d, "beta"), mac_of(&d, "alpha"), mac_of(&d, "beta"));
    serve(&d, "alpha");
    let (a_chain, b_chain) = (chain_of(&d, &a_mac), chain_of(&d, &b_mac));
    let a_tap = a_chain.strip_prefix("tap_").unwrap().to_string();
    let before = dropped(&d, &b_chain, "spoofed source MAC");

    // beta wears alpha's MAC (with its own address, then with alpha's) and sends.
    let attack = format!(
        "{NIC}; ip link set $IF address {a_mac} && busybox ping -c 3 -W 1 {GATEWAY}; \
         ip addr add {a_ip}/24 dev $IF; busybox arping -U -c 3 -w 3 -I $IF {a_ip}; true"
    );
    d.guest_ok("beta", &attack);
    assert!(dropped(&d, &b_chain, "spoofed source MAC") > before, "beta's frames with alpha's MAC passed");
    // The bridge still sends alpha's MAC to alpha's TAP, and alpha's traffic reaches alpha.
    let fdb = d.netns.exec(&["bridge", "fdb", "show", "dynamic"]);
    let fdb = String::from_utf8_lossy(&fdb.stdout).into_owned();
    for line in fdb.lines().filter(|l| l.starts_with(&a_mac)) {
        assert!(line.contains(&format!("dev {a_tap} ")), "the bridge learned alpha's MAC elsewhere: {line}");
    }
    assert_eq!(resolve_afresh(&d, &a_ip), a_mac);
    assert_eq!(fetch_from_host(&d, &format!("http://{a_ip}:8080/")), "served-by-alpha\n");

    // Back in its own MAC and address only, beta talks again: the filter pins, it does not punish.
    d.guest_ok("beta", &format!("{NIC}; ip addr del {a_ip}/24 dev $IF; ip link set $IF address {b_mac}"));
    serve(&d, "beta");
    let _ = d.netns.exec(&["ip", "neigh", "flush", "to", &b_ip]);
    assert_eq!(fetch_from_host(&d, &format!("http://{b_ip}:8080/")), "served-by-beta\n");

    d.rpc("vm.delete", json!({"vms": ["alpha", "beta"]}));
    d.assert_no_leaked_processes();
}

#[test]
fn attack_ssh_to_a_vm_never_logs_into_a_guest_that_answers_at_its_address() {
    let d = TestDaemon::start();
    d.register_test_image();
    d.rpc("vm.create", json!({"name": "alpha", "memory_mib": 256}));
    d.rpc("vm.create", json!({"name": "beta", "memory_mib": 256}));
    let (a_ip, b_mac) = (ip_of(&d, "alpha"), mac_of(&d, "beta"));
    let config = d.dir.path().join("ssh_config");
    let config = config.to_str().unwrap();

    // Normal use: no prompts, both ways in.
    let out = d.vm_ssh("alpha", &["hostname"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "alpha\n", "{}", String::from_utf8_lossy(&out.stderr));
    let out = d.netns.exec(&["ssh", "-F", config, "-o", "BatchMode=yes", "alpha.vm", "hostname"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "alpha\n", "{}", String::from_utf8_lossy(&out.stderr));
    let known_hosts = d.state_dir.join("ssh/known_hosts");
    let pinned = std::fs::read_to_string(&known_hosts).unwrap();
    assert!(pinned.lines().any(|l| l.starts_with(&format!("alpha.vm,{a_ip} ssh-ed25519 "))), "{pinned}");
    let block = std::fs::read_to_string(config).unwrap();
    assert!(block.contains("StrictHostKeyChecking yes") && !block.contains("/dev/null"), "{block}");
    // The pin is alpha's own key, as its sshd holds it.
    let alpha_key = d.guest_ok("alpha", "cut -d' ' -f1,2 /etc/ssh/ssh_host_ed25519_key.pub");
    assert!(pinned.contains(alpha_key.trim()), "{pinned} vs {alpha_key}");

    // The network layer is taken out of the way (as if beta's TAP filter were missing), alpha goes quiet, and
    // beta answers at alpha's address: only the pinned host key stands between the user and beta.
    let b_chain = chain_of(&d, &b_mac);
    let out = d.netns.exec(&["nft", "insert", "rule", "bridge", "banger", &b_chain, "accept"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    unpin(&d, &a_ip);
    d.guest_ok("beta", "for i in $(seq 100); do [ -f /etc/ssh/ssh_host_ed25519_key.pub ] && break; sleep 0.1; done");
    d.guest_ok("alpha", &format!("{NIC}; (sleep 1; ip link set $IF down) >/dev/null 2>&1 &"));
    d.guest_ok(
        "beta",
        &format!("{NIC}; ip addr add {a_ip}/24 dev $IF; busybox arping -U -c 2 -w 2 -I $IF {a_ip}; true"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&d.netns.exec(&["ssh-keyscan", "-T", "3", "-t", "ed25519", &a_ip]).stdout)
        .lines()
        .any(|l| {
            !l.starts_with('#') && !l.contains(alpha_key.split(' ').nth(1).unwrap().trim()) && l.contains("ssh-ed25519")
        })
    {
        let _ = d.netns.exec(&["ip", "neigh", "flush", "to", &a_ip]);
        assert!(Instant::now() < deadline, "beta never answered at alpha's address: the attack did not take place");
        std::thread::sleep(Duration::from_millis(300));
    }

    let socket = format!("BANGER_SOCKET={}", d.socket.display());
    let banger = bin("banger");
    let out = d.netns.exec(&["env", &socket, banger.to_str().unwrap(), "vm", "ssh", "alpha", "--", "hostname"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() && !stdout.contains("beta"), "logged into beta: {stdout} {stderr}");
    assert!(
        stderr.contains("Host key verification failed") || stderr.contains("HOST IDENTIFICATION HAS CHANGED"),
        "not a loud host-key failure: {stderr}"
    );
    let out = d.netns.exec(&["ssh", "-F", config, "-o", "BatchMode=yes", "alpha.vm", "hostname"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() && !stdout.contains("beta"), "ssh alpha.vm logged into beta: {stdout} {stderr}");
    assert!(stderr.contains("Host key verification failed"), "{stderr}");

    // A deleted VM's pin goes; a new VM of the same name has a new key, which is pinned and works. beta
    // (which holds alpha's address too) goes first, so nothing answers at that address afterwards.
    d.rpc("vm.delete", json!({"vms": ["beta"]}));
    d.rpc("vm.delete", json!({"vms": ["alpha"]}));
    let left = std::fs::read_to_string(&known_hosts).unwrap();
    assert!(!left.contains("alpha.vm") && !left.contains("beta.vm"), "{left}");
    assert_eq!(neighbour(&d, &a_ip), "", "a deleted VM's address still has a neighbour entry");
    d.rpc("vm.create", json!({"name": "alpha", "memory_mib": 256}));
    // The new alpha has the old one's address and a MAC of its own: the host reaches it at once, not after its
    // stale entry for that address (beta's MAC, learned above) expires.
    let (new_ip, new_mac) = (ip_of(&d, "alpha"), mac_of(&d, "alpha"));
    assert_eq!(new_ip, a_ip, "the test needs the address to be reused");
    let entry = neighbour(&d, &a_ip);
    assert!(entry.contains(&new_mac) && entry.contains("PERMANENT"), "{entry}");
    let out = d.vm_ssh("alpha", &["hostname"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "alpha\n", "{}", String::from_utf8_lossy(&out.stderr));
    let repinned = std::fs::read_to_string(&known_hosts).unwrap();
    assert!(!repinned.contains(alpha_key.split(' ').nth(1).unwrap().trim()), "the old key still pinned: {repinned}");
    d.rpc("vm.delete", json!({"vms": ["alpha"]}));
    d.assert_no_leaked_processes();
}

#[test]
fn attack_guest_without_nat_borrows_a_nat_guests_address_and_gets_no_way_out() {
    let d = TestDaemon::start();
    let outside = OutsideWorld::new(&d.netns);
    d.register_test_image();
    d.rpc("vm.create", json!({"name": "natted", "memory_mib": 256, "nat": true}));
    d.rpc("vm.create", json!({"name": "walled", "memory_mib": 256}));
    let (nat_ip, walled_mac) = (ip_of(&d, "natted"), mac_of(&d, "walled"));
    let fetch = "timeout 4 busybox wget -q -O - http://198.51.100.2:8080/hello.txt";
    assert_eq!(d.guest_ok("natted", fetch), "hello from outside\n");
    let chain = chain_of(&d, &walled_mac);

    // With its own address, the walled VM's way out ends at its own TAP.
    let no_nat = dropped(&d, &chain, "no NAT for this VM");
    assert_ne!(d.guest_sh("walled", fetch)["exit_code"], 0, "a VM without NAT reached the outside");
    assert!(dropped(&d, &chain, "no NAT for this VM") > no_nat, "not stopped at its TAP");

    // It takes the NAT VM's address (alone, with the default route through the gateway) and tries again.
    let spoofed = dropped(&d, &chain, "spoofed source address");
    let seen = outside.requests();
    let attack = format!(
        "{NIC}; ip addr flush dev $IF && ip addr add {nat_ip}/24 dev $IF && ip route add default via {GATEWAY}; \
         busybox arping -U -c 2 -w 2 -I $IF {nat_ip}; {fetch}"
    );
    let r = d.guest_sh("walled", &attack);
    assert_ne!(r["exit_code"], 0, "the borrowed NAT address took the walled VM out: {r}");
    assert!(d.guest_ok("walled", "ip -o -4 addr").contains(&nat_ip), "the attack took place");
    assert_eq!(outside.requests(), seen, "the outside world saw the walled VM's request");
    assert!(
        dropped(&d, &chain, "spoofed source address") + dropped(&d, &chain, "ARP claiming another MAC or address")
            > spoofed,
        "the borrowed address was not dropped at the walled VM's TAP"
    );
    // The NAT VM keeps its way out and its address.
    assert_eq!(d.guest_ok("natted", fetch), "hello from outside\n");
    assert_eq!(outside.requests(), seen + 1);

    d.rpc("vm.delete", json!({"vms": ["natted", "walled"]}));
    drop(outside);
}

#[test]
fn attack_a_pooled_clone_gets_its_filter_at_hand_out_and_filters_survive_a_daemon_restart() {
    let mut d = TestDaemon::start_with_config("default_memory_mib = 256\n[warm]\npool_size = 1\nauto_build = false");
    d.register_test_image();
    wait_until("the pool to fill", Duration::from_secs(240), || {
        d.rpc("daemon.status", json!({}))["warm_pool"]["ready"] == 1
    });
    // A pooled VM waits with the template's identity on a TAP that carries nothing.
    let table = bridge_table(&d);
    assert!(!table.contains("chain tap_"), "a TAP is filtered open before any VM holds it:\n{table}");
    let v = d.rpc("vm.create", json!({"name": "pooled"}));
    assert_eq!(v["boot"]["mode"], "pool", "{v}");
    d.rpc("vm.create", json!({"name": "other", "boot": "cold"}));
    let (p_ip, p_mac, o_mac) = (ip_of(&d, "pooled"), mac_of(&d, "pooled"), mac_of(&d, "other"));
    assert_ne!(p_mac, "52:54:00:b0:00:01", "the clone still wears the template's MAC");
    serve(&d, "pooled");
    // Pinned to the MAC it got at hand-out, it is reachable; sshd's key of its own is pinned too.
    assert_eq!(fetch_from_host(&d, &format!("http://{p_ip}:8080/")), "served-by-pooled\n");
    let p_chain = chain_of(&d, &p_mac);
    let out = d.vm_ssh("pooled", &["hostname"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "pooled\n", "{}", String::from_utf8_lossy(&out.stderr));

    // The daemon restarts and re-adopts both VMs: the same filters are rebuilt from the store and hold.
    d.restart();
    assert_eq!(chain_of(&d, &p_mac), p_chain, "the pooled VM's filter after a restart");
    // The pool refills after the restart, so TAPs come and go on the bridge. A bridge following its ports' MACs
    // would change its own with them, and the kernel flushes a bridge's neighbour table (pins included) at every
    // such change: its MAC is set (addr_assign_type 3), and the pin is still there once the pool is full.
    let assign = d.netns.exec(&["cat", "/sys/class/net/banger0/addr_assign_type"]);
    assert_eq!(String::from_utf8_lossy(&assign.stdout).trim(), "3", "the bridge's MAC follows its ports");
    wait_until("the pool to refill", Duration::from_secs(240), || {
        d.rpc("daemon.status", json!({}))["warm_pool"]["ready"] == 1
    });
    let entry = neighbour(&d, &p_ip);
    assert!(entry.contains(&p_mac) && entry.contains("PERMANENT"), "the pin after a restart: {entry}");
    let o_chain = chain_of(&d, &o_mac);
    let before = dropped(&d, &o_chain, "ARP claiming another MAC or address");
    d.guest_ok(
        "other",
        &format!("{NIC}; ip addr add {p_ip}/24 dev $IF; busybox arping -U -c 3 -w 3 -I $IF {p_ip}; true"),
    );
    assert!(dropped(&d, &o_chain, "ARP claiming another MAC or address") > before, "other's ARP passed");
    unpin(&d, &p_ip);
    for _ in 0..3 {
        assert_eq!(resolve_afresh(&d, &p_ip), p_mac, "the host's entry for the pooled VM moved");
        assert_eq!(fetch_from_host(&d, &format!("http://{p_ip}:8080/")), "served-by-pooled\n");
    }
    d.rpc("vm.delete", json!({"vms": ["pooled", "other"]}));
    assert!(!bridge_table(&d).contains(&p_chain), "a deleted VM's filter stayed");
    assert_eq!(neighbour(&d, &p_ip), "", "a deleted VM's neighbour entry stayed");
}
