//! Who may use the control API, and for what.
//!
//! Two doors, both closed to users who are not operators:
//!
//! - **The control socket** (`control-socket`, default `DATA-DIR/control.sock`): a Unix socket
//!   of mode 0600 (0660 with `control-group`). The file's permissions are the gate, as for
//!   `docker.sock`; the kernel's peer credentials (`SO_PEERCRED`) are checked again on every
//!   connection, so a socket whose mode was loosened by hand still admits only the agent's user,
//!   root, and members of `control-group`. Callers through the socket hold the `admin` scope.
//! - **A TCP listener** (`control`), only with tokens (`control-tokens`): every request carries
//!   `Authorization: Bearer TOKEN`; the token's file name gives its scope.
//!
//! Scopes nest: `read` ⊂ `app` ⊂ `admin`. [`required_scope`] is the one table that says which
//! request needs which scope.

use sha2::{Digest, Sha256};
use std::fmt;
use std::path::{Path, PathBuf};
use subtle::ConstantTimeEq;

/// Largest token file read.
const MAX_TOKEN_FILE: u64 = 4096;
/// Fewest characters a token must have (128 bits of hex).
pub const MIN_TOKEN_LEN: usize = 32;
/// Token files looked for in `control-tokens`, one per scope.
pub const TOKEN_FILES: [(Scope, &str); 3] = [
    (Scope::Read, "read.token"),
    (Scope::App, "app.token"),
    (Scope::Admin, "admin.token"),
];

/// What a caller may do. Ordered: a scope allows everything a lower one does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Reports: status, topology, members, events, secrets and certs reports, metrics.
    Read,
    /// What applications need (sending, calls, publishing); nothing yet beyond `read`.
    App,
    /// Everything else: ping, load, forget, secret, reload, sink reset.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::App => "app",
            Scope::Admin => "admin",
        }
    }

    /// Whether a caller holding `self` may make a request that needs `needed`.
    pub fn allows(self, needed: Scope) -> bool {
        self >= needed
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The scope a request needs: reads are `GET`s of reports; anything that changes the node, sends
/// traffic on request, or resets counters is `admin`. Unknown paths need `read` (they answer 404
/// to a caller who may read, and 401 to anyone else).
pub fn required_scope(method: &str, path: &str, query: &str) -> Scope {
    let is_get = method == "GET" || method == "HEAD";
    match path {
        "/v1/status" | "/v1/topology" | "/v1/members" | "/v1/events" | "/v1/secrets"
        | "/v1/certs" | "/metrics"
            if is_get =>
        {
            Scope::Read
        }
        // Reading a sink's counters is a report; zeroing them changes what others will read.
        "/v1/sink" if is_get && !query_flag(query, "reset") => Scope::Read,
        _ if !is_get => Scope::Admin,
        "/v1/sink" => Scope::Admin,
        _ => Scope::Read,
    }
}

/// Whether `name=true` (or a bare `name`) is in a query string.
fn query_flag(query: &str, name: &str) -> bool {
    query.split('&').any(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, "true"));
        k == name && v != "false" && v != "0"
    })
}

/// One token the agent accepts.
#[derive(Clone)]
struct Token {
    scope: Scope,
    /// SHA-256 of the token: what is compared, so the token's length leaks nothing either.
    digest: [u8; 32],
    /// First 8 hex digits of the digest: names the token in events and logs.
    id: String,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({}:{})", self.scope, self.id)
    }
}

/// The tokens of `control-tokens`, at most one per scope.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    tokens: Vec<Token>,
}

/// Why a token directory cannot be used: the file and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenError {
    pub problem: String,
    pub fix: String,
}

