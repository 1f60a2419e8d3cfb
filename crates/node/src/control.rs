//! The control API: HTTP/JSON on the control address (loopback by default).
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/v1/status` | [`NodeInfo`] |
//! | GET | `/v1/topology[?probe=true&timeout_ms=N]` | [`Topology`] (with `probes` when asked) |
//! | GET | `/v1/members` | [`Members`] |
//! | GET | `/v1/events[?since=SEQ][&follow=true]` | newline-delimited [`Event`]s |
//! | POST | `/v1/ping` | [`PingRequest`] -> [`PingReport`] |
//! | POST | `/v1/forget` | [`ForgetRequest`] -> [`ForgetReport`] |
//! | POST | `/v1/secret` | [`SecretRequest`] -> [`KeyringReport`] |
//! | GET | `/v1/secrets` | [`Secrets`] (who holds which cluster secret) |
//! | GET | `/v1/certs` | [`CertsReport`] (which CA and certificate every node presents) |
//! | POST | `/v1/reload` | [`ReloadReport`] (re-read certificate, key and CA bundle) |
//! | POST | `/v1/load` | [`LoadRequest`] -> [`LoadReport`] (data messages to a node's `sink`) |
//! | GET | `/v1/sink[?node=NAME&reset=true]` | [`SinkReport`] (a node's `sink` counters; `reset` zeroes them after reading) |
//! | GET | `/metrics` | Prometheus text format |
//!
//! Handlers never touch the engine: they send a [`Command`] to the owner task and wait for the
//! answer. Every error, 404 and 405 included, is `{"error": "..."}` with a 4xx/5xx status.
//!
//! The API is served on the control socket and, when configured, on a TCP listener with tokens;
//! [`guard`] admits each request (see [`crate::auth`]), checks the `Host` header on TCP, and
//! records every request that needs the `admin` scope as a `control-call` event naming the caller.
//! `GET /v1/events?follow=true` sends an empty line every [`KEEPALIVE`] while nothing happens, so
//! a client can tell a quiet agent from a frozen one.

use crate::auth::{Caller, Scope, SocketAccess, Tokens};
use crate::inbox::Command;
use axum::body::Body;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::IncomingStream;
use axum::{Json, Router};
use clusterctl_api::{
    ApiError, CertsReport, Event, EventKind, ForgetReport, ForgetRequest, KeyringReport,
    LoadReport, LoadRequest, Members, NodeInfo, PingRequest, ReloadReport, Role, SecretRequest,
    Secrets, SinkReport, Topology, API_VERSION,
};
use clusterctl_core::engine::{format_rfc3339_ms, EventOut, Reply};
use clusterctl_core::name::NodeName;
use futures_util::StreamExt;
use serde::Deserialize;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot};

/// Most events kept for `GET /v1/events`.
pub const EVENT_HISTORY: usize = 4096;
/// Pause between two keep-alive lines of a followed event stream.
pub const KEEPALIVE: Duration = Duration::from_secs(2);
/// Largest body of a non-JSON error answer that is wrapped into `{"error": ...}`.
const MAX_ERROR_BODY: usize = 64 << 10;

/// What never changes while the agent runs.
#[derive(Debug, Clone)]
pub struct StaticInfo {
    pub cluster: String,
    pub name: String,
    pub site: String,
    pub role: Role,
    pub addr: String,
    pub secure: bool,
    pub contract_hash: String,
    pub started_at: String,
}

/// The node's recent events, and a live feed of new ones.
#[derive(Debug)]
pub struct EventLog {
    observer: String,
    inner: Mutex<(u64, VecDeque<Event>)>,
    tx: broadcast::Sender<Event>,
}

impl EventLog {
    /// An empty log for `observer`.
    pub fn new(observer: String) -> Self {
        let (tx, _) = broadcast::channel(1024);
        EventLog {
            observer,
            inner: Mutex::new((0, VecDeque::new())),
            tx,
        }
    }

    /// Records an engine event (and logs it).
    pub fn record(&self, e: EventOut) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.0 += 1;
        let ev = Event {
            seq: g.0,
            at: format_rfc3339_ms(e.at_ms),
            observer: self.observer.clone(),
            kind: e.kind,
            node: e.node.map(|n| n.to_string()),
            peer: e.peer.map(|n| n.to_string()),
            reason: e.reason,
        };
        tracing::info!(
            kind = ev.kind.as_str(),
            node = ev.node.as_deref().unwrap_or(""),
            peer = ev.peer.as_deref().unwrap_or(""),
            "{}",
            ev.reason
        );
        if g.1.len() >= EVENT_HISTORY {
            g.1.pop_front();
        }
        g.1.push_back(ev.clone());
        let _ = self.tx.send(ev);
    }

    /// Records an event of the agent itself (not of the engine), stamped with the wall clock.
    pub fn record_now(&self, kind: EventKind, node: Option<String>, reason: String) {
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let node = node.and_then(|n| NodeName::new(n).ok());
        self.record(EventOut {
            at_ms,
            kind,
            node,
            peer: None,
            reason,
        });
    }

    /// Events with a sequence number above `since`.
    pub fn since(&self, since: u64) -> Vec<Event> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.1.iter().filter(|e| e.seq > since).cloned().collect()
    }
}

#[derive(Clone)]
struct Ctx {
    cmd: mpsc::Sender<Command>,
    events: Arc<EventLog>,
    info: Arc<StaticInfo>,
    data: crate::data::DataPath,
    access: Arc<Access>,
}

/// Who may use the API: the control socket's operators, and the TCP listener's tokens.
#[derive(Debug, Clone)]
pub struct Access {
    pub socket: SocketAccess,
    pub tokens: Option<Tokens>,
}

/// The listeners the API is served on.
#[derive(Debug)]
pub struct Listeners {
    /// The control socket (always).
    pub socket: tokio::net::UnixListener,
    /// The TCP listener (`control`), only with tokens.
    pub tcp: Option<tokio::net::TcpListener>,
}

/// Who is on the other end of a control connection, as the kernel says.
#[derive(Debug, Clone)]
enum Conn {
    /// A control socket peer; `None` when its credentials could not be read.
    Socket(Option<(u32, u32, Option<i32>)>),
    /// A TCP peer and the listener's own address.
    Tcp {
        peer: std::net::SocketAddr,
        local: std::net::SocketAddr,
    },
}

impl Connected<IncomingStream<'_, tokio::net::UnixListener>> for Conn {
    fn connect_info(stream: IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        Conn::Socket(
            stream
                .io()
                .peer_cred()
                .ok()
                .map(|c| (c.uid(), c.gid(), c.pid())),
        )
    }
}

impl Connected<IncomingStream<'_, tokio::net::TcpListener>> for Conn {
    fn connect_info(stream: IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        let peer = *stream.remote_addr();
        let local = stream
            .io()
            .local_addr()
            .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        Conn::Tcp { peer, local }
    }
}

type ApiResult<T> = Result<T, (StatusCode, Json<ApiError>)>;

fn err(status: StatusCode, msg: impl Into<String>) -> (StatusCode, Json<ApiError>) {
    (status, Json(ApiError { error: msg.into() }))
}

async fn ask<T>(
    ctx: &Ctx,
    make: impl FnOnce(oneshot::Sender<T>) -> Command,
    wait: Duration,
) -> ApiResult<T> {
    let (tx, rx) = oneshot::channel();
    ctx.cmd.send(make(tx)).await.map_err(|_| {
        err(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is shutting down",
        )
    })?;
    match tokio::time::timeout(wait, rx).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(_)) => Err(err(
            StatusCode::BAD_REQUEST,
            "the request was rejected (see the agent log)",
        )),
        Err(_) => Err(err(
            StatusCode::GATEWAY_TIMEOUT,
            "the agent did not answer in time",
        )),
    }
}

/// Serves the control API until the task is aborted.
pub async fn serve(
    listeners: Listeners,
    cmd: mpsc::Sender<Command>,
    events: Arc<EventLog>,
    info: StaticInfo,
    data: crate::data::DataPath,
    access: Access,
) {
    let ctx = Ctx {
        cmd,
        events,
        info: Arc::new(info),
        data,
        access: Arc::new(access),
    };
    let app = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/topology", get(topology))
        .route("/v1/members", get(members))
        .route("/v1/events", get(events_route))
        .route("/v1/ping", post(ping))
        .route("/v1/forget", post(forget))
        .route("/v1/secret", post(secret))
        .route("/v1/secrets", get(secrets))
        .route("/v1/certs", get(certs))
        .route("/v1/reload", post(reload))
        .route("/v1/load", post(load))
        .route("/v1/sink", get(sink))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(ctx.clone(), guard))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(ctx);
    let socket = axum::serve(
        listeners.socket,
        app.clone().into_make_service_with_connect_info::<Conn>(),
    );
    let result = match listeners.tcp {
        None => socket.await,
        Some(tcp) => {
            let tcp = axum::serve(tcp, app.into_make_service_with_connect_info::<Conn>());
            tokio::select! {
                r = socket => r,
                r = tcp => r,
            }
        }
    };
    if let Err(e) = result {
        tracing::error!("control API stopped: {e}");
    }
}

async fn not_found() -> (StatusCode, Json<ApiError>) {
    err(
        StatusCode::NOT_FOUND,
        "no such endpoint (the control API is described in docs/api.md)",
    )
}

async fn method_not_allowed() -> (StatusCode, Json<ApiError>) {
    err(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this endpoint (the control API is described in docs/api.md)",
    )
}

/// Admits a request or answers 401/403/421, and records every `admin` request as an event.
async fn guard(
    State(ctx): State<Ctx>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    mut req: Request,
    next: Next,
) -> Response {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let needed = crate::auth::required_scope(&method, &path, &query);
    let what = if query.is_empty() {
        format!("{method} {path}")
    } else {
        format!("{method} {path}?{query}")
    };
    let caller = match authenticate(&ctx.access, &conn, &req) {
        Ok(c) => c,
        Err((status, why, who)) => {
            if needed == Scope::Admin {
                ctx.events.record_now(
                    EventKind::ControlCall,
                    None,
                    format!("{what} by {who}: refused ({}): {why}", status.as_u16()),
                );
            }
            let mut r = err(status, why).into_response();
            if status == StatusCode::UNAUTHORIZED {
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            return r;
        }
    };
    if !caller.scope().allows(needed) {
        let why = format!(
            "{what} needs the {needed} scope; this caller ({caller}) holds {}",
            caller.scope()
        );
        if needed == Scope::Admin {
            ctx.events.record_now(
                EventKind::ControlCall,
                None,
                format!("{what} by {caller}: refused (403): needs {needed}"),
            );
        }
        return err(StatusCode::FORBIDDEN, why).into_response();
    }
    req.extensions_mut().insert(caller.clone());
    let response = next.run(req).await;
    if needed == Scope::Admin {
        let status = response.status();
        ctx.events.record_now(
            EventKind::ControlCall,
            None,
            format!(
                "{what} by {caller}: {} {}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            ),
        );
    }
    response
}

/// Who is calling, or why they may not: (status, reason, who as far as known).
fn authenticate(
    access: &Access,
    conn: &Conn,
    req: &Request,
) -> Result<Caller, (StatusCode, String, String)> {
    match conn {
        Conn::Socket(None) => Err((
            StatusCode::FORBIDDEN,
            "the control socket could not read this caller's credentials".into(),
            "an unknown socket peer".into(),
        )),
        Conn::Socket(Some((uid, gid, pid))) => {
            if access.socket.admits(*uid, *gid, crate::auth::groups_of) {
                Ok(Caller::Socket {
                    uid: *uid,
                    pid: *pid,
                })
            } else {
                Err((
                    StatusCode::FORBIDDEN,
                    format!(
                        "uid {uid} is not an operator of this agent: only its user (uid {}), root{} may use its control socket",
                        access.socket.owner,
                        if access.socket.group.is_some() { " and members of control-group" } else { "" }
                    ),
                    format!("uid {uid} on the control socket"),
                ))
            }
        }
        Conn::Tcp { peer, local } => {
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok());
            if !crate::auth::host_allowed(host, *local) {
                return Err((
                    StatusCode::MISDIRECTED_REQUEST,
                    format!(
                        "the Host header {:?} does not name this control listener ({local}): requests through other names are refused",
                        host.unwrap_or("")
                    ),
                    format!("{peer}"),
                ));
            }
            let Some(tokens) = &access.tokens else {
                return Err((
                    StatusCode::UNAUTHORIZED,
                    "this listener has no tokens configured".into(),
                    format!("{peer}"),
                ));
            };
            let presented = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.strip_prefix("Bearer "))
                .map(str::trim);
            let Some(presented) = presented else {
                return Err((
                    StatusCode::UNAUTHORIZED,
                    "a token is required: pass --token-file FILE or set CLUSTERCTL_TOKEN (header `Authorization: Bearer TOKEN`)".into(),
                    format!("{peer} without a token"),
                ));
            };
            match tokens.check(presented) {
                Some((scope, id)) => Ok(Caller::Token {
                    scope,
                    id,
                    from: *peer,
                }),
                None => Err((
                    StatusCode::UNAUTHORIZED,
                    "the token is not valid for this agent".into(),
                    format!("{peer} with an unknown token"),
                )),
            }
        }
    }
}

/// Turns every error answer that is not JSON (extractor rejections, timeouts) into
/// `{"error": ...}`.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, MAX_ERROR_BODY).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_string(),
        Err(_) => String::new(),
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let body = serde_json::to_vec(&ApiError { error: message }).unwrap_or_default();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(body))
}

async fn status(State(ctx): State<Ctx>) -> ApiResult<Json<NodeInfo>> {
    let clock = ask(
        &ctx,
        |reply| Command::Clock { reply },
        Duration::from_secs(5),
    )
    .await?;
    let i = &ctx.info;
    Ok(Json(NodeInfo {
        api_version: API_VERSION,
        cluster: i.cluster.clone(),
        name: i.name.clone(),
        site: i.site.clone(),
        role: i.role,
        addr: i.addr.clone(),
        version: crate::VERSION.to_string(),
        secure: i.secure,
        clock,
        contract_hash: i.contract_hash.clone(),
        started_at: i.started_at.clone(),
    }))
}

#[derive(Debug, Deserialize)]
struct TopologyQuery {
    #[serde(default)]
    probe: bool,
    timeout_ms: Option<u64>,
}

async fn topology(
    State(ctx): State<Ctx>,
    Query(q): Query<TopologyQuery>,
) -> ApiResult<Json<Topology>> {
    let probes = if q.probe {
        let timeout_ms = q.timeout_ms.unwrap_or(1000).clamp(1, 60_000);
        let wait = Duration::from_millis(timeout_ms * 3 + 2000);
        match ask(&ctx, |reply| Command::Probe { timeout_ms, reply }, wait).await? {
            Reply::Probes(p) => Some(p),
            Reply::Ping(_) | Reply::Sink(_) | Reply::Load(_) => None,
        }
    } else {
        None
    };
    let mut t = ask(
        &ctx,
        |reply| Command::Topology { reply },
        Duration::from_secs(5),
    )
    .await?;
    t.probes = probes;
    Ok(Json(t))
}

async fn members(State(ctx): State<Ctx>) -> ApiResult<Json<Members>> {
    Ok(Json(
        ask(
            &ctx,
            |reply| Command::Members { reply },
            Duration::from_secs(5),
        )
        .await?,
    ))
}

async fn ping(
    State(ctx): State<Ctx>,
    Json(req): Json<PingRequest>,
) -> ApiResult<Json<clusterctl_api::PingReport>> {
    if req.count == 0 || req.count > clusterctl_core::engine::MAX_PING_COUNT {
        return Err(err(
            StatusCode::BAD_REQUEST,
            format!(
                "count must be between 1 and {}",
                clusterctl_core::engine::MAX_PING_COUNT
            ),
        ));
    }
    let wait = Duration::from_millis(req.timeout_ms.clamp(1, 60_000)) * (req.count + 1)
        + Duration::from_secs(5);
    match ask(&ctx, |reply| Command::Ping { req, reply }, wait).await? {
        Reply::Ping(r) => Ok(Json(r)),
        Reply::Probes(_) | Reply::Sink(_) | Reply::Load(_) => {
            Err(err(StatusCode::INTERNAL_SERVER_ERROR, "unexpected answer"))
        }
    }
}

async fn load(State(ctx): State<Ctx>, Json(req): Json<LoadRequest>) -> ApiResult<Json<LoadReport>> {
    let bad = |e: String| err(StatusCode::BAD_REQUEST, e);
    let from = match req.from.as_deref() {
        Some(f) => NodeName::new(f).map_err(|e| bad(format!("from: {e}")))?,
        None => ctx.data.me.clone(),
    };
    let target = crate::data::check_load(&from, &req).map_err(bad)?;
    if from != ctx.data.me {
        let wait =
            Duration::from_millis(req.timeout_ms.clamp(1, 3_600_000)) + Duration::from_secs(20);
        let make = |reply| Command::LoadFrom {
            from,
            target,
            req,
            reply,
        };
        return match ask(&ctx, make, wait).await? {
            Reply::Load(Ok(r)) => Ok(Json(r)),
            Reply::Load(Err(e)) => Err(err(StatusCode::BAD_GATEWAY, e)),
            _ => Err(err(StatusCode::INTERNAL_SERVER_ERROR, "unexpected answer")),
        };
    }
    // The load runs in its own task, so a client that hangs up does not cut it short midway.
    let run = tokio::spawn(crate::data::run_load(
        ctx.data.clone(),
        ctx.cmd.clone(),
        req,
    ));
    match run.await {
        Ok(Ok(r)) => Ok(Json(r)),
        Ok(Err(e)) => Err(err(StatusCode::BAD_GATEWAY, e)),
        Err(e) => Err(err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

#[derive(Debug, Deserialize)]
struct SinkQuery {
    node: Option<String>,
    #[serde(default)]
    reset: bool,
}

async fn sink(State(ctx): State<Ctx>, Query(q): Query<SinkQuery>) -> ApiResult<Json<SinkReport>> {
    let target = match q.node {
        Some(n) => {
            NodeName::new(n).map_err(|e| err(StatusCode::BAD_REQUEST, format!("node: {e}")))?
        }
        None => ctx.data.me.clone(),
    };
    let timeout = Duration::from_secs(5);
    let make = |reply| Command::Sink {
        target,
        reset: q.reset,
        timeout,
        reply,
    };
    match ask(&ctx, make, timeout + Duration::from_secs(2)).await? {
        Reply::Sink(Ok(r)) => Ok(Json(r)),
        Reply::Sink(Err(e)) => Err(err(StatusCode::BAD_GATEWAY, e)),
        _ => Err(err(StatusCode::INTERNAL_SERVER_ERROR, "unexpected answer")),
    }
}

async fn forget(
    State(ctx): State<Ctx>,
    Json(req): Json<ForgetRequest>,
) -> ApiResult<Json<ForgetReport>> {
    let name = req.name.clone();
    let force = req.force;
    match ask(
        &ctx,
        |reply| Command::Forget { name, force, reply },
        Duration::from_secs(5),
    )
    .await?
    {
        Ok(clock) => Ok(Json(ForgetReport {
            name: req.name,
            clock,
        })),
        Err(e) => Err(err(StatusCode::BAD_REQUEST, e)),
    }
}

async fn secret(
    State(ctx): State<Ctx>,
    Json(req): Json<SecretRequest>,
) -> ApiResult<Json<KeyringReport>> {
    match ask(
        &ctx,
        |reply| Command::Secret { req, reply },
        Duration::from_secs(5),
    )
    .await?
    {
        Ok(r) => Ok(Json(r)),
        Err(e) => Err(err(StatusCode::BAD_REQUEST, e)),
    }
}

async fn certs(State(ctx): State<Ctx>) -> ApiResult<Json<CertsReport>> {
    Ok(Json(
        ask(
            &ctx,
            |reply| Command::Certs { reply },
            Duration::from_secs(5),
        )
        .await?,
    ))
}

async fn reload(State(ctx): State<Ctx>) -> ApiResult<Json<ReloadReport>> {
    Ok(Json(
        ask(
            &ctx,
            |reply| Command::Reload { reply },
            Duration::from_secs(10),
        )
        .await?,
    ))
}

async fn secrets(State(ctx): State<Ctx>) -> ApiResult<Json<Secrets>> {
    Ok(Json(
        ask(
            &ctx,
            |reply| Command::Secrets { reply },
            Duration::from_secs(5),
        )
        .await?,
    ))
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    #[serde(default)]
    since: u64,
    #[serde(default)]
    follow: bool,
}

fn line(e: &Event) -> bytes::Bytes {
    let mut v = serde_json::to_vec(e).unwrap_or_default();
    v.push(b'\n');
    bytes::Bytes::from(v)
}

async fn events_route(State(ctx): State<Ctx>, Query(q): Query<EventsQuery>) -> Response {
    // Subscribe first so nothing falls between the history and the live feed.
    let live = tokio_stream::wrappers::BroadcastStream::new(ctx.events.tx.subscribe());
    let past = ctx.events.since(q.since);
    let mut last = past.last().map_or(q.since, |e| e.seq);
    let head = futures_util::stream::iter(
        past.iter()
            .map(line)
            .map(Ok::<_, std::convert::Infallible>)
            .collect::<Vec<_>>(),
    );
    let body = if q.follow {
        let tail = live.filter_map(move |r| {
            let out = match r {
                Ok(e) if e.seq > last => {
                    last = e.seq;
                    Some(Ok(line(&e)))
                }
                _ => None,
            };
            std::future::ready(out)
        });
        // Keep-alive lines while nothing happens: a client tells a quiet agent from a frozen one.
        let beat = tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
        let beats = tokio_stream::wrappers::IntervalStream::new(beat)
            .map(|_| Ok(bytes::Bytes::from_static(b"\n")));
        Body::from_stream(head.chain(futures_util::stream::select(tail, beats)))
    } else {
        Body::from_stream(head)
    };
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

async fn metrics(State(ctx): State<Ctx>) -> ApiResult<Response> {
    use prometheus_client::encoding::text::encode;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::registry::Registry;
    let m = ask(
        &ctx,
        |reply| Command::Metrics { reply },
        Duration::from_secs(5),
    )
    .await?;
    let mut reg = Registry::with_prefix("clusterctl");
    let mut add = |name: &str, help: &str, v: u64| {
        let g: Gauge<i64> = Gauge::default();
        g.set(i64::try_from(v).unwrap_or(i64::MAX));
        reg.register(name, help, g);
    };
    let c = &m.counters;
    add(
        "handshakes_refused_in",
        "Handshakes this node refused",
        c.refused_in,
    );
    add(
        "handshakes_refused_out",
        "Handshakes peers refused to this node",
        c.refused_out,
    );
    add("frames_in", "Frames received", c.frames_in);
    add(
        "bad_frames",
        "Frames dropped because they did not decode",
        c.bad_frames,
    );
    add(
        "records_merged",
        "Node-table records merged",
        c.records_merged,
    );
    add(
        "records_refused",
        "Node-table records refused (caps)",
        c.records_refused,
    );
    add(
        "routed_forwarded",
        "Routed messages sent or forwarded",
        c.routed_forwarded,
    );
    add(
        "routed_undeliverable",
        "Routed messages that could not be forwarded",
        c.routed_undeliverable,
    );
    add(
        "datagrams_dropped",
        "Failure-detector datagrams dropped",
        c.datagrams_dropped,
    );
    add(
        "outbox_dropped",
        "Outputs dropped because the outbox was full",
        c.outbox_dropped,
    );
    add(
        "sink_messages",
        "Data messages the sink process counted",
        c.sink_messages,
    );
    add(
        "sink_bytes",
        "Payload bytes the sink process counted",
        c.sink_bytes,
    );
    add(
        "messages_refused",
        "Data messages to a process this node does not run (bounced)",
        c.messages_refused,
    );
    add(
        "data_forwarded",
        "Data messages forwarded on the bulk lane by the data path",
        m.data_forwarded,
    );
    add(
        "data_dropped",
        "Data messages dropped because a bulk lane stayed full",
        m.data_dropped,
    );
    add(
        "load_sent",
        "Data messages sent by the load generator",
        m.load_sent,
    );
    add(
        "control_forwarded",
        "Routed control frames (echo, calls, replies, bounces) forwarded on the control lane by the data path",
        m.control_forwarded,
    );
    add(
        "echo_answered",
        "Echo requests answered by the data path",
        m.echo_answered,
    );
    add(
        "control_dropped",
        "Routed control frames the data path dropped because a control lane was full",
        m.control_dropped,
    );
    add("links_up", "Links currently up", m.links_up);
    add(
        "table_records",
        "Records in the node table",
        m.table_records,
    );
    add("clock", "Clock of this node's own record", m.clock);
    add(
        "local_health",
        "Local health score (0 = healthy)",
        m.health_score,
    );
    let w = &m.wire;
    add(
        "wire_tx_bytes",
        "UDP payload bytes sent on this node's QUIC connections (no IP/UDP headers)",
        w.tx_bytes,
    );
    add(
        "wire_tx_datagrams",
        "UDP datagrams sent on this node's QUIC connections",
        w.tx_datagrams,
    );
    add(
        "wire_rx_bytes",
        "UDP payload bytes received on this node's QUIC connections (no IP/UDP headers)",
        w.rx_bytes,
    );
    add(
        "wire_rx_datagrams",
        "UDP datagrams received on this node's QUIC connections",
        w.rx_datagrams,
    );
    let mut out = String::new();
    encode(&mut out, &reg).map_err(|e| err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}
