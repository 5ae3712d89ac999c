//! The console's pages, rendered with maud: every value is escaped by construction (text and attributes
//! alike), so nothing a guest reports (names, commands, console lines, stats) can inject markup. Only the
//! fixed strings of this file are markup. URL path segments built from names go through `seg`.
use maud::{html, Markup, DOCTYPE};
use tools_schema::daemon::{DaemonStatus, HostStatus};
use tools_schema::image::ImageInfo;
use tools_schema::operation::{OperationInfo, OperationState};
use tools_schema::session::SessionInfo;
use tools_schema::vm::{PortProtocol, VmInfo, VmPort, VmState, VmStats};
use tools_schema::ApiError;

/// What a page needs of the logged-in browser: the CSRF token its forms carry.
pub(super) struct Viewer<'a> {
    pub csrf: &'a str,
}

/// Escapes a value for a URL path segment (VM and image names are restricted, but never trust that here).
pub(super) fn seg(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub(super) fn layout(title: &str, viewer: Option<&Viewer>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " · banger" }
                meta name="csrf" content=(viewer.map_or("", |v| v.csrf));
                link rel="stylesheet" href="/static/console.css";
                script src="/static/console.js" defer {}
            }
            body {
                header {
                    span.brand { "banger" }
                    @if viewer.is_some() {
                        nav { a href="/" { "Dashboard" } a href="/vms" { "VMs" } a href="/vms/new" { "New VM" } a href="/images" { "Images" } }
                    }
                }
                main { (body) }
            }
        }
    }
}

pub(super) fn login(message: &str) -> Markup {
    layout("Log in", None, html! { h1 { "banger console" } p.notice { (message) } })
}

pub(super) fn error_box(e: &ApiError) -> Markup {
    html! {
        div.error #error {
            h2 { (e.code.as_str()) }
            p { (e.message) }
            @if let Some(h) = &e.hint { p.hint { (h) } }
            @for step in &e.next { p.next { code { (step.as_method_call()) } " " (step.why) } }
        }
    }
}

pub(super) fn error_page(e: &ApiError) -> Markup {
    layout("Error", None, error_box(e))
}

fn csrf_field(v: &Viewer) -> Markup {
    html! { input type="hidden" name="csrf" value=(v.csrf); }
}

pub(super) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

fn state_badge(s: VmState) -> Markup {
    let name = s.as_str();
    html! { span class={ "state state-" (name) } data-state=(name) { (name) } }
}

fn wire_name<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

fn host_facts(host: &HostStatus, status: &DaemonStatus) -> Markup {
    let limits = &status.limits;
    html! {
        dl.facts #host {
            dt { "CPUs" } dd { (limits.cpus) }
            dt { "Load" }
            dd { @match host.load_average { Some([a, b, c]) => { (format!("{a:.2} {b:.2} {c:.2}")) } None => { "-" } } }
            dt { "Memory" }
            dd { (bytes(limits.memory_available_mib << 20)) " free of " (bytes(limits.memory_total_mib << 20)) }
            dt { "Disk (" (status.state_dir) ")" }
            dd {
                @match (host.state_disk_free_bytes, host.state_disk_total_bytes) {
                    (Some(free), Some(total)) => { (bytes(free)) " free of " (bytes(total)) }
                    _ => { "unreadable" }
                }
            }
        }
    }
}

fn vm_table(vms: &[VmInfo]) -> Markup {
    html! {
        @if vms.is_empty() {
            p.empty { "No VMs yet. " a href="/vms/new" { "Create one" } "." }
        } @else {
            table #vms {
                tr { th { "Name" } th { "State" } th { "Image" } th { "vCPUs" } th { "Memory" } th { "IP" } }
                @for v in vms {
                    tr {
                        td { a href={ "/vms/" (seg(&v.name)) } { (v.name) } }
                        td { (state_badge(v.state)) }
                        td { (v.image) }
                        td { (v.vcpus) }
                        td { (v.memory_mib) " MiB" }
                        td { (v.ip.as_deref().unwrap_or("-")) }
                    }
                }
            }
        }
    }
}