impl Tokens {
    /// Reads `DIR/{read,app,admin}.token`. At least one must exist; each must be owned by this
    /// process's user (or root), readable by its owner only, and hold one token of at least
    /// [`MIN_TOKEN_LEN`] printable characters.
    pub fn load(dir: &Path) -> Result<Tokens, TokenError> {
        std::fs::read_dir(dir).map_err(|e| TokenError {
            problem: format!("cannot read {}: {e}", dir.display()),
            fix: "create that directory and write admin.token (mode 0600) into it, e.g. with `clusterctl token init DIR`".into(),
        })?;
        let mut tokens = Vec::new();
        for (scope, file) in TOKEN_FILES {
            let path = dir.join(file);
            match std::fs::metadata(&path) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(TokenError {
                        problem: format!("cannot read {}: {e}", path.display()),
                        fix: format!(
                            "make {} readable by the agent's user (mode 0600)",
                            path.display()
                        ),
                    })
                }
            }
            check_private_file(&path)?;
            let text = read_capped(&path)?;
            let token = text.trim();
            if token.len() < MIN_TOKEN_LEN || !token.chars().all(|c| c.is_ascii_graphic()) {
                return Err(TokenError {
                    problem: format!(
                        "{} does not hold a token of at least {MIN_TOKEN_LEN} printable characters without spaces",
                        path.display()
                    ),
                    fix: format!(
                        "write a random token into it, e.g. `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > {}`",
                        path.display()
                    ),
                });
            }
            tokens.push(Token::new(scope, token));
        }
        if tokens.is_empty() {
            return Err(TokenError {
                problem: format!(
                    "{} holds none of read.token, app.token, admin.token",
                    dir.display()
                ),
                fix: "write at least admin.token (mode 0600) into that directory".into(),
            });
        }
        Ok(Tokens { tokens })
    }

    /// Tokens given in memory (tests, the lab).
    pub fn from_values(values: &[(Scope, &str)]) -> Tokens {
        Tokens {
            tokens: values.iter().map(|(s, v)| Token::new(*s, v)).collect(),
        }
    }

    /// The scope and id of `presented`, compared in constant time against every token.
    pub fn check(&self, presented: &str) -> Option<(Scope, String)> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for t in &self.tokens {
            if bool::from(t.digest.ct_eq(&digest)) {
                found = Some((t.scope, t.id.clone()));
            }
        }
        found
    }

    /// The scopes a token exists for.
    pub fn scopes(&self) -> Vec<Scope> {
        self.tokens.iter().map(|t| t.scope).collect()
    }
}

impl Token {
    fn new(scope: Scope, value: &str) -> Token {
        let digest: [u8; 32] = Sha256::digest(value.as_bytes()).into();
        let id = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        Token { scope, digest, id }
    }
}

/// A new random token: 32 bytes as 64 hex digits.
pub fn generate_token() -> std::io::Result<String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| std::io::Error::other("the system's random source failed"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A token file follows the rule of every file holding a secret ([`crate::files::check_private`]).
fn check_private_file(path: &Path) -> Result<(), TokenError> {
    crate::files::check_private(path, "control-tokens").map_err(|e| TokenError {
        problem: e.problem,
        fix: e.fix,
    })
}

fn read_capped(path: &Path) -> Result<String, TokenError> {
    use std::io::Read;
    let fail = |e: String| TokenError {
        problem: format!("cannot read {}: {e}", path.display()),
        fix: format!(
            "make {} a small text file holding one token",
            path.display()
        ),
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(|e| fail(e.to_string()))?
        .take(MAX_TOKEN_FILE)
        .read_to_string(&mut text)
        .map_err(|e| fail(e.to_string()))?;
    Ok(text)
}

/// Writes a new token file `path` (0600) unless one exists; returns the token in it.
pub fn ensure_token_file(path: &Path) -> std::io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Ok(text) = std::fs::read_to_string(path) {
        return Ok(text.trim().to_string());
    }
    let token = generate_token()?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(token.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    Ok(token)
}

/// Who made a control request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A process on the control socket, by its kernel credentials.
    Socket { uid: u32, pid: Option<i32> },
    /// A TCP client with a token.
    Token {
        scope: Scope,
        id: String,
        from: std::net::SocketAddr,
    },
}

impl Caller {
    /// What the caller may do.
    pub fn scope(&self) -> Scope {
        match self {
            Caller::Socket { .. } => Scope::Admin,
            Caller::Token { scope, .. } => *scope,
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Socket { uid, pid: Some(p) } => {
                write!(f, "uid {uid} (pid {p}) on the control socket")
            }
            Caller::Socket { uid, pid: None } => write!(f, "uid {uid} on the control socket"),
            Caller::Token { scope, id, from } => write!(f, "{scope} token {id} from {from}"),
        }
    }
}

/// Who may connect to the control socket besides root and the agent's user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketAccess {
    /// The agent's effective uid.
    pub owner: u32,
    /// `control-group`: its gid, whose members may connect (socket mode 0660).
    pub group: Option<u32>,
}

