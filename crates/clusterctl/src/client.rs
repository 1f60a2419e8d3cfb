//! HTTP/JSON client of an agent's control API, on its control socket or a TCP listener.
//!
//! Every command that talks to an agent goes through [`Client`]: it picks the agent
//! ([`Client::resolve`]), sends the token on TCP, bounds every request in time, and turns
//! transport failures and `{"error": ...}` answers into messages an operator can act on.
//!
//! Agents are named by `--agent`: `unix:PATH` (a control socket), `HOST:PORT` (a TCP listener,
//! which needs a token: `--token-file FILE` or `$CLUSTERCTL_TOKEN`), or the name of a lab node
//! (its control socket, from `lab.json`).

use anyhow::{anyhow, bail, Context};
use clusterctl_api::ApiError;
use http_body_util::BodyExt;
use hyper::body::Bytes;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Time allowed to open the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Time allowed for a whole request, answer included, unless `--timeout` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest answer body read.
const MAX_BODY: usize = 16 << 20;
/// Longest line of a newline-delimited stream.
const MAX_LINE: usize = 1 << 20;
/// Most bytes of a non-JSON error body quoted in a message.
const MAX_QUOTED: usize = 200;

/// Which agent a command talks to, with which token, and how long it waits.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AgentArgs {
    /// The agent to ask: unix:PATH (its control socket), HOST:PORT (its TCP control listener,
    /// with a token) or the name of a lab node.
    /// Default: $CLUSTERCTL_AGENT, else the first running node of the lab.
    #[arg(long, global = true, env = "CLUSTERCTL_AGENT")]
    pub agent: Option<String>,
    /// File holding the token for a TCP control listener (mode 0600). Default: $CLUSTERCTL_TOKEN,
    /// which holds the token itself.
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// How long to wait for the agent, e.g. 10s or 500ms. For every request: 10s. For `ping`
    /// and `topology --probe` it is the wait for each probe (default 2s and 1s); for `load` the
    /// whole run (default 60s).
    #[arg(long, global = true, value_name = "DURATION", value_parser = humantime::parse_duration, conflicts_with = "timeout_ms")]
    pub timeout: Option<std::time::Duration>,
    /// The same as --timeout, in milliseconds.
    #[arg(long, global = true, value_name = "MS")]
    pub timeout_ms: Option<u64>,
}

impl AgentArgs {
    /// `--timeout` (or `--timeout-ms`), when given.
    pub fn timeout(&self) -> anyhow::Result<Option<std::time::Duration>> {
        let t = match (self.timeout, self.timeout_ms) {
            (Some(t), _) => Some(t),
            (None, Some(ms)) => Some(std::time::Duration::from_millis(ms)),
            (None, None) => None,
        };
        if t.is_some_and(|t| t.is_zero() || t > std::time::Duration::from_secs(24 * 3600)) {
            anyhow::bail!("--timeout must be between 1ms and 24h");
        }
        Ok(t)
    }

    /// The token for a TCP listener: `--token-file`, else `$CLUSTERCTL_TOKEN`.
    pub fn token(&self) -> anyhow::Result<Option<String>> {
        if let Some(path) = &self.token_file {
            return read_token_file(path).map(Some);
        }
        Ok(std::env::var("CLUSTERCTL_TOKEN")
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty()))
    }
}

/// Where an agent's control API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A control socket.
    Socket(PathBuf),
    /// A TCP listener, `HOST:PORT`.
    Tcp(String),
}

impl Endpoint {
    /// Reads `unix:PATH`, an absolute or `./` path, or `HOST:PORT`.
    pub fn parse(text: &str) -> anyhow::Result<Endpoint> {
        let text = text.trim();
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                bail!("{text:?} names no socket: write unix:PATH, e.g. unix:/var/lib/clusterctl/control.sock");
            }
            return Ok(Endpoint::Socket(PathBuf::from(path)));
        }
        if text.starts_with('/') || text.starts_with("./") {
            return Ok(Endpoint::Socket(PathBuf::from(text)));
        }
        if text.contains(':') {
            return Ok(Endpoint::Tcp(text.to_string()));
        }
        bail!("{text:?} is not an agent address: write unix:PATH or HOST:PORT")
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Socket(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => f.write_str(a),
        }
    }
}

