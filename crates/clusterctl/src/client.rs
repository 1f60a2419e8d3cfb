//! HTTP/JSON client for an agent's control API (plain HTTP, loopback by default).
//!
//! Every read command goes through [`Client`]: it picks the agent ([`Client::resolve`]), turns
//! transport failures and `{"error": ...}` answers into messages an operator can act on, and caps
//! what it reads.

// Every method is called by the read commands (topology, ping, members, events, forget); while
// one of them is still a stub, some methods have no caller.

use anyhow::{anyhow, bail, Context};
use clusterctl_api::ApiError;
use std::io::{BufRead, BufReader, Read};
use std::time::Duration;

/// Time allowed to open the TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Time allowed for a whole request, answer included (streams have none).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer body read.
const MAX_BODY: u64 = 16 << 20;
/// Longest line of a newline-delimited stream.
const MAX_LINE: u64 = 1 << 20;
/// Most bytes of a non-JSON error body quoted in a message.
const MAX_QUOTED: usize = 200;

/// A client of one agent's control API.
#[derive(Debug, Clone)]
pub struct Client {
    addr: String,
    base: String,
    agent: ureq::Agent,
}

impl Client {
    /// Chooses the agent: `--agent`/CLUSTERCTL_AGENT (either HOST:PORT or the name of a lab
    /// node), else the first running node of the default lab.
    pub fn resolve(args: &crate::AgentArgs) -> anyhow::Result<Client> {
        let dir = crate::lab::default_dir();
        match args.agent.as_deref().map(str::trim) {
            Some("") => bail!("--agent is empty: pass HOST:PORT of an agent's control API, or the name of a lab node"),
            Some(value) if value.contains(':') => Ok(Client::at(value)),
            Some(name) => {
                let state = crate::lab::LabState::load(&dir)?;
                let node = state
                    .as_ref()
                    .and_then(|s| s.nodes.iter().find(|n| n.name == name));
                match node {
                    Some(n) => Ok(Client::at(&n.control)),
                    None if state.is_none() => bail!(
                        "--agent {name:?} is neither HOST:PORT nor a node of a lab (no lab in {}): pass the agent's control address, e.g. --agent 127.0.0.1:7401",
                        dir.display()
                    ),
                    None => bail!(
                        "--agent {name:?} is neither HOST:PORT nor a node of the lab in {} (see `clusterctl lab status`)",
                        dir.display()
                    ),
                }
            }
            None => {
                let state = crate::lab::LabState::load(&dir)?;
                match state.as_ref().and_then(|s| s.running_nodes().into_iter().next()) {
                    Some(n) => Ok(Client::at(&n.control)),
                    None => bail!(
                        "no agent to talk to: pass --agent HOST:PORT, set CLUSTERCTL_AGENT, or start a lab with `clusterctl lab up`"
                    ),
                }
            }
        }
    }

    /// The control address this client talks to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The agents a changing command applies to: every node of the default lab with `--all`
    /// (whichever process runs it now), else the one [`Client::resolve`] picks.
    pub fn targets(all: bool, args: &crate::AgentArgs) -> anyhow::Result<Vec<Client>> {
        if !all {
            return Ok(vec![Client::resolve(args)?]);
        }
        let dir = crate::lab::default_dir();
        let state = crate::lab::LabState::load(&dir)?
            .ok_or_else(|| anyhow::anyhow!("--all needs a lab: no lab in {}", dir.display()))?;
        Ok(state.nodes.iter().map(|n| Client::at(&n.control)).collect())
    }

    /// A client of the agent whose control API listens on `addr` (HOST:PORT).
    pub fn at(addr: &str) -> Client {
        Client::with_timeout(addr, DEFAULT_TIMEOUT)
    }

    /// Like [`Client::at`], with `timeout` for each whole request instead of the default 30 s.
    pub fn with_timeout(addr: &str, timeout: Duration) -> Client {
        let config = ureq::Agent::config_builder()
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            // The control API is local: never send it through a proxy from the environment.
            .proxy(None)
            .max_redirects(0)
            .build();
        let addr = addr.trim().to_string();
        Client {
            base: format!("http://{addr}"),
            addr,
            agent: config.into(),
        }
    }

