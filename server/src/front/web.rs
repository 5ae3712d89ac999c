//! The localhost web console: a third front door onto `Engine::dispatch`, for a person with a browser.
//!
//! It decides nothing itself: every page reads through operations and every button runs one. What it adds is
//! the browser's security boundary, because a browser on this machine also runs other sites' code:
//! - it listens on loopback only (config validation refuses anything else);
//! - it refuses requests whose Host header is not localhost, 127.0.0.1 or [::1] (DNS rebinding);
//! - a per-install token (`<state>/web-token`, 0600) is exchanged at `/login` for an HttpOnly, SameSite=Strict
//!   session cookie;
//! - every POST needs the session's CSRF token (hidden form field or `x-csrf-token` header), and a present
//!   Origin header must be this console's.
use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Json, Router};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tools_schema::daemon::Empty;
use tools_schema::image::ImageBuildParams;
use tools_schema::operation::{OperationInfo, OperationRef, OperationState};
use tools_schema::ops::{self, Operation};
use tools_schema::session::SessionListParams;
use tools_schema::vm::{PortProtocol, VmCreateParams, VmLogsParams, VmRef, VmRefs, VmState};
use tools_schema::{ApiError, ErrorCode};

use crate::engine::{CallContext, Engine};

const SESSION_COOKIE: &str = "banger_session";
/// Sessions kept at once; the oldest is forgotten beyond this (it just logs in again).
const MAX_SESSIONS: usize = 64;
/// Largest form a POST may carry (the forms hold names, numbers and paths).
const MAX_FORM_BYTES: usize = 64 << 10;
const STYLE: &str = include_str!("web/console.css");
const SCRIPT: &str = include_str!("web/console.js");

struct Console {
    engine: Arc<Engine>,
    token: String,
    sessions: Mutex<HashMap<String, Session>>,
}

/// A logged-in browser. Handlers get it as an extension to put its CSRF token into forms.
#[derive(Clone)]
struct Session {
    csrf: String,
    created: Instant,
}

/// Reads the install's console token, creating it (random, mode 0600) on first use.
pub fn load_or_create_token(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(t) if t.trim().len() >= 32 => return Ok(t.trim().to_string()),
        Ok(_) => tracing::warn!(path = %path.display(), "web token file is too short; making a new token"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let token = random_hex();
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(token.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(token)
}

fn random_hex() -> String {
    let bytes: [u8; 32] = rand::random();
    hex::encode(bytes)
}

/// Binds the console's loopback address, records its login URL for daemon.status, and serves it until
/// `shutdown`.
pub async fn start(engine: Arc<Engine>, shutdown: CancellationToken) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let cfg = engine.config().clone();
    let token = load_or_create_token(&cfg.web_token_file())?;
    let listener = tokio::net::TcpListener::bind(cfg.web.listen).await.with_context(|| {
        format!("web console cannot listen on {} (set [web] listen = \"127.0.0.1:PORT\" in the config)", cfg.web.listen)
    })?;
    let addr = listener.local_addr()?;
    engine.set_web_url(login_url(addr, &token));
    tracing::info!(%addr, "web console listening");
    let app = router(Arc::new(Console { engine, token, sessions: Mutex::default() }));
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await {
            tracing::warn!(error = %e, "web console stopped");
        }
    }))
}

fn login_url(addr: SocketAddr, token: &str) -> String {
    format!("http://{addr}/login?token={token}")
}

fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/login", get(login))
        .route("/static/console.css", get(|| async { ([(header::CONTENT_TYPE, "text/css")], STYLE) }))
        .route("/static/console.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript")], SCRIPT) }))
        .route("/", get(dashboard))
        .route("/vms", get(vm_list).post(vm_create))
        .route("/vms/new", get(vm_new))
        .route("/vms/{name}", get(vm_detail))
        .route("/vms/{name}/ports", get(vm_ports))
        .route("/vms/{name}/confirm/{action}", get(vm_confirm))
        .route("/vms/{name}/{action}", post(vm_action))
        .route("/images", get(images).post(image_build))
        .route("/operations/{id}", get(operation_page))
        .route("/operations/{id}/cancel", post(operation_cancel))
        .route("/api/operations/{id}", get(operation_json))
        .layer(axum::middleware::from_fn_with_state(console.clone(), guard))
        .with_state(console)
}

// ---------------------------------------------------------------------------------------------------------
// The security boundary.