/// A client of one agent's control API.
#[derive(Clone)]
pub struct Client {
    endpoint: Endpoint,
    /// `endpoint` as text, for messages.
    addr: String,
    token: Option<String>,
    timeout: Duration,
    rt: Arc<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "…"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// One answer: status and body.
struct Answer {
    status: hyper::StatusCode,
    body: hyper::body::Incoming,
}

impl Client {
    /// Chooses the agent: `--agent`/CLUSTERCTL_AGENT (`unix:PATH`, `HOST:PORT` or the name of a
    /// lab node), else the first running node of the default lab. The token comes from
    /// `--token-file` or `$CLUSTERCTL_TOKEN`; the bound from `--timeout`.
    pub fn resolve(args: &AgentArgs) -> anyhow::Result<Client> {
        let timeout = args.timeout()?.unwrap_or(DEFAULT_TIMEOUT);
        Client::resolve_with(args, timeout)
    }

    /// Like [`Client::resolve`], with `timeout` for each whole request.
    pub fn resolve_with(args: &AgentArgs, timeout: Duration) -> anyhow::Result<Client> {
        let token = args.token()?;
        let dir = crate::lab::default_dir();
        let endpoint = match args.agent.as_deref().map(str::trim) {
            Some("") => bail!("--agent is empty: pass unix:PATH or HOST:PORT of an agent's control API, or the name of a lab node"),
            Some(value) if value.contains(':') || value.starts_with('/') || value.starts_with("./") => {
                Endpoint::parse(value)?
            }
            Some(name) => {
                let state = crate::lab::LabState::load(&dir)?;
                let node = state
                    .as_ref()
                    .and_then(|s| s.nodes.iter().find(|n| n.name == name));
                match node {
                    Some(n) => n.endpoint(),
                    None if state.is_none() => bail!(
                        "--agent {name:?} is neither unix:PATH, HOST:PORT nor a node of a lab (no lab in {}): pass the agent's control socket, e.g. --agent unix:/var/lib/clusterctl/control.sock",
                        dir.display()
                    ),
                    None => bail!(
                        "--agent {name:?} is neither unix:PATH, HOST:PORT nor a node of the lab in {} (see `clusterctl lab status`)",
                        dir.display()
                    ),
                }
            }
            None => {
                let state = crate::lab::LabState::load(&dir)?;
                match state.as_ref().and_then(|s| s.running_nodes().into_iter().next()) {
                    Some(n) => n.endpoint(),
                    None => bail!(
                        "no agent to talk to: pass --agent unix:PATH (the agent's control socket, DATA-DIR/control.sock by default) or HOST:PORT, set CLUSTERCTL_AGENT, or start a lab with `clusterctl lab up`"
                    ),
                }
            }
        };
        Ok(Client::new(endpoint, token, timeout))
    }

    /// The agents a changing command applies to: every node of the default lab with `--all`
    /// (whichever process runs it now), else the one [`Client::resolve`] picks.
    pub fn targets(all: bool, args: &AgentArgs) -> anyhow::Result<Vec<Client>> {
        if !all {
            return Ok(vec![Client::resolve(args)?]);
        }
        let dir = crate::lab::default_dir();
        let state = crate::lab::LabState::load(&dir)?
            .ok_or_else(|| anyhow::anyhow!("--all needs a lab: no lab in {}", dir.display()))?;
        let timeout = args.timeout()?.unwrap_or(DEFAULT_TIMEOUT);
        let token = args.token()?;
        Ok(state
            .nodes
            .iter()
            .map(|n| Client::new(n.endpoint(), token.clone(), timeout))
            .collect())
    }

    /// A client of `endpoint`, sending `token` on TCP, bounding each request by `timeout`.
    pub fn new(endpoint: Endpoint, token: Option<String>, timeout: Duration) -> Client {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .expect("a current-thread runtime needs no resources that can run out");
        Client {
            addr: endpoint.to_string(),
            endpoint,
            token,
            timeout,
            rt: Arc::new(rt),
        }
    }

    /// A client of the agent at `addr` (`unix:PATH` or `HOST:PORT`) with the default bound;
    /// the token, if any, from `$CLUSTERCTL_TOKEN`.
    #[cfg(test)]
    pub fn at(addr: &str) -> Client {
        Client::with_timeout(addr, DEFAULT_TIMEOUT)
    }

    /// Like [`Client::at`], with `timeout` for each whole request.
    pub fn with_timeout(addr: &str, timeout: Duration) -> Client {
        let endpoint =
            Endpoint::parse(addr).unwrap_or_else(|_| Endpoint::Tcp(addr.trim().to_string()));
        let token = std::env::var("CLUSTERCTL_TOKEN")
            .ok()
            .map(|t| t.trim().to_string());
        Client::new(endpoint, token, timeout)
    }