    /// `GET path` and decode the JSON answer.
    pub fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let answer = self.agent.get(self.url(path)).call();
        self.decode(path, answer)
    }

    /// `GET path` and return the answer as text (for `/metrics`).
    pub fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let mut response = self.check(path, self.agent.get(self.url(path)).call())?;
        response
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_string()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => anyhow!(
                    "the answer of the agent at {} to {path} is larger than {MAX_BODY} bytes",
                    self.addr
                ),
                other => self.transport_error(other),
            })
    }

    /// `POST path` with a JSON body and decode the JSON answer.
    pub fn post<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let answer = self.agent.post(self.url(path)).send_json(body);
        self.decode(path, answer)
    }

    /// Streams a newline-delimited JSON answer line by line until `f` returns false or the stream
    /// ends (no overall timeout). Empty lines (keep-alives) are skipped.
    pub fn stream_lines(&self, path: &str, mut f: impl FnMut(&str) -> bool) -> anyhow::Result<()> {
        let answer = self
            .agent
            .get(self.url(path))
            .config()
            .timeout_global(None)
            .build()
            .call();
        let response = self.check(path, answer)?;
        let mut reader = BufReader::new(response.into_body().into_reader());
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = (&mut reader)
                .take(MAX_LINE + 1)
                .read_until(b'\n', &mut line)
                .map_err(|e| anyhow!("reading {path} from the agent at {}: {e}", self.addr))?;
            if n == 0 {
                return Ok(());
            }
            if line.last() != Some(&b'\n') && n as u64 > MAX_LINE {
                bail!(
                    "the agent at {} sent a line longer than {MAX_LINE} bytes on {path}",
                    self.addr
                );
            }
            let text = std::str::from_utf8(&line)
                .map_err(|_| anyhow!("the agent at {} sent invalid UTF-8 on {path}", self.addr))?
                .trim();
            if text.is_empty() {
                continue;
            }
            if !f(text) {
                return Ok(());
            }
        }
    }

    fn url(&self, path: &str) -> String {
        debug_assert!(path.starts_with('/'), "paths start with '/': {path}");
        format!("{}{path}", self.base)
    }

    /// Turns transport errors and non-2xx answers into operator messages.
    fn check(
        &self,
        path: &str,
        answer: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<ureq::http::Response<ureq::Body>> {
        let mut response = answer.map_err(|e| self.transport_error(e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_string()
            .unwrap_or_default();
        if let Ok(err) = serde_json::from_str::<ApiError>(&body) {
            bail!("{}", err.error);
        }
        let quoted: String = body.trim().chars().take(MAX_QUOTED).collect();
        if quoted.is_empty() {
            bail!("the agent at {} answered {status} for {path}", self.addr);
        }
        bail!(
            "the agent at {} answered {status} for {path}: {quoted}",
            self.addr
        )
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        answer: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<T> {
        let mut response = self.check(path, answer)?;
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_BODY)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => anyhow!(
                    "the answer of the agent at {} to {path} is larger than {MAX_BODY} bytes",
                    self.addr
                ),
                other => self.transport_error(other),
            })?;
        serde_json::from_slice(&body).with_context(|| {
            format!(
                "the agent at {} sent an answer to {path} that is not the expected JSON (is it a clusterctl agent of the same version?)",
                self.addr
            )
        })
    }

    fn transport_error(&self, e: ureq::Error) -> anyhow::Error {
        let addr = &self.addr;
        match e {
            ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => anyhow!(
                "cannot reach the agent at {addr}: connection refused (is it running? try `clusterctl lab status`)"
            ),
            ureq::Error::Timeout(what) => {
                anyhow!("the agent at {addr} did not answer in time ({what})")
            }
            ureq::Error::HostNotFound => {
                anyhow!("cannot reach the agent at {addr}: host not found")
            }
            ureq::Error::BadUri(_) | ureq::Error::Http(_) => {
                anyhow!("{addr:?} is not a valid agent address: pass HOST:PORT, e.g. 127.0.0.1:7401")
            }
            other => anyhow!("cannot reach the agent at {addr}: {other}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
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

    #[test]
    fn agent_flag_takes_an_address_as_is() {
        let args = crate::AgentArgs {
            agent: Some("127.0.0.1:9999".into()),
        };
        assert_eq!(Client::resolve(&args).unwrap().addr(), "127.0.0.1:9999");
    }
}