fn image_table(images: &[ImageInfo]) -> Markup {
    html! {
        @if images.is_empty() {
            p.empty { "No images registered. Build one below, or run scripts/quickstart.sh." }
        } @else {
            table #images {
                tr { th { "Name" } th { "Default" } th { "Size" } th { "Source" } }
                @for i in images {
                    tr {
                        td { (i.name) }
                        td { @if i.is_default { "default" } }
                        td { (bytes(i.rootfs_bytes)) }
                        td { (i.source.as_deref().unwrap_or("registered")) }
                    }
                }
            }
        }
    }
}

pub(super) fn dashboard(
    v: &Viewer,
    status: &DaemonStatus,
    vms: &[VmInfo],
    images: &[ImageInfo],
    operations: &[OperationInfo],
) -> Markup {
    let running: Vec<&OperationInfo> = operations.iter().filter(|o| o.state == OperationState::Running).collect();
    let body = html! {
        h1 { "Dashboard" }
        section { h2 { "Host" } (host_facts(&status.host, status)) }
        section {
            h2 { "Daemon" }
            dl.facts {
                dt { "Build" } dd { (status.build.to_string()) }
                dt { "VMM" } dd { (status.vmm.vmm.as_str()) " (" (status.vmm.reason) ")" }
                dt { "VMs" } dd #vm-counts { (status.vms_running) " running, " (status.vms_total) " total" }
                dt { "Images" } dd { (status.images) }
                dt { "Limits" } dd #limits { (status.limits.summary()) }
            }
        }
        @if !running.is_empty() {
            h2 { "Running operations" }
            ul { @for op in &running { li { a href={ "/operations/" (seg(&op.id)) } { (op.kind) " " (op.target) } } } }
        }
        section { h2 { "VMs" } (vm_table(vms)) }
        section { h2 { "Images" } (image_table(images)) }
    };
    layout("Dashboard", Some(v), body)
}

pub(super) fn vm_list(v: &Viewer, vms: &[VmInfo]) -> Markup {
    layout("VMs", Some(v), html! { h1 { "VMs" } p { a.button href="/vms/new" { "New VM" } } (vm_table(vms)) })
}

pub(super) fn vm_new(v: &Viewer, images: &[ImageInfo], default_vcpus: u32, default_memory_mib: u32) -> Markup {
    let body = html! {
        h1 { "New VM" }
        form.form method="post" action="/vms" {
            (csrf_field(v))
            label { "Name " input name="name" #name placeholder="generated when empty"; }
            label { "Image " select name="image" {
                option value="" { "the default image" }
                @for i in images { option value=(i.name) { (i.name) } }
            } }
            label { "vCPUs " input name="vcpus" inputmode="numeric" placeholder=(default_vcpus); }
            label { "Memory (MiB) " input name="memory_mib" inputmode="numeric" placeholder=(default_memory_mib); }
            label { input type="checkbox" name="nat"; " NAT (reach networks beyond this host)" }
            button type="submit" #create { "Create" }
        }
    };
    layout("New VM", Some(v), body)
}

fn stats_facts(st: &VmStats) -> Markup {
    html! {
        dl.facts #stats {
            @if let Some(cpu) = st.host_cpu_seconds { dt { "Host CPU time" } dd { (format!("{cpu:.1} s")) } }
            @if let Some(rss) = st.host_rss_bytes { dt { "Host memory" } dd { (bytes(rss)) } }
            @if let Some(disk) = st.disk_host_bytes { dt { "Disk used on host" } dd { (bytes(disk)) } }
            @if let Some(g) = &st.guest {
                dt { "Guest uptime" } dd { (format!("{:.0} s", g.uptime_secs)) }
                dt { "Guest memory" } dd { (bytes(g.mem_available_bytes)) " free of " (bytes(g.mem_total_bytes)) }
                dt { "Guest root disk" } dd { (bytes(g.root_used_bytes)) " used of " (bytes(g.root_total_bytes)) }
                dt { "Processes" } dd { (g.processes) }
            }
        }
    }
}