    /// The agent this client talks to, as `unix:PATH` or `HOST:PORT`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `GET path` and decode the JSON answer.
    pub fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let body = self.call("GET", path, None)?;
        self.decode(path, &body)
    }

    /// `GET path` and return the answer as text (for `/metrics`).
    pub fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let body = self.call("GET", path, None)?;
        String::from_utf8(body.to_vec())
            .map_err(|_| anyhow!("the agent at {} sent invalid UTF-8 on {path}", self.addr))
    }

    /// `POST path` with a JSON body and decode the JSON answer.
    pub fn post<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let json = serde_json::to_vec(body)?;
        let answer = self.call("POST", path, Some(json))?;
        self.decode(path, &answer)
    }

    /// Streams a newline-delimited JSON answer line by line until `f` returns false or the stream
    /// ends. There is no bound on the whole stream, but one on silence: the agent sends an empty
    /// line every 2 s, so nothing at all for the client's timeout means the agent is frozen or
    /// gone, and that is an error. Empty lines are skipped.
    pub fn stream_lines(&self, path: &str, mut f: impl FnMut(&str) -> bool) -> anyhow::Result<()> {
        let rt = self.rt.clone();
        rt.block_on(async {
            let answer = tokio::time::timeout(self.timeout, self.send("GET", path, None))
                .await
                .map_err(|_| self.timed_out(path))??;
            let mut body = self.check(path, answer).await?;
            let mut buf: Vec<u8> = Vec::new();
            loop {
                let frame = match tokio::time::timeout(self.timeout, body.frame()).await {
                    Err(_) => bail!(
                        "the agent at {} sent nothing on {path} for {} (not even a keep-alive): it is frozen, overloaded or gone",
                        self.addr,
                        humantime::format_duration(self.timeout)
                    ),
                    Ok(None) => break,
                    Ok(Some(Err(e))) => {
                        bail!("reading {path} from the agent at {}: {e}", self.addr)
                    }
                    Ok(Some(Ok(frame))) => frame,
                };
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                buf.extend_from_slice(&data);
                while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let text = std::str::from_utf8(&line)
                        .map_err(|_| {
                            anyhow!("the agent at {} sent invalid UTF-8 on {path}", self.addr)
                        })?
                        .trim();
                    if text.is_empty() {
                        continue;
                    }
                    if !f(text) {
                        return Ok(());
                    }
                }
                if buf.len() > MAX_LINE {
                    bail!(
                        "the agent at {} sent a line longer than {MAX_LINE} bytes on {path}",
                        self.addr
                    );
                }
            }
            let rest = String::from_utf8_lossy(&buf);
            let rest = rest.trim();
            if !rest.is_empty() {
                f(rest);
            }
            Ok(())
        })
    }

    /// One request, bounded by the client's timeout from connect to the last byte.
    fn call(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> anyhow::Result<Bytes> {
        let rt = self.rt.clone();
        rt.block_on(async {
            let work = async {
                let answer = self.send(method, path, body).await?;
                let body = self.check(path, answer).await?;
                self.read_body(path, body).await
            };
            tokio::time::timeout(self.timeout, work)
                .await
                .map_err(|_| self.timed_out(path))?
        })
    }

    fn timed_out(&self, path: &str) -> anyhow::Error {
        anyhow!(
            "the agent at {} did not answer {path} within {} (is it frozen or overloaded? raise --timeout to wait longer)",
            self.addr,
            humantime::format_duration(self.timeout)
        )
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<Answer> {
        debug_assert!(path.starts_with('/'), "paths start with '/': {path}");
        let host = match &self.endpoint {
            Endpoint::Tcp(a) => a.clone(),
            Endpoint::Socket(_) => "localhost".to_string(),
        };
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, host)
            .header(hyper::header::ACCEPT, "application/json");
        if let (Endpoint::Tcp(_), Some(t)) = (&self.endpoint, &self.token) {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let body = match body {
            Some(b) => {
                req = req.header(hyper::header::CONTENT_TYPE, "application/json");
                http_body_util::Full::new(Bytes::from(b))
            }
            None => http_body_util::Full::new(Bytes::new()),
        };
        let req = req
            .body(body)
            .map_err(|e| anyhow!("{path} cannot be requested: {e}"))?;
        let response = match &self.endpoint {
            Endpoint::Tcp(addr) => {
                let stream = tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    tokio::net::TcpStream::connect(addr.as_str()),
                )
                .await
                .map_err(|_| {
                    anyhow!(
                        "cannot reach the agent at {addr}: no connection within {}",
                        humantime::format_duration(CONNECT_TIMEOUT)
                    )
                })?
                .map_err(|e| self.connect_error(&e))?;
                exchange(stream, req).await
            }
            Endpoint::Socket(path) => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| self.connect_error(&e))?;
                exchange(stream, req).await
            }
        }
        .map_err(|e| anyhow!("the agent at {} broke off {path}: {e}", self.addr))?;
        Ok(Answer {
            status: response.status(),
            body: response.into_body(),
        })
    }

    /// Non-2xx answers become errors carrying the agent's own message.
    async fn check(&self, path: &str, answer: Answer) -> anyhow::Result<hyper::body::Incoming> {
        if answer.status.is_success() {
            return Ok(answer.body);
        }
        let status = answer.status;
        let body = self.read_body(path, answer.body).await.unwrap_or_default();
        let text = String::from_utf8_lossy(&body);
        if let Ok(err) = serde_json::from_str::<ApiError>(&text) {
            if status == hyper::StatusCode::UNAUTHORIZED {
                bail!(
                    "the agent at {} refused the request ({}): {}",
                    self.addr,
                    status.as_u16(),
                    err.error
                );
            }
            bail!("{}", err.error);
        }
        let quoted: String = text.trim().chars().take(MAX_QUOTED).collect();
        if quoted.is_empty() {
            bail!("the agent at {} answered {status} for {path}", self.addr);
        }
        bail!(
            "the agent at {} answered {status} for {path}: {quoted}",
            self.addr
        )
    }

    async fn read_body(&self, path: &str, body: hyper::body::Incoming) -> anyhow::Result<Bytes> {
        let limited = http_body_util::Limited::new(body, MAX_BODY);
        match limited.collect().await {
            Ok(c) => Ok(c.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => bail!(
                "the answer of the agent at {} to {path} is larger than {MAX_BODY} bytes",
                self.addr
            ),
            Err(e) => bail!("reading {path} from the agent at {}: {e}", self.addr),
        }
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, path: &str, body: &[u8]) -> anyhow::Result<T> {
        serde_json::from_slice(body).with_context(|| {
            format!(
                "the agent at {} sent an answer to {path} that is not the expected JSON (is it a clusterctl agent of the same version?)",
                self.addr
            )
        })
    }

    fn connect_error(&self, e: &std::io::Error) -> anyhow::Error {
        let addr = &self.addr;
        match (&self.endpoint, e.kind()) {
            (Endpoint::Socket(p), std::io::ErrorKind::PermissionDenied) => anyhow!(
                "permission denied on the control socket {}: only the agent's user, root and members of its control-group may use it — you are not an operator of this agent. Run as that user, or ask an operator for a token and use the agent's TCP control address (--agent HOST:PORT --token-file FILE)",
                p.display()
            ),
            (Endpoint::Socket(p), std::io::ErrorKind::NotFound) => anyhow!(
                "cannot reach the agent at {addr}: {} does not exist (is the agent running? try `clusterctl lab status`)",
                p.display()
            ),
            (_, std::io::ErrorKind::ConnectionRefused) => anyhow!(
                "cannot reach the agent at {addr}: connection refused (is it running? try `clusterctl lab status`)"
            ),
            _ => anyhow!("cannot reach the agent at {addr}: {e}"),
        }
    }
}

