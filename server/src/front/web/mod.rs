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
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
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
use tools_schema::operation::OperationRef;
use tools_schema::ops::{self, Operation};
use tools_schema::session::SessionListParams;
use tools_schema::vm::{VmCreateParams, VmLogsParams, VmRef, VmRefs};
use tools_schema::{ApiError, ErrorCode};

use crate::engine::{CallContext, Engine};

mod pages;
use pages::{seg, Viewer};

const SESSION_COOKIE: &str = "banger_session";
/// Sessions kept at once; the oldest is forgotten beyond this (it just logs in again).
const MAX_SESSIONS: usize = 64;
/// Largest form a POST may carry (the forms hold names, numbers and paths).
const MAX_FORM_BYTES: usize = 64 << 10;
const STYLE: &str = include_str!("console.css");
const SCRIPT: &str = include_str!("console.js");

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
    let session = session_id(req.headers()).and_then(|id| console.sessions.lock().get(&id).cloned());
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
        let mut sessions = console.sessions.lock();
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
    page(pages::login(message))
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
        (status, page(pages::error_page(&e))).into_response()
    }
}

impl Console {
    /// Runs one operation through the engine, exactly as the other front doors do.
    async fn call<O: Operation>(&self, params: &O::Params) -> Result<O::Result, ApiError> {
        let params = serde_json::to_value(params).map_err(|e| {
            ApiError::internal(format!("encoding params: {e}")).with_hint(crate::engine::errors::hint::BUG)
        })?;
        // A browser that goes away cancels the work, as a JSON-RPC client that disconnects does.
        let cancel = CancellationToken::new();
        let _guard = cancel.clone().drop_guard();
        let value = self.engine.dispatch(O::METHOD, params, CallContext { cancel, progress: None }).await?;
        serde_json::from_value(value).map_err(|e| {
            ApiError::internal(format!("decoding {} result: {e}", O::METHOD))
                .with_hint(crate::engine::errors::hint::BUG)
        })
    }
}

type PageResult = Result<Html<String>, PageError>;

fn page(m: maud::Markup) -> Html<String> {
    Html(m.into_string())
}

fn viewer(s: &Session) -> Viewer<'_> {
    Viewer { csrf: &s.csrf }
}

// ---------------------------------------------------------------------------------------------------------
// Pages: each reads through operations, then renders in `pages`.

async fn dashboard(State(c): State<Arc<Console>>, Extension(s): Extension<Session>) -> PageResult {
    let status = c.call::<ops::DaemonStatus>(&Empty {}).await?;
    let vms = c.call::<ops::VmList>(&Empty {}).await?;
    let images = c.call::<ops::ImageList>(&Empty {}).await?;
    let operations = c.call::<ops::OperationList>(&Empty {}).await?;
    Ok(page(pages::dashboard(&viewer(&s), &status, &vms.vms, &images.images, &operations.operations)))
}

async fn vm_list(State(c): State<Arc<Console>>, Extension(s): Extension<Session>) -> PageResult {
    let vms = c.call::<ops::VmList>(&Empty {}).await?;
    Ok(page(pages::vm_list(&viewer(&s), &vms.vms)))
}

async fn vm_new(State(c): State<Arc<Console>>, Extension(s): Extension<Session>) -> PageResult {
    let images = c.call::<ops::ImageList>(&Empty {}).await?;
    let cfg = c.engine.config();
    Ok(page(pages::vm_new(&viewer(&s), &images.images, cfg.default_vcpus, cfg.default_memory_mib)))
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
    let stats = c.call::<ops::VmStats>(&VmRef { vm: name.clone() }).await;
    let sessions = c.call::<ops::SessionList>(&SessionListParams { vm: Some(name.clone()) }).await.map(|l| l.sessions);
    let console = c.call::<ops::VmLogs>(&VmLogsParams { vm: name, tail: Some(40) }).await.map(|l| l.lines);
    Ok(page(pages::vm_detail(&viewer(&s), &vm, stats, sessions, console)))
}

async fn vm_ports(
    State(c): State<Arc<Console>>,
    Extension(s): Extension<Session>,
    UrlPath(name): UrlPath<String>,
) -> PageResult {
    let ports = c.call::<ops::VmPorts>(&VmRef { vm: name }).await?;
    Ok(page(pages::vm_ports(&viewer(&s), &ports.vm, &ports.ports)))
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
    Ok(page(pages::vm_confirm(&viewer(&s), &vm.name, &action, verb, effect)))
}

async fn vm_action(
    State(c): State<Arc<Console>>,
    UrlPath((name, action)): UrlPath<(String, String)>,
) -> Result<Redirect, PageError> {
    vm_action_text(&action)?;
    let refs = VmRefs { vm: name.clone().into() };
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
    Ok(page(pages::images(&viewer(&s), &images.images)))
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

async fn operation_page(
    State(c): State<Arc<Console>>,
    Extension(s): Extension<Session>,
    UrlPath(id): UrlPath<String>,
) -> PageResult {
    let op = c.call::<ops::OperationStatus>(&OperationRef { id }).await?;
    Ok(page(pages::operation_page(&viewer(&s), &op)))
}

/// The operation as JSON plus its rendered view, for the page's live updates.
async fn operation_json(State(c): State<Arc<Console>>, UrlPath(id): UrlPath<String>) -> Response {
    match c.call::<ops::OperationStatus>(&OperationRef { id }).await {
        Ok(op) => {
            let html = pages::operation_view(&op).into_string();
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