fn session_table(sessions: &[SessionInfo]) -> Markup {
    html! {
        @if sessions.is_empty() {
            p #sessions { "No sessions. Start one with " code { "banger vm session start" } "." }
        } @else {
            table #sessions {
                tr { th { "Session" } th { "Command" } th { "State" } th { "Exit" } th { "Output" } th { "Attached" } }
                @for s in sessions {
                    tr {
                        td { (s.name.as_deref().unwrap_or(&s.id)) }
                        td { code { (s.command.join(" ")) } }
                        td { (s.state.as_str()) }
                        td { @match (s.exit_code, s.signal) {
                            (Some(code), _) => { (code) }
                            (None, Some(sig)) => { "signal " (sig) }
                            _ => { "-" }
                        } }
                        td { (bytes(s.output_bytes)) }
                        td { @if s.attached { "yes" } @else { "no" } }
                    }
                }
            }
        }
    }
}

/// One VM's page. Stats, sessions and the console log each show their own error when they cannot be read.
pub(super) fn vm_detail(
    v: &Viewer,
    vm: &VmInfo,
    stats: Result<VmStats, ApiError>,
    sessions: Result<Vec<SessionInfo>, ApiError>,
    console: Result<Vec<String>, ApiError>,
) -> Markup {
    let n = seg(&vm.name);
    // Refresh while the VM is on its way somewhere, so the page settles on its own.
    let settling = !matches!(vm.state, VmState::Running | VmState::Stopped | VmState::Failed);
    let body = html! {
        @if settling { meta http-equiv="refresh" content="2"; }
        h1 { "VM " (vm.name) }
        @if let Some(e) = &vm.last_error { p.error { "Last error: " (e) } }
        p.actions {
            @if matches!(vm.state, VmState::Stopped | VmState::Failed) {
                a.button #start href={ "/vms/" (n) "/confirm/start" } { "Start" }
            }
            @if vm.state == VmState::Running { a.button #stop href={ "/vms/" (n) "/confirm/stop" } { "Stop" } }
            a.button.danger #delete href={ "/vms/" (n) "/confirm/delete" } { "Delete" }
            a.button #ports href={ "/vms/" (n) "/ports" } { "Ports" }
        }
        dl.facts #vm {
            dt { "State" } dd { (state_badge(vm.state)) }
            dt { "Image" } dd { (vm.image) }
            dt { "Shape" } dd { (vm.vcpus) " vCPU, " (vm.memory_mib) " MiB" }
            dt { "VMM" } dd { (vm.vmm.as_str()) }
            dt { "IP" } dd { (vm.ip.as_deref().unwrap_or("-")) }
            dt { "DNS name" } dd { (vm.dns_name) }
            dt { "NAT" } dd { @if vm.nat { "on" } @else { "off" } }
        }
        h2 { "Stats" }
        @match &stats { Ok(st) => { (stats_facts(st)) } Err(e) => { (error_box(e)) } }
        h2 { "Sessions" }
        @match &sessions { Ok(l) => { (session_table(l)) } Err(e) => { (error_box(e)) } }
        h2 { "Console log" }
        @match &console { Ok(lines) => { pre #console-log { (lines.join("\n")) } } Err(e) => { (error_box(e)) } }
    };
    layout(&format!("VM {}", vm.name), Some(v), body)
}

pub(super) fn vm_ports(v: &Viewer, vm: &str, ports: &[VmPort]) -> Markup {
    let body = html! {
        h1 { "Ports of " a href={ "/vms/" (seg(vm)) } { (vm) } }
        table #port-list {
            tr { th { "Port" } th { "Protocol" } th { "Reach it at" } th { "Bound to" } th { "Process" } }
            @for p in ports {
                tr {
                    td { (p.port) }
                    td { (wire_name(&p.proto)) }
                    td { @if matches!(p.proto, PortProtocol::Http | PortProtocol::Https) {
                        a href=(p.endpoint) target="_blank" rel="noopener noreferrer" { (p.endpoint) }
                    } @else { (p.endpoint) } }
                    td { (p.bind) }
                    td title=(p.command.as_deref().unwrap_or("")) { (p.process.as_deref().unwrap_or("-")) }
                }
            }
        }
    };
    layout(&format!("Ports of {vm}"), Some(v), body)
}

pub(super) fn vm_confirm(v: &Viewer, vm: &str, action: &str, verb: &str, effect: &str) -> Markup {
    let n = seg(vm);
    let body = html! {
        h1 { (verb) " VM " (vm) "?" }
        p { "This " (effect) "." }
        form method="post" action={ "/vms/" (n) "/" (seg(action)) } {
            (csrf_field(v))
            button type="submit" #confirm class=(if action == "delete" { "danger" } else { "" }) {
                "Yes, " (verb.to_lowercase())
            }
            " "
            a href={ "/vms/" (n) } { "No, go back" }
        }
    };
    layout(&format!("{verb} {vm}"), Some(v), body)
}