/// Sends one request on a new HTTP/1.1 connection over `io`.
async fn exchange<S>(
    io: S,
    req: hyper::Request<http_body_util::Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(req).await
}

/// Reads a token file: one line, owned by the reader or root and private to its owner.
pub fn read_token_file(path: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| anyhow!("cannot read the token file {}: {e}", path.display()))?;
    if meta.mode() & 0o077 != 0 {
        bail!(
            "the token file {} has mode {:04o}: a token must be readable by its owner only (fix: chmod 600 {})",
            path.display(),
            meta.mode() & 0o777,
            path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow!("cannot read the token file {}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() || token.len() > 4096 {
        bail!("the token file {} does not hold a token", path.display());
    }
    Ok(token.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// Serves one canned HTTP answer on a loopback port.
    fn serve_once(answer: String) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let _ = s.write_all(answer.as_bytes());
            }
        });
        addr
    }

    fn http(status: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    #[test]
    fn connection_refused_says_what_to_try() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let e = Client::at(&addr)
            .get::<serde_json::Value>("/v1/status")
            .unwrap_err();
        let text = format!("{e:#}");
        assert!(text.contains("connection refused"), "{text}");
        assert!(text.contains(&addr), "{text}");
    }

    #[test]
    fn api_errors_are_passed_through() {
        let addr = serve_once(http("404 Not Found", r#"{"error": "no node named zz"}"#));
        let e = Client::at(&addr)
            .get::<serde_json::Value>("/v1/x")
            .unwrap_err();
        assert_eq!(format!("{e:#}"), "no node named zz");
    }

    #[test]
    fn bad_json_is_reported() {
        let addr = serve_once(http("200 OK", "hello"));
        let e = Client::at(&addr)
            .get::<clusterctl_api::NodeInfo>("/v1/status")
            .unwrap_err();
        assert!(format!("{e:#}").contains("not the expected JSON"), "{e:#}");
    }

    #[test]
    fn non_json_errors_quote_the_status() {
        let addr = serve_once(http("500 Internal Server Error", "boom"));
        let e = Client::at(&addr)
            .get::<serde_json::Value>("/v1/x")
            .unwrap_err();
        let text = format!("{e:#}");
        assert!(text.contains("500") && text.contains("boom"), "{text}");
    }

    #[test]
    fn streams_lines_until_told_to_stop() {
        // No content-length: the body runs until the connection closes, as a stream does.
        let addr = serve_once(
            "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n{\"a\":1}\n\n{\"a\":2}\n{\"a\":3}\n"
                .to_string(),
        );
        let mut seen = Vec::new();
        Client::at(&addr)
            .stream_lines("/v1/events", |l| {
                seen.push(l.to_string());
                seen.len() < 2
            })
            .unwrap();
        assert_eq!(seen, ["{\"a\":1}", "{\"a\":2}"]);
    }

    /// A server that accepts and then says nothing, like a stopped (SIGSTOP) agent.
    #[test]
    fn a_silent_agent_is_reported_within_the_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let hold = std::thread::spawn(move || {
            let c = listener.accept();
            std::thread::sleep(Duration::from_secs(2));
            drop(c);
        });
        let started = std::time::Instant::now();
        let e = Client::with_timeout(&addr, Duration::from_millis(500))
            .get::<serde_json::Value>("/v1/status")
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        let text = format!("{e:#}");
        assert!(
            text.contains("did not answer /v1/status within 500ms"),
            "{text}"
        );
        assert!(!text.contains("global"), "{text}");
        hold.join().unwrap();
    }

    #[test]
    fn a_stream_that_goes_silent_is_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let hold = std::thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n{\"a\":1}\n");
                std::thread::sleep(Duration::from_secs(2));
            }
        });
        let mut seen = 0;
        let e = Client::with_timeout(&addr, Duration::from_millis(500))
            .stream_lines("/v1/events", |_| {
                seen += 1;
                true
            })
            .unwrap_err();
        assert_eq!(seen, 1);
        assert!(format!("{e:#}").contains("not even a keep-alive"), "{e:#}");
        hold.join().unwrap();
    }

    #[test]
    fn agent_flag_takes_an_address_or_a_socket_as_is() {
        let args = AgentArgs {
            agent: Some("127.0.0.1:9999".into()),
            ..Default::default()
        };
        assert_eq!(Client::resolve(&args).unwrap().addr(), "127.0.0.1:9999");
        let args = AgentArgs {
            agent: Some("unix:/run/x.sock".into()),
            ..Default::default()
        };
        assert_eq!(Client::resolve(&args).unwrap().addr(), "unix:/run/x.sock");
        assert_eq!(
            Endpoint::parse("/run/x.sock").unwrap(),
            Endpoint::Socket("/run/x.sock".into())
        );
        assert!(Endpoint::parse("unix:").is_err());
    }

    #[test]
    fn a_socket_without_permission_says_who_may_use_it() {
        let c = Client::at("unix:/nonexistent/dir/control.sock");
        let e = c.connect_error(&std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert!(e.to_string().contains("not an operator"), "{e}");
        let e = c.get::<serde_json::Value>("/v1/status").unwrap_err();
        assert!(format!("{e:#}").contains("does not exist"), "{e:#}");
    }
}