impl SocketAccess {
    /// Whether a peer with these credentials is an operator of this agent.
    pub fn admits(&self, uid: u32, gid: u32, groups_of_uid: impl FnOnce(u32) -> Vec<u32>) -> bool {
        if uid == 0 || uid == self.owner {
            return true;
        }
        match self.group {
            Some(g) => gid == g || groups_of_uid(uid).contains(&g),
            None => false,
        }
    }
}

/// The gid of group `name` (or a number), from /etc/group.
pub fn resolve_group(name: &str) -> Option<u32> {
    if let Ok(gid) = name.parse::<u32>() {
        return Some(gid);
    }
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|line| {
        let mut f = line.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

/// The supplementary groups of user `uid` per /etc/passwd and /etc/group (its primary group and
/// every group that lists its name).
pub fn groups_of(uid: u32) -> Vec<u32> {
    let Ok(passwd) = std::fs::read_to_string("/etc/passwd") else {
        return Vec::new();
    };
    let Some((user, primary)) = passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[2].parse() == Ok(uid)).then(|| (f[0].to_string(), f[3].parse().ok()))
    }) else {
        return Vec::new();
    };
    let mut out: Vec<u32> = primary.into_iter().collect();
    if let Ok(group) = std::fs::read_to_string("/etc/group") {
        for l in group.lines() {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() > 3 && f[3].split(',').any(|m| m == user) {
                if let Ok(g) = f[2].parse() {
                    out.push(g);
                }
            }
        }
    }
    out
}

/// Whether the `Host` header of a TCP request names this listener: its own address, or
/// `localhost` / a loopback address at its port on a loopback listener. Anything else is
/// refused, so a web page cannot reach the API through DNS rebinding.
pub fn host_allowed(host: Option<&str>, listener: std::net::SocketAddr) -> bool {
    let Some(host) = host else {
        return false;
    };
    let host = host.trim().to_ascii_lowercase();
    let (name, port) = match host.rsplit_once(':') {
        Some((n, p)) if !n.ends_with(']') || n.starts_with('[') => match p.parse::<u16>() {
            Ok(p) => (n.to_string(), Some(p)),
            Err(_) => (host.clone(), None),
        },
        _ => (host.clone(), None),
    };
    let port_ok = port.unwrap_or(80) == listener.port();
    if !port_ok {
        return false;
    }
    let name = name.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        return ip == listener.ip()
            || (ip.is_loopback() && listener.ip().is_loopback())
            || (listener.ip().is_unspecified() && !ip.is_unspecified());
    }
    name == "localhost" && listener.ip().is_loopback()
}