pub(super) fn images(v: &Viewer, images: &[ImageInfo]) -> Markup {
    let body = html! {
        h1 { "Images" }
        (image_table(images))
        h2 { "Build an image" }
        form.form method="post" action="/images" {
            (csrf_field(v))
            label { "Name " input name="name" #image-name required; }
            label { "Recipe " input name="recipe" #image-recipe placeholder="debian-minimal or debian-agent"; }
            label { "Or from image " select name="from_image" #image-from {
                option value="" { "none: use the recipe" }
                @for i in images { option value=(i.name) { (i.name) } }
            } }
            label {
                "Host script (absolute path of an executable, run as " code { "script ROOT_DIR" } ") "
                input name="script" #image-script placeholder="/path/to/customize.sh";
            }
            label { "Size (GiB) " input name="size_gib" inputmode="numeric"; }
            label { input type="checkbox" name="make_default"; " Make it the default image" }
            label { input type="checkbox" name="no_cache"; " Rebuild the recipe's root filesystem" }
            button type="submit" #build { "Build" }
        }
    };
    layout("Images", Some(v), body)
}

/// The part of an operation page that live updates replace: state, stages, result or error.
pub(super) fn operation_view(op: &OperationInfo) -> Markup {
    let state = wire_name(&op.state);
    html! {
        p { "State: " strong #op-state data-state=(state) { (state) } (format!(" after {:.1} s", op.elapsed_ms as f64 / 1000.0)) }
        @if let Some(d) = &op.detail { p.detail { (d) } }
        ol #stages {
            @for st in &op.stages {
                @let st_state = wire_name(&st.state);
                li class={ "stage stage-" (st_state) } {
                    (st.name) " " span { (st_state) }
                    @if let Some(ms) = st.duration_ms { (format!(" ({:.1} s)", ms as f64 / 1000.0)) }
                }
            }
        }
        @if let (Some(vm), OperationState::Succeeded) = (&op.vm, op.state) {
            p { a.button #open-vm href={ "/vms/" (seg(&vm.name)) } { "Open VM " (vm.name) } }
        }
        @if let Some(b) = &op.image_build {
            p #built { "Image " (b.image.name) " is ready" @if b.reused { " (reused: nothing changed)" } "." }
        }
        @if let Some(e) = &op.error { (error_box(e)) }
    }
}

pub(super) fn operation_page(v: &Viewer, op: &OperationInfo) -> Markup {
    let body = html! {
        h1 { (op.kind) " " (op.target) }
        div #operation data-operation=(op.id) { (operation_view(op)) }
        @if op.state == OperationState::Running {
            form method="post" action={ "/operations/" (seg(&op.id)) "/cancel" } #cancel-form {
                (csrf_field(v))
                button type="submit" #cancel class="danger" { "Cancel" }
            }
        }
    };
    layout(&format!("{} {}", op.kind, op.target), Some(v), body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_escaped_in_text_and_attributes() {
        let hostile = "<script>alert(1)</script>\"' onmouseover=x";
        let e = ApiError::invalid(hostile).with_hint(hostile);
        let page = error_page(&e).into_string();
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;"), "{page}");
        let v = Viewer { csrf: "\"><img src=x>" };
        let page = layout("t", Some(&v), html! {}).into_string();
        assert!(!page.contains("<img src=x>") && page.contains("&quot;&gt;&lt;img src=x&gt;"), "{page}");
    }

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(seg("a b/../c"), "a%20b%2F..%2Fc");
    }
}