/// A host name this console answers to: localhost, 127.0.0.1 or [::1], with any port.
fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((inside, _)) => return inside == "::1",
            None => return false,
        }
    } else {
        host.split(':').next().unwrap_or_default()
    };
    name.eq_ignore_ascii_case("localhost") || name == "127.0.0.1"
}

/// An Origin this console sent: `http://` plus a loopback host.
fn is_own_origin(origin: &str) -> bool {
    origin.strip_prefix("http://").is_some_and(is_loopback_host)
}

fn same_secret(a: &str, b: &str) -> bool {
    // Constant time over the length of the shorter, so a guess leaks nothing about how much matched.
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn session_id(headers: &HeaderMap) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == SESSION_COOKIE).then(|| v.to_string())
    })
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("{why}\n")).into_response()
}

/// Runs before every handler: Host check, session, and for POSTs Origin and CSRF checks.
async fn guard(State(console): State<Arc<Console>>, req: Request, next: Next) -> Response {
    let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
    if !is_loopback_host(host) {
        return refuse(
            StatusCode::FORBIDDEN,
            &format!("refused: Host `{host}` is not this machine; open the console at http://127.0.0.1 instead"),
        );
    }
    let path = req.uri().path();
    if path == "/login" || path.starts_with("/static/") {
        return next.run(req).await;
    }
    let session = session_id(req.headers()).and_then(|id| console.sessions.lock().unwrap().get(&id).cloned());
    let Some(session) = session else {
        if req.method() == Method::GET {
            return Redirect::to("/login").into_response();
        }
        return refuse(StatusCode::FORBIDDEN, "refused: not logged in; open the URL `banger daemon status` prints");
    };
    let mut req = req;
    if req.method() != Method::GET && req.method() != Method::HEAD {
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or_default();
            if !is_own_origin(origin) {
                return refuse(StatusCode::FORBIDDEN, &format!("refused: cross-site request from origin `{origin}`"));
            }
        }
        let header_token =
            req.headers().get("x-csrf-token").and_then(|v| v.to_str().ok()).map(str::to_string).unwrap_or_default();
        let (parts, body) = req.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, MAX_FORM_BYTES).await else {
            return refuse(StatusCode::PAYLOAD_TOO_LARGE, "refused: form larger than 64 KiB");
        };
        let form_token = serde_urlencoded::from_bytes::<Vec<(String, String)>>(&bytes)
            .ok()
            .and_then(|fields| fields.into_iter().find(|(k, _)| k == "csrf").map(|(_, v)| v))
            .unwrap_or_default();
        if !same_secret(&form_token, &session.csrf) && !same_secret(&header_token, &session.csrf) {
            return refuse(StatusCode::FORBIDDEN, "refused: missing or wrong CSRF token; reload the page and retry");
        }
        req = Request::from_parts(parts, Body::from(bytes));
    }
    req.extensions_mut().insert(session);
    next.run(req).await
}

#[derive(Deserialize)]
struct LoginQuery {
    token: Option<String>,
}