/// Default path of the control socket.
pub fn default_socket(data_dir: &Path) -> PathBuf {
    data_dir.join("control.sock")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn scopes_nest() {
        assert!(Scope::Admin.allows(Scope::Read));
        assert!(Scope::Admin.allows(Scope::App));
        assert!(Scope::App.allows(Scope::Read));
        assert!(!Scope::Read.allows(Scope::App));
        assert!(!Scope::App.allows(Scope::Admin));
    }

    #[test]
    fn reads_need_read_and_every_change_needs_admin() {
        for p in [
            "/v1/status",
            "/v1/topology",
            "/v1/members",
            "/v1/events",
            "/v1/secrets",
            "/v1/certs",
            "/metrics",
            "/v1/sink",
        ] {
            assert_eq!(required_scope("GET", p, ""), Scope::Read, "{p}");
        }
        for p in [
            "/v1/ping",
            "/v1/forget",
            "/v1/secret",
            "/v1/reload",
            "/v1/load",
            "/v1/status",
        ] {
            assert_eq!(required_scope("POST", p, ""), Scope::Admin, "{p}");
        }
        assert_eq!(
            required_scope("GET", "/v1/sink", "node=a&reset=true"),
            Scope::Admin
        );
        assert_eq!(
            required_scope("GET", "/v1/sink", "reset=false"),
            Scope::Read
        );
        assert_eq!(required_scope("DELETE", "/v1/topology", ""), Scope::Admin);
    }

    #[test]
    fn tokens_are_found_by_value_only() {
        let t = Tokens::from_values(&[
            (Scope::Read, "r".repeat(40).as_str()),
            (Scope::Admin, "a".repeat(40).as_str()),
        ]);
        assert_eq!(t.check(&"r".repeat(40)).map(|x| x.0), Some(Scope::Read));
        assert_eq!(t.check(&"a".repeat(40)).map(|x| x.0), Some(Scope::Admin));
        assert_eq!(t.check(&"a".repeat(39)), None);
        assert_eq!(t.check(""), None);
        let (_, id) = t.check(&"a".repeat(40)).unwrap();
        assert_eq!(id.len(), 8);
        assert!(!"a".repeat(40).contains(&id), "the id is not the token");
    }

    #[test]
    fn token_files_must_be_private_and_long() {
        let dir = tempfile::tempdir().unwrap();
        let e = Tokens::load(dir.path()).unwrap_err();
        assert!(e.problem.contains("holds none of"), "{e:?}");

        let admin = dir.path().join("admin.token");
        ensure_token_file(&admin).unwrap();
        let t = Tokens::load(dir.path()).unwrap();
        assert_eq!(t.scopes(), vec![Scope::Admin]);
        let value = std::fs::read_to_string(&admin).unwrap();
        assert!(t.check(value.trim()).is_some());

        std::fs::set_permissions(&admin, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Tokens::load(dir.path()).unwrap_err();
        assert!(e.fix.starts_with("chmod 600"), "{e:?}");

        std::fs::set_permissions(&admin, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&admin, "short\n").unwrap();
        let e = Tokens::load(dir.path()).unwrap_err();
        assert!(e.problem.contains("at least 32"), "{e:?}");
    }

    #[test]
    fn token_file_of_another_user_is_refused() {
        if crate::files::current_uid() != 0 {
            return; // only root can give a file away; CI runs as root
        }
        let dir = tempfile::tempdir().unwrap();
        let admin = dir.path().join("admin.token");
        ensure_token_file(&admin).unwrap();
        std::os::unix::fs::chown(&admin, Some(65534), None).unwrap();
        let e = Tokens::load(dir.path()).unwrap_err();
        assert!(e.problem.contains("(uid 65534)"), "{e:?}");
        assert!(e.fix.starts_with("chown root"), "{e:?}");
    }

    #[test]
    fn socket_admits_owner_root_and_group_only() {
        let a = SocketAccess {
            owner: 1000,
            group: None,
        };
        assert!(a.admits(0, 0, |_| vec![]));
        assert!(a.admits(1000, 1000, |_| vec![]));
        assert!(!a.admits(65534, 65534, |_| vec![]));
        let g = SocketAccess {
            owner: 1000,
            group: Some(50),
        };
        assert!(g.admits(2000, 50, |_| vec![]));
        assert!(g.admits(2000, 2000, |_| vec![7, 50]));
        assert!(!g.admits(2000, 2000, |_| vec![7]));
    }

    #[test]
    fn host_header_must_name_the_listener() {
        let lo: std::net::SocketAddr = "127.0.0.1:7401".parse().unwrap();
        assert!(host_allowed(Some("127.0.0.1:7401"), lo));
        assert!(host_allowed(Some("localhost:7401"), lo));
        assert!(host_allowed(Some("127.0.0.2:7401"), lo));
        assert!(!host_allowed(Some("evil.example:7401"), lo));
        assert!(!host_allowed(Some("127.0.0.1:80"), lo));
        assert!(!host_allowed(Some("127.0.0.1"), lo));
        assert!(!host_allowed(None, lo));
        let wan: std::net::SocketAddr = "10.0.0.5:7401".parse().unwrap();
        assert!(host_allowed(Some("10.0.0.5:7401"), wan));
        assert!(!host_allowed(Some("localhost:7401"), wan));
        let v6: std::net::SocketAddr = "[::1]:7401".parse().unwrap();
        assert!(host_allowed(Some("[::1]:7401"), v6));
    }
}
