//! Image builds through the daemon: from the shipped recipes (their root filesystems come from the cache that
//! scripts/setup-host.sh fills), from a registered image plus a host script, failures and cancels that leave
//! nothing behind, and the agent-ready image booted and checked the way a user would.
use std::time::{Duration, Instant};

use banger_e2e::*;

fn build(d: &TestDaemon, params: Value) -> Value {
    d.rpc("image.build", params)
}

/// Leftovers of a build in the daemon's image store: its work folders.
fn build_dirs(d: &TestDaemon) -> Vec<String> {
    std::fs::read_dir(d.state_dir.join("images"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".build-"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn building_a_recipe_twice_reuses_the_cache_and_the_image_carries_its_build_id() {
    let d = TestDaemon::start();
    let first = build(&d, json!({"name": "mini", "recipe": "debian-minimal", "make_default": true}));
    assert_eq!(first["reused"], false);
    assert_eq!(first["rootfs_cached"], true, "set-up cached the recipe's root filesystem: {first}");
    let img = &first["image"];
    let build_id = img["build_id"].as_str().expect("built images have a build id").to_string();
    assert_eq!(img["source"], "recipe debian-minimal");
    assert_eq!(img["is_default"], true);

    // The same inputs under the same name: nothing is built, the same image (same id, same files) comes back.
    let again = build(&d, json!({"name": "mini", "recipe": "debian-minimal"}));
    assert_eq!(again["reused"], true, "{again}");
    assert_eq!(again["image"]["id"], img["id"]);
    assert_eq!(again["image"]["fingerprint"], img["fingerprint"]);
    assert_eq!(d.rpc("image.list", json!({}))["images"].as_array().unwrap().len(), 1);
    // The CLI says so, and shows the stages it went through.
    let out = d.cli(&["image", "build", "mini", "--recipe", "debian-minimal"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("up to date"), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stderr).contains("register"), "{}", String::from_utf8_lossy(&out.stderr));

    // The name is taken by other inputs: a clear refusal, and the image is untouched.
    let e = d.rpc_raw("image.build", json!({"name": "mini", "recipe": "debian-minimal", "size_gib": 3}));
    assert_eq!(e["error"]["data"]["code"], "already_exists", "{e}");
    // Bad input is refused before anything happens.
    let e = d.rpc_raw("image.build", json!({"name": "x", "recipe": "no-such-recipe"}));
    assert_eq!(e["error"]["data"]["code"], "not_found", "{e}");
    assert!(e["error"]["data"]["hint"].as_str().unwrap().contains("debian-agent"), "hint lists the recipes: {e}");
    let e = d.rpc_raw("image.build", json!({"name": "x", "recipe": "debian-minimal", "from_image": "mini"}));
    assert_eq!(e["error"]["data"]["code"], "invalid_argument", "{e}");
    assert_eq!(d.rpc("image.list", json!({}))["images"].as_array().unwrap().len(), 1);

    // A VM of the image can tell which build it runs.
    d.rpc("vm.create", json!({"name": "which", "memory_mib": 256}));
    let stamp: Value = serde_json::from_str(&d.guest_ok("which", "cat /etc/banger/image.json")).unwrap();
    assert_eq!(stamp["build_id"], build_id.as_str());
    assert_eq!(stamp["name"], "mini");
    d.rpc("vm.delete", json!({"vms": ["which"]}));
    assert!(build_dirs(&d).is_empty(), "work folders left: {:?}", build_dirs(&d));
}

#[test]
fn building_from_an_image_with_a_script_keeps_the_base_intact_and_boots() {
    let d = TestDaemon::start();
    d.register_test_image();
    let script = d.dir.path().join("customize.sh");
    // Runs on the host against the new root. It checks that the copy of the base kept setuid bits and
    // ownership (a lossy copy would break su and sudo in the guest), then adds a file.
    std::fs::write(
        &script,
        "#!/bin/sh\nset -e\nroot=\"$1\"\n[ -u \"$root/usr/bin/passwd\" ] || { echo 'setuid bit lost' >&2; exit 1; }\n\
         echo customized-by-script > \"$root/etc/banger-custom\"\n\
         mkdir -p \"$root/usr/local/bin\" && printf '#!/bin/sh\\necho fake\\n' > \"$root/usr/local/bin/claude\" && \
         chmod +x \"$root/usr/local/bin/claude\"\necho script done\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let r = build(&d, json!({"name": "custom", "from_image": "test", "script": script.display().to_string()}));
    assert_eq!(r["image"]["source"], "image test + script");
    // What each image provides is read from its own filesystem: the script's `claude` is in the new image only.
    let provides = |image: &Value| -> Vec<String> { serde_json::from_value(image["provides"].clone()).unwrap() };
    let base = provides(&d.rpc("image.show", json!({"image": "test"})));
    assert!(base.contains(&"bash".to_string()) && !base.contains(&"claude".to_string()), "{base:?}");
    let custom = provides(&r["image"]);
    assert!(custom.contains(&"claude".to_string()) && custom.contains(&"bash".to_string()), "{custom:?}");
    d.rpc("vm.create", json!({"name": "cust", "image": "custom", "memory_mib": 256}));
    assert_eq!(d.guest_ok("cust", "cat /etc/banger-custom"), "customized-by-script\n");
    assert_eq!(d.guest_ok("cust", "stat -c %A /usr/bin/passwd"), "-rwsr-xr-x\n");
    d.rpc("vm.delete", json!({"vms": ["cust"]}));
    // A script that is not executable is refused up front.
    let plain = d.dir.path().join("plain.sh");
    std::fs::write(&plain, "true\n").unwrap();
    let e =
        d.rpc_raw("image.build", json!({"name": "other", "from_image": "test", "script": plain.display().to_string()}));
    assert_eq!(e["error"]["data"]["code"], "invalid_argument", "{e}");
    assert!(e["error"]["data"]["hint"].as_str().unwrap().contains("chmod +x"), "{e}");
}

#[test]
fn a_failed_or_cancelled_build_registers_nothing_and_leaves_nothing() {
    let d = TestDaemon::start();
    // A recipe that fails after writing part of its output.
    let recipes = d.dir.path().join("recipes");
    let broken = recipes.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(
        broken.join("recipe.sh"),
        "#!/bin/sh\necho partial > \"$1.tmp\"\necho 'fetching packages'\necho 'E: no such package frobnicate' >&2\nexit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(broken.join("recipe.sh"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let e = d.rpc_raw("image.build", json!({"name": "broken", "recipe": broken.display().to_string()}));
    let msg = e["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("exit code 3") && msg.contains("no such package frobnicate"), "{e}");
    assert!(d.rpc("image.list", json!({}))["images"].as_array().unwrap().is_empty());
    assert!(build_dirs(&d).is_empty(), "work folders left: {:?}", build_dirs(&d));
    // The CLI shows the failure with the recipe's own words and exits non-zero.
    let out = d.cli(&["image", "build", "broken", "--recipe", broken.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("frobnicate"), "{}", String::from_utf8_lossy(&out.stderr));

    // A recipe that hangs: cancelling kills it (and what it started) and removes its work.
    let slow = recipes.join("slow");
    std::fs::create_dir_all(&slow).unwrap();
    let pid_file = d.dir.path().join("slow.pid");
    std::fs::write(
        slow.join("recipe.sh"),
        format!("#!/bin/sh\nsleep 600 &\necho $! > {}\necho waiting\nwait\n", pid_file.display()),
    )
    .unwrap();
    std::fs::set_permissions(slow.join("recipe.sh"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let op = d.rpc("image.build_begin", json!({"name": "slow", "recipe": slow.display().to_string()}));
    let id = op["id"].as_str().unwrap().to_string();
    wait_until("the recipe to start", Duration::from_secs(20), || pid_file.exists() && !build_dirs(&d).is_empty());
    let sleeper: u32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    assert!(process_alive(sleeper));
    let status = d.rpc("operation.status", json!({"id": id}));
    assert_eq!(status["stages"][0]["state"], "running", "{status}");
    d.rpc("operation.cancel", json!({"id": id}));
    wait_until("the build to end", Duration::from_secs(20), || {
        d.rpc("operation.status", json!({"id": id}))["state"] == "cancelled"
    });
    wait_until("the recipe's child to die", Duration::from_secs(10), || !process_alive(sleeper));
    assert!(build_dirs(&d).is_empty(), "work folders left: {:?}", build_dirs(&d));
    assert!(d.rpc("image.list", json!({}))["images"].as_array().unwrap().is_empty());
}

/// The agent-ready image: built from its recipe, booted, and checked the way a user would.
#[test]
fn the_agent_image_boots_and_its_coding_agents_start() {
    let d = TestDaemon::start();
    let r = build(&d, json!({"name": "agent", "recipe": "debian-agent", "make_default": true}));
    assert_eq!(r["image"]["source"], "recipe debian-agent");
    for program in ["claude", "opencode", "pi", "node", "npm", "git", "tmux", "gcc", "make"] {
        assert!(r["image"]["provides"].as_array().unwrap().iter().any(|p| p == program), "{program}: {r}");
    }
    d.rpc("vm.create", json!({"name": "coder", "memory_mib": 2048, "vcpus": 2}));

    // The coding-agent CLIs start (these are big binaries: give software emulation its time).
    for (tool, expect) in [("claude", "Claude Code"), ("opencode", "."), ("pi", ".")] {
        let r = d.rpc("vm.exec", json!({"vm": "coder", "command": [tool, "--version"], "timeout_secs": 240}));
        assert_eq!(r["exit_code"], 0, "{tool} --version: {r}");
        let out = format!("{}{}", r["stdout"].as_str().unwrap(), r["stderr"].as_str().unwrap());
        assert!(out.contains(expect) && out.chars().any(|c| c.is_ascii_digit()), "{tool} --version said {out:?}");
    }
    for tool in [
        "node --version",
        "npm --version",
        "git --version",
        "tmux -V",
        "gcc --version",
        "make --version",
        "rg --version",
    ] {
        d.guest_ok("coder", tool);
    }
    // Agent health, exec with exit codes, stderr, stdin and a timeout.
    let vm = d.rpc("vm.show", json!({"vm": "coder"}));
    assert_eq!(vm["state"], "running");
    let r = d.rpc(
        "vm.exec",
        json!({"vm": "coder", "command": ["sh", "-c", "cat; echo oops >&2; exit 4"], "stdin": "piped in"}),
    );
    assert_eq!(
        (r["exit_code"].as_i64(), r["stdout"].as_str(), r["stderr"].as_str()),
        (Some(4), Some("piped in"), Some("oops\n"))
    );
    let r = d.rpc("vm.exec", json!({"vm": "coder", "command": ["sleep", "30"], "timeout_secs": 1}));
    assert_eq!(r["timed_out"], true, "{r}");
    // Large binary output arrives whole.
    let r =
        d.rpc("vm.exec", json!({"vm": "coder", "command": ["sh", "-c", "head -c 3000000 /dev/urandom | sha256sum; "]}));
    assert_eq!(r["exit_code"], 0);
    // Files round trip with checksums.
    let data: Vec<u8> = (0..(4u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
    let src = d.dir.path().join("blob");
    std::fs::write(&src, &data).unwrap();
    let up = d.cli_json(&["vm", "cp", src.to_str().unwrap(), "coder:/root/blob"]);
    let sum = d.guest_ok("coder", "sha256sum /root/blob | cut -d' ' -f1");
    assert_eq!(sum.trim(), up["sha256"].as_str().unwrap());
    let back = d.dir.path().join("blob.back");
    d.cli_json(&["vm", "cp", "coder:/root/blob", back.to_str().unwrap()]);
    assert_eq!(std::fs::read(&back).unwrap(), data);
    // vm ports finds a server started in the guest, with its process.
    d.guest_ok("coder", "cd /tmp && (setsid python3 -m http.server 8123 >/dev/null 2>&1 &) && sleep 1");
    let ports = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let p = d.rpc("vm.ports", json!({"vm": "coder"}));
            if p.to_string().contains("8123") || Instant::now() > deadline {
                break p;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    let port =
        ports["ports"].as_array().unwrap().iter().find(|p| p["port"] == 8123).unwrap_or_else(|| panic!("{ports}"));
    assert!(port["process"].as_str().unwrap_or_default().contains("python3"), "{port}");
    assert_eq!(port["endpoint"], "http://coder.vm:8123/", "{port}");
    // vm ssh runs a command.
    let out = d.vm_ssh("coder", &["sh", "-c", "echo $(id -un)@$(hostname)"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "root@coder\n", "{}", String::from_utf8_lossy(&out.stderr));
    // And it knows which build it is.
    let stamp: Value = serde_json::from_str(&d.guest_ok("coder", "cat /etc/banger/image.json")).unwrap();
    assert_eq!(stamp["build_id"], build_id_of(&d, "agent"));
    d.rpc("vm.delete", json!({"vms": ["coder"]}));
}

fn build_id_of(d: &TestDaemon, image: &str) -> Value {
    d.rpc("image.show", json!({"image": image}))["build_id"].clone()
}