async fn login(State(console): State<Arc<Console>>, Query(q): Query<LoginQuery>) -> Response {
    let Some(token) = q.token else {
        return (
            StatusCode::UNAUTHORIZED,
            login_page("Log in with the console URL that `banger daemon status` prints."),
        )
            .into_response();
    };
    if !same_secret(&token, &console.token) {
        return (
            StatusCode::FORBIDDEN,
            login_page("That token is not this install's. Copy the console URL from `banger daemon status` again."),
        )
            .into_response();
    }
    let id = random_hex();
    {
        let mut sessions = console.sessions.lock().unwrap();
        if sessions.len() >= MAX_SESSIONS {
            if let Some(oldest) = sessions.iter().min_by_key(|(_, s)| s.created).map(|(k, _)| k.clone()) {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(id.clone(), Session { csrf: random_hex(), created: Instant::now() });
    }
    let cookie = format!("{SESSION_COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

fn login_page(message: &str) -> Html<String> {
    Html(layout("Log in", None, &format!("<h1>banger console</h1><p class=\"notice\">{}</p>", esc(message))))
}

// ---------------------------------------------------------------------------------------------------------
// Calling the engine.

/// An operation failed: rendered as a page with the error's code, message and hint.
struct PageError(ApiError);

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> Self {
        PageError(e)
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let e = self.0;
        let status = match e.code {
            ErrorCode::InvalidArgument => StatusCode::BAD_REQUEST,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::AlreadyExists | ErrorCode::FailedPrecondition | ErrorCode::Busy => StatusCode::CONFLICT,
            ErrorCode::PermissionDenied => StatusCode::FORBIDDEN,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, Html(layout("Error", None, &error_box(&e)))).into_response()
    }
}

fn error_box(e: &ApiError) -> String {
    let hint = e.hint.as_deref().map(|h| format!("<p class=\"hint\">{}</p>", esc(h))).unwrap_or_default();
    format!("<div class=\"error\" id=\"error\"><h2>{}</h2><p>{}</p>{hint}</div>", esc(e.code.as_str()), esc(&e.message))
}

impl Console {
    /// Runs one operation through the engine, exactly as the other front doors do.
    async fn call<O: Operation>(&self, params: &O::Params) -> Result<O::Result, ApiError> {
        let params = serde_json::to_value(params).map_err(|e| ApiError::internal(format!("encoding params: {e}")))?;
        // A browser that goes away cancels the work, as a JSON-RPC client that disconnects does.
        let cancel = CancellationToken::new();
        let _guard = cancel.clone().drop_guard();
        let value = self.engine.dispatch(O::METHOD, params, CallContext { cancel, progress: None }).await?;
        serde_json::from_value(value).map_err(|e| ApiError::internal(format!("decoding {} result: {e}", O::METHOD)))
    }
}

type PageResult = Result<Html<String>, PageError>;

// ---------------------------------------------------------------------------------------------------------
// Pages.

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes a value for a URL path segment (VM and image names are restricted, but never trust that here).
fn seg(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn layout(title: &str, session: Option<&Session>, body: &str) -> String {
    let nav = if session.is_some() {
        "<nav><a href=\"/\">Dashboard</a><a href=\"/vms\">VMs</a><a href=\"/vms/new\">New VM</a>\
         <a href=\"/images\">Images</a></nav>"
    } else {
        ""
    };
    let csrf = session.map(|s| esc(&s.csrf)).unwrap_or_default();
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{} · banger</title>\
         <meta name=\"csrf\" content=\"{csrf}\"><link rel=\"stylesheet\" href=\"/static/console.css\">\
         <script src=\"/static/console.js\" defer></script></head><body><header><span class=\"brand\">banger</span>\
         {nav}</header><main>{body}</main></body></html>",
        esc(title)
    )
}

fn csrf_field(s: &Session) -> String {
    format!("<input type=\"hidden\" name=\"csrf\" value=\"{}\">", esc(&s.csrf))
}

fn bytes(n: u64) -> String {
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

fn state_badge(s: VmState) -> String {
    let name = s.as_str();
    format!("<span class=\"state state-{name}\" data-state=\"{name}\">{name}</span>")
}

fn op_state_name(s: OperationState) -> String {
    serde_json::to_value(s).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

/// Host resources for the dashboard, read from /proc and the state directory's filesystem.
fn host_resources(state_dir: &Path) -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "-".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = |key: &str| {
        meminfo.lines().find_map(|l| l.strip_prefix(key)?.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    let mem = match (kib("MemTotal:"), kib("MemAvailable:")) {
        (Some(t), Some(a)) => format!("{} free of {}", bytes(a * 1024), bytes(t * 1024)),
        _ => "-".into(),
    };
    let disk = match nix::sys::statvfs::statvfs(state_dir) {
        Ok(s) => {
            let frag = s.fragment_size();
            format!("{} free of {}", bytes(s.blocks_available() * frag), bytes(s.blocks() * frag))
        }
        Err(e) => format!("unreadable: {e}"),
    };
    format!(
        "<dl class=\"facts\" id=\"host\"><dt>CPUs</dt><dd>{cpus}</dd><dt>Load</dt><dd>{}</dd>\
         <dt>Memory</dt><dd>{}</dd><dt>Disk ({})</dt><dd>{}</dd></dl>",
        esc(&load),
        esc(&mem),
        esc(&state_dir.display().to_string()),
        esc(&disk)
    )
}

fn vm_table(vms: &[tools_schema::vm::VmInfo]) -> String {
    if vms.is_empty() {
        return "<p class=\"empty\">No VMs yet. <a href=\"/vms/new\">Create one</a>.</p>".into();
    }
    let mut t = String::from(
        "<table id=\"vms\"><tr><th>Name</th><th>State</th><th>Image</th><th>vCPUs</th><th>Memory</th><th>IP</th></tr>",
    );
    for v in vms {
        let _ = write!(
            t,
            "<tr><td><a href=\"/vms/{}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{} MiB</td><td>{}</td></tr>",
            seg(&v.name),
            esc(&v.name),
            state_badge(v.state),
            esc(&v.image),
            v.vcpus,
            v.memory_mib,
            esc(v.ip.as_deref().unwrap_or("-"))
        );
    }
    t.push_str("</table>");
    t
}

fn image_table(images: &[tools_schema::image::ImageInfo]) -> String {
    if images.is_empty() {
        return "<p class=\"empty\">No images registered. Build one below, or run scripts/quickstart.sh.</p>".into();
    }
    let mut t = String::from("<table id=\"images\"><tr><th>Name</th><th>Default</th><th>Size</th><th>Source</th></tr>");
    for i in images {
        let _ = write!(
            t,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&i.name),
            if i.is_default { "default" } else { "" },
            bytes(i.rootfs_bytes),
            esc(i.source.as_deref().unwrap_or("registered"))
        );
    }
    t.push_str("</table>");
    t
}

async fn dashboard(State(c): State<Arc<Console>>, Extension(s): Extension<Session>) -> PageResult {
    let status = c.call::<ops::DaemonStatus>(&Empty {}).await?;
    let vms = c.call::<ops::VmList>(&Empty {}).await?;
    let images = c.call::<ops::ImageList>(&Empty {}).await?;
    let operations = c.call::<ops::OperationList>(&Empty {}).await?;
    let mut running_ops = String::new();
    for op in operations.operations.iter().filter(|o| o.state == OperationState::Running) {
        let _ = write!(
            running_ops,
            "<li><a href=\"/operations/{}\">{} {}</a></li>",
            seg(&op.id),
            esc(&op.kind),
            esc(&op.target)
        );
    }
    if !running_ops.is_empty() {
        running_ops = format!("<h2>Running operations</h2><ul>{running_ops}</ul>");
    }
    let body = format!(
        "<h1>Dashboard</h1><section><h2>Host</h2>{}</section>\
         <section><h2>Daemon</h2><dl class=\"facts\"><dt>Build</dt><dd>{}</dd><dt>VMM</dt><dd>{} ({})</dd>\
         <dt>VMs</dt><dd id=\"vm-counts\">{} running, {} total</dd><dt>Images</dt><dd>{}</dd>\
         <dt>Limits</dt><dd id=\"limits\">{}</dd></dl></section>\
         {running_ops}<section><h2>VMs</h2>{}</section><section><h2>Images</h2>{}</section>",
        host_resources(&c.engine.config().state_dir),
        esc(&status.build.to_string()),
        esc(status.vmm.vmm.as_str()),
        esc(&status.vmm.reason),
        status.vms_running,
        status.vms_total,
        status.images,
        esc(&status.limits.summary()),
        vm_table(&vms.vms),
        image_table(&images.images)
    );
    Ok(Html(layout("Dashboard", Some(&s), &body)))
}

async fn vm_list(State(c): State<Arc<Console>>, Extension(s): Extension<Session>) -> PageResult {
    let vms = c.call::<ops::VmList>(&Empty {}).await?;
    let body = format!("<h1>VMs</h1><p><a class=\"button\" href=\"/vms/new\">New VM</a></p>{}", vm_table(&vms.vms));
    Ok(Html(layout("VMs", Some(&s), &body)))
}

async fn vm_new(State(c): State<Arc<Console>>, Extension(s): Extension<Session>) -> PageResult {
    let images = c.call::<ops::ImageList>(&Empty {}).await?;
    let mut options = String::from("<option value=\"\">the default image</option>");
    for i in &images.images {
        let _ = write!(options, "<option value=\"{0}\">{0}</option>", esc(&i.name));
    }
    let cfg = c.engine.config();
    let body = format!(
        "<h1>New VM</h1><form method=\"post\" action=\"/vms\" class=\"form\">{}\
         <label>Name <input name=\"name\" id=\"name\" placeholder=\"generated when empty\"></label>\
         <label>Image <select name=\"image\">{options}</select></label>\
         <label>vCPUs <input name=\"vcpus\" inputmode=\"numeric\" placeholder=\"{}\"></label>\
         <label>Memory (MiB) <input name=\"memory_mib\" inputmode=\"numeric\" placeholder=\"{}\"></label>\
         <label><input type=\"checkbox\" name=\"nat\"> NAT (reach networks beyond this host)</label>\
         <button type=\"submit\" id=\"create\">Create</button></form>",
        csrf_field(&s),
        cfg.default_vcpus,
        cfg.default_memory_mib
    );
    Ok(Html(layout("New VM", Some(&s), &body)))
}

/// A whole number from a form field; empty means "use the default".
fn form_number(field: &str, value: &str) -> Result<Option<u32>, ApiError> {
    let v = value.trim();
    if v.is_empty() {
        return Ok(None);
    }
    v.parse().map(Some).map_err(|_| {
        ApiError::invalid(format!("{field} must be a whole number, not `{v}`")).with_hint("go back and fix it")
    })
}

fn form_text(value: &str) -> Option<String> {
    let v = value.trim();
    (!v.is_empty()).then(|| v.to_string())
}

#[derive(Deserialize)]
struct CreateForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    image: String,
    #[serde(default)]
    vcpus: String,
    #[serde(default)]
    memory_mib: String,
    nat: Option<String>,
}

async fn vm_create(State(c): State<Arc<Console>>, Form(f): Form<CreateForm>) -> Result<Redirect, PageError> {
    let params = VmCreateParams {
        name: form_text(&f.name),
        image: form_text(&f.image),
        vcpus: form_number("vCPUs", &f.vcpus)?,
        memory_mib: form_number("memory", &f.memory_mib)?,
        nat: f.nat.is_some().then_some(true),
        ..Default::default()
    };
    let op = c.call::<ops::VmCreateBegin>(&params).await?;
    Ok(Redirect::to(&format!("/operations/{}", seg(&op.id))))
}

async fn vm_detail(
    State(c): State<Arc<Console>>,
    Extension(s): Extension<Session>,
    UrlPath(name): UrlPath<String>,
) -> PageResult {
    let vm = c.call::<ops::VmShow>(&VmRef { vm: name.clone() }).await?;
    let stats = match c.call::<ops::VmStats>(&VmRef { vm: name.clone() }).await {
        Ok(st) => {
            let mut d = String::new();
            if let Some(cpu) = st.host_cpu_seconds {
                let _ = write!(d, "<dt>Host CPU time</dt><dd>{cpu:.1} s</dd>");
            }
            if let Some(rss) = st.host_rss_bytes {
                let _ = write!(d, "<dt>Host memory</dt><dd>{}</dd>", bytes(rss));
            }
            if let Some(disk) = st.disk_host_bytes {
                let _ = write!(d, "<dt>Disk used on host</dt><dd>{}</dd>", bytes(disk));
            }
            if let Some(g) = st.guest {
                let _ = write!(
                    d,
                    "<dt>Guest uptime</dt><dd>{:.0} s</dd><dt>Guest memory</dt><dd>{} free of {}</dd>\
                     <dt>Guest root disk</dt><dd>{} used of {}</dd><dt>Processes</dt><dd>{}</dd>",
                    g.uptime_secs,
                    bytes(g.mem_available_bytes),
                    bytes(g.mem_total_bytes),
                    bytes(g.root_used_bytes),
                    bytes(g.root_total_bytes),
                    g.processes
                );
            }
            format!("<dl class=\"facts\" id=\"stats\">{d}</dl>")
        }
        Err(e) => error_box(&e),
    };
    let logs = match c.call::<ops::VmLogs>(&VmLogsParams { vm: name.clone(), tail: Some(40) }).await {
        Ok(l) => format!("<pre id=\"console-log\">{}</pre>", esc(&l.lines.join("\n"))),
        Err(e) => error_box(&e),
    };
    let sessions = match c.call::<ops::SessionList>(&SessionListParams { vm: Some(name.clone()) }).await {
        Ok(l) if l.sessions.is_empty() => {
            "<p id=\"sessions\">No sessions. Start one with <code>banger vm session start</code>.</p>".to_string()
        }
        Ok(l) => {
            let mut t = String::from(
                "<table id=\"sessions\"><tr><th>Session</th><th>Command</th><th>State</th><th>Exit</th><th>Output</th>\
                 <th>Attached</th></tr>",
            );
            for ss in &l.sessions {
                let exit = match (ss.exit_code, ss.signal) {
                    (Some(code), _) => code.to_string(),
                    (None, Some(sig)) => format!("signal {sig}"),
                    _ => "-".into(),
                };
                let _ = write!(
                    t,
                    "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{exit}</td><td>{}</td><td>{}</td></tr>",
                    esc(ss.name.as_deref().unwrap_or(&ss.id)),
                    esc(&ss.command.join(" ")),
                    esc(ss.state.as_str()),
                    bytes(ss.output_bytes),
                    if ss.attached { "yes" } else { "no" }
                );
            }
            t + "</table>"
        }
        Err(e) => error_box(&e),
    };
    let n = seg(&vm.name);
    let mut actions = String::new();
    if matches!(vm.state, VmState::Stopped | VmState::Failed) {
        let _ = write!(actions, "<a class=\"button\" id=\"start\" href=\"/vms/{n}/confirm/start\">Start</a>");
    }
    if vm.state == VmState::Running {
        let _ = write!(actions, "<a class=\"button\" id=\"stop\" href=\"/vms/{n}/confirm/stop\">Stop</a>");
    }
    let _ = write!(actions, "<a class=\"button danger\" id=\"delete\" href=\"/vms/{n}/confirm/delete\">Delete</a>");
    let last_error =
        vm.last_error.as_deref().map(|e| format!("<p class=\"error\">Last error: {}</p>", esc(e))).unwrap_or_default();
    // Refresh while the VM is on its way somewhere, so the page settles on its own.
    let refresh = if matches!(vm.state, VmState::Running | VmState::Stopped | VmState::Failed) {
        ""
    } else {
        "<meta http-equiv=\"refresh\" content=\"2\">"
    };
    let body = format!(
        "{refresh}<h1>VM {}</h1>{last_error}<p class=\"actions\">{actions}<a class=\"button\" id=\"ports\" \
         href=\"/vms/{n}/ports\">Ports</a></p><dl class=\"facts\" id=\"vm\"><dt>State</dt><dd>{}</dd>\
         <dt>Image</dt><dd>{}</dd><dt>Shape</dt><dd>{} vCPU, {} MiB</dd><dt>VMM</dt><dd>{}</dd>\
         <dt>IP</dt><dd>{}</dd><dt>DNS name</dt><dd>{}</dd><dt>NAT</dt><dd>{}</dd></dl>\
         <h2>Stats</h2>{stats}<h2>Sessions</h2>{sessions}<h2>Console log</h2>{logs}",
        esc(&vm.name),
        state_badge(vm.state),
        esc(&vm.image),
        vm.vcpus,
        vm.memory_mib,
        esc(vm.vmm.as_str()),
        esc(vm.ip.as_deref().unwrap_or("-")),
        esc(&vm.dns_name),
        if vm.nat { "on" } else { "off" }
    );
    Ok(Html(layout(&format!("VM {}", vm.name), Some(&s), &body)))
}

async fn vm_ports(
    State(c): State<Arc<Console>>,
    Extension(s): Extension<Session>,
    UrlPath(name): UrlPath<String>,
) -> PageResult {
    let ports = c.call::<ops::VmPorts>(&VmRef { vm: name.clone() }).await?;
    let mut t = String::from(
        "<table id=\"port-list\"><tr><th>Port</th><th>Protocol</th><th>Reach it at</th><th>Bound to</th>\
         <th>Process</th></tr>",
    );
    for p in &ports.ports {
        let proto = serde_json::to_value(p.proto).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        let endpoint = match p.proto {
            PortProtocol::Http | PortProtocol::Https => {
                format!("<a href=\"{0}\" target=\"_blank\" rel=\"noopener noreferrer\">{0}</a>", esc(&p.endpoint))
            }
            _ => esc(&p.endpoint),
        };
        let _ = write!(
            t,
            "<tr><td>{}</td><td>{}</td><td>{endpoint}</td><td>{}</td><td title=\"{}\">{}</td></tr>",
            p.port,
            esc(&proto),
            esc(&p.bind),
            esc(p.command.as_deref().unwrap_or("")),
            esc(p.process.as_deref().unwrap_or("-"))
        );
    }
    t.push_str("</table>");
    let body = format!("<h1>Ports of <a href=\"/vms/{}\">{}</a></h1>{t}", seg(&ports.vm), esc(&ports.vm));
    Ok(Html(layout(&format!("Ports of {}", ports.vm), Some(&s), &body)))
}

/// What a VM button does, and what its confirmation says.
fn vm_action_text(action: &str) -> Result<(&'static str, &'static str), ApiError> {
    match action {
        "start" => Ok(("Start", "boots it again with its disks as they are")),
        "stop" => Ok(("Stop", "shuts it down; its disks are kept")),
        "delete" => Ok(("Delete", "stops it and removes its disks and record; this cannot be undone")),
        other => Err(ApiError::invalid(format!("unknown VM action `{other}`")).with_hint("use start, stop or delete")),
    }
}

async fn vm_confirm(
    State(c): State<Arc<Console>>,
    Extension(s): Extension<Session>,
    UrlPath((name, action)): UrlPath<(String, String)>,
) -> PageResult {
    let (verb, effect) = vm_action_text(&action)?;
    let vm = c.call::<ops::VmShow>(&VmRef { vm: name }).await?;
    let n = seg(&vm.name);
    let body = format!(
        "<h1>{verb} VM {}?</h1><p>This {effect}.</p><form method=\"post\" action=\"/vms/{n}/{}\">{}\
         <button type=\"submit\" id=\"confirm\" class=\"{}\">Yes, {}</button> <a href=\"/vms/{n}\">No, go back</a></form>",
        esc(&vm.name),
        esc(&action),
        csrf_field(&s),
        if action == "delete" { "danger" } else { "" },
        verb.to_lowercase()
    );
    Ok(Html(layout(&format!("{verb} {}", vm.name), Some(&s), &body)))
}

async fn vm_action(
    State(c): State<Arc<Console>>,
    UrlPath((name, action)): UrlPath<(String, String)>,
) -> Result<Redirect, PageError> {
    vm_action_text(&action)?;
    let refs = VmRefs { vms: vec![name.clone()] };
    let result = match action.as_str() {
        "start" => c.call::<ops::VmStart>(&refs).await?,
        "stop" => c.call::<ops::VmStop>(&refs).await?,
        _ => c.call::<ops::VmDelete>(&refs).await?,
    };
    if let Some(e) = result.results.into_iter().find_map(|r| r.error) {
        return Err(e.into());
    }
    Ok(Redirect::to(if action == "delete" { "/vms".to_string() } else { format!("/vms/{}", seg(&name)) }.as_str()))
}

async fn images(State(c): State<Arc<Console>>, Extension(s): Extension<Session>) -> PageResult {
    let images = c.call::<ops::ImageList>(&Empty {}).await?;
    let mut from = String::from("<option value=\"\">none: use the recipe</option>");
    for i in &images.images {
        let _ = write!(from, "<option value=\"{0}\">{0}</option>", esc(&i.name));
    }
    let body = format!(
        "<h1>Images</h1>{}<h2>Build an image</h2><form method=\"post\" action=\"/images\" class=\"form\">{}\
         <label>Name <input name=\"name\" id=\"image-name\" required></label>\
         <label>Recipe <input name=\"recipe\" id=\"image-recipe\" placeholder=\"debian-minimal or debian-agent\"></label>\
         <label>Or from image <select name=\"from_image\" id=\"image-from\">{from}</select></label>\
         <label>Host script (absolute path of an executable, run as <code>script ROOT_DIR</code>) \
         <input name=\"script\" id=\"image-script\" placeholder=\"/path/to/customize.sh\"></label>\
         <label>Size (GiB) <input name=\"size_gib\" inputmode=\"numeric\"></label>\
         <label><input type=\"checkbox\" name=\"make_default\"> Make it the default image</label>\
         <label><input type=\"checkbox\" name=\"no_cache\"> Rebuild the recipe's root filesystem</label>\
         <button type=\"submit\" id=\"build\">Build</button></form>",
        image_table(&images.images),
        csrf_field(&s)
    );
    Ok(Html(layout("Images", Some(&s), &body)))
}

#[derive(Deserialize)]
struct BuildForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    recipe: String,
    #[serde(default)]
    from_image: String,
    #[serde(default)]
    script: String,
    #[serde(default)]
    size_gib: String,
    make_default: Option<String>,
    no_cache: Option<String>,
}

async fn image_build(State(c): State<Arc<Console>>, Form(f): Form<BuildForm>) -> Result<Redirect, PageError> {
    let params = ImageBuildParams {
        name: f.name.trim().to_string(),
        recipe: form_text(&f.recipe),
        from_image: form_text(&f.from_image),
        script: form_text(&f.script),
        size_gib: form_number("size", &f.size_gib)?,
        make_default: f.make_default.is_some(),
        no_cache: f.no_cache.is_some(),
    };
    let op = c.call::<ops::ImageBuildBegin>(&params).await?;
    Ok(Redirect::to(&format!("/operations/{}", seg(&op.id))))
}

/// The part of an operation page that live updates replace: state, stages, result or error.
fn operation_view(op: &OperationInfo) -> String {
    let state = op_state_name(op.state);
    let mut stages = String::new();
    for st in &op.stages {
        let st_state = serde_json::to_value(st.state).ok().and_then(|v| v.as_str().map(str::to_string));
        let took = st.duration_ms.map(|ms| format!(" ({:.1} s)", ms as f64 / 1000.0)).unwrap_or_default();
        let _ = write!(
            stages,
            "<li class=\"stage stage-{0}\">{1} <span>{0}</span>{took}</li>",
            esc(&st_state.unwrap_or_default()),
            esc(&st.name)
        );
    }
    let mut outcome = String::new();
    if let Some(vm) = &op.vm {
        if op.state == OperationState::Succeeded {
            let _ = write!(
                outcome,
                "<p><a class=\"button\" id=\"open-vm\" href=\"/vms/{}\">Open VM {}</a></p>",
                seg(&vm.name),
                esc(&vm.name)
            );
        }
    }
    if let Some(b) = &op.image_build {
        let _ = write!(
            outcome,
            "<p id=\"built\">Image {} is ready{}.</p>",
            esc(&b.image.name),
            if b.reused { " (reused: nothing changed)" } else { "" }
        );
    }
    if let Some(e) = &op.error {
        outcome.push_str(&error_box(e));
    }
    let detail = op.detail.as_deref().map(|d| format!("<p class=\"detail\">{}</p>", esc(d))).unwrap_or_default();
    format!(
        "<p>State: <strong id=\"op-state\" data-state=\"{state}\">{state}</strong> after {:.1} s</p>{detail}\
         <ol id=\"stages\">{stages}</ol>{outcome}",
        op.elapsed_ms as f64 / 1000.0
    )
}

async fn operation_page(
    State(c): State<Arc<Console>>,
    Extension(s): Extension<Session>,
    UrlPath(id): UrlPath<String>,
) -> PageResult {
    let op = c.call::<ops::OperationStatus>(&OperationRef { id: id.clone() }).await?;
    let cancel = if op.state == OperationState::Running {
        format!(
            "<form method=\"post\" action=\"/operations/{}/cancel\" id=\"cancel-form\">{}\
             <button type=\"submit\" id=\"cancel\" class=\"danger\">Cancel</button></form>",
            seg(&op.id),
            csrf_field(&s)
        )
    } else {
        String::new()
    };
    let body = format!(
        "<h1>{} {}</h1><div id=\"operation\" data-operation=\"{}\">{}</div>{cancel}",
        esc(&op.kind),
        esc(&op.target),
        esc(&op.id),
        operation_view(&op)
    );
    Ok(Html(layout(&format!("{} {}", op.kind, op.target), Some(&s), &body)))
}

/// The operation as JSON plus its rendered view, for the page's live updates.
async fn operation_json(State(c): State<Arc<Console>>, UrlPath(id): UrlPath<String>) -> Response {
    match c.call::<ops::OperationStatus>(&OperationRef { id }).await {
        Ok(op) => {
            let html = operation_view(&op);
            Json(serde_json::json!({"operation": op, "html": html})).into_response()
        }
        Err(e) => (StatusCode::NOT_FOUND, Json(serde_json::json!({"error": e}))).into_response(),
    }
}

async fn operation_cancel(State(c): State<Arc<Console>>, UrlPath(id): UrlPath<String>) -> Result<Redirect, PageError> {
    let op = c.call::<ops::OperationCancel>(&OperationRef { id }).await?;
    Ok(Redirect::to(&format!("/operations/{}", seg(&op.id))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_pass() {
        for ok in ["localhost", "localhost:7878", "LOCALHOST:1", "127.0.0.1", "127.0.0.1:80", "[::1]", "[::1]:7878"] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in
            ["", "evil.example", "evil.example:7878", "127.0.0.1.evil.example", "localhost.evil", "[::2]:1", "[::1"]
        {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn origin_must_be_this_console() {
        assert!(is_own_origin("http://127.0.0.1:7878"));
        assert!(is_own_origin("http://localhost:7878"));
        assert!(!is_own_origin("null"));
        assert!(!is_own_origin("https://evil.example"));
        assert!(!is_own_origin("http://evil.example:7878"));
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("", "abc"));
        assert!(!same_secret("ab", "abc"));
    }

    #[test]
    fn html_and_paths_are_escaped() {
        assert_eq!(esc("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        assert_eq!(seg("a b/../c"), "a%20b%2F..%2Fc");
    }

    #[test]
    fn token_file_is_private_and_stable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web-token");
        let first = load_or_create_token(&path).unwrap();
        assert_eq!(first.len(), 64);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(load_or_create_token(&path).unwrap(), first);
    }
}
