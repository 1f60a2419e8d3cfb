//! The agent's configuration: one TOML file, read and checked once at start.
//!
//! [`AgentConfig::load`] reads the file, [`AgentConfig::parse`] checks it: every key is typed,
//! unknown keys are refused, and everything the agent needs before it opens a socket is verified
//! here (names, addresses, seeds, the topology contract, the certificate files, the data
//! directory). Each problem is a [`ConfigError`] that names the key and says how to fix it.
//! Binding the ports is left to the runtime: only a bind proves a port is free.
//!
//! The keys, their defaults and every error are documented in `docs/config.md`; a commented
//! example is `config.example.toml` at the repository root.

use clusterctl_api::Role;
use clusterctl_core::contract::{Contract, ContractRefusal};
use clusterctl_core::name::{ClusterName, Ident, NodeName, SiteName};
use clusterctl_core::secret::Secret;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::BTreeSet;
use std::fmt;
use std::io::Read;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Example TCP control address in messages (there is no TCP listener unless `control` is set).
pub const DEFAULT_CONTROL: &str = "127.0.0.1:7401";
/// Longest path a Unix socket address can hold (sun_path, with its terminating NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Largest config file read.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Largest contract file read.
pub const MAX_CONTRACT_BYTES: u64 = 16 << 20;
/// Largest PEM file (CA bundle, certificate, key) read.
pub const MAX_PEM_BYTES: u64 = 1 << 20;
/// Most entries in `seeds`.
pub const MAX_SEEDS: usize = 256;

/// Top-level keys, in the order they are documented.
const KEYS: &[&str] = &[
    "cluster",
    "name",
    "site",
    "role",
    "listen",
    "advertise",
    "advertise-wan",
    "seeds",
    "data-dir",
    "control",
    "control-socket",
    "control-group",
    "control-tokens",
    "contract",
    "insecure",
    "secret",
    "tls",
];
/// Keys of the `[tls]` table.
const TLS_KEYS: &[&str] = &["ca", "cert", "key", "warn-fraction"];
/// Default of `tls.warn-fraction`: warn when a certificate has a third of its lifetime left.
pub const DEFAULT_WARN_FRACTION: f64 = 1.0 / 3.0;

/// A checked agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The file the configuration was read from (empty when it came from [`AgentConfig::parse`]).
    pub path: PathBuf,
    pub cluster: ClusterName,
    /// This node: keys `name`, `site` and `role`.
    pub ident: Ident,
    /// UDP address the QUIC endpoint binds.
    pub listen: SocketAddr,
    /// Address peers dial; `listen` unless set. Never a wildcard.
    pub advertise: SocketAddr,
    /// Gateways on two networks: the address gateways of other sites dial (`advertise-wan`);
    /// `advertise` is then the one its own site dials.
    pub advertise_wan: Option<SocketAddr>,
    /// Nodes to introduce ourselves to, hostnames already resolved.
    pub seeds: Vec<Seed>,
    /// Directory of the persisted node table (created if missing).
    pub data_dir: PathBuf,
    /// The control API's Unix socket (`control-socket`, default `DATA-DIR/control.sock`).
    pub control_socket: PathBuf,
    /// `control-group`: the group whose members may use the control socket (mode 0660), with
    /// its name as written.
    pub control_group: Option<(String, u32)>,
    /// TCP address of the control API (`control`), served only with `control_tokens`.
    pub control: Option<SocketAddr>,
    /// `control-tokens`: the directory the tokens were read from, and the tokens.
    pub control_tokens: Option<(PathBuf, crate::auth::Tokens)>,
    pub contract_path: PathBuf,
    pub contract: Contract,
    /// Certificate files; `None` exactly when `insecure` is true.
    pub tls: Option<TlsFiles>,
    /// Links without authentication or encryption, for labs only.
    pub insecure: bool,
    /// The cluster secret file (`secret`).
    pub secret_path: PathBuf,
    /// The cluster secret it holds: the first key of a new node's keyring.
    pub secret: Secret,
    /// `tls.warn-fraction`: reports warn when a certificate has less than this fraction of its
    /// lifetime left (default a third).
    pub cert_warn_fraction: f64,
}

/// The `[tls]` table: where the CA bundle, the node certificate and its key are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One entry of `seeds`, written `NAME@HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    pub name: NodeName,
    pub addr: SocketAddr,
}

impl fmt::Display for Seed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.addr)
    }
}

/// A configuration that cannot be used: the key at fault, what is wrong, how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The key, dotted for tables (`tls.key`), indexed for arrays (`seeds[1]`), or `config` for
    /// the file as a whole.
    pub key: String,
    pub problem: String,
    pub fix: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, problem: impl Into<String>, fix: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "config error in `{}`: {} — fix: {}",
            self.key, self.problem, self.fix
        )
    }
}

impl std::error::Error for ConfigError {}

impl AgentConfig {
    /// Reads and checks the config file at `path`. Relative paths inside it are relative to the
    /// file's directory.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let text = read_capped(&path, MAX_CONFIG_BYTES).map_err(|problem| {
            ConfigError::new(
                "config",
                problem,
                "pass the path of an existing, readable config file (see config.example.toml)",
            )
        })?;
        let text = String::from_utf8(text).map_err(|_| {
            ConfigError::new(
                "config",
                format!("{} is not UTF-8 text", path.display()),
                "save the config file as UTF-8",
            )
        })?;
        let base_dir = path.parent().unwrap_or(Path::new("/"));
        let mut config = AgentConfig::parse(&text, base_dir)?;
        config.path = path;
        Ok(config)
    }

    /// Checks config TOML. Relative paths are taken relative to `base_dir`.
    pub fn parse(text: &str, base_dir: &Path) -> Result<AgentConfig, ConfigError> {
        RawConfig::from_toml(text)?.validate(base_dir)
    }
}

/// The file as written: every key optional and untyped beyond TOML, so that [`RawConfig::validate`]
/// can say precisely what is missing or wrong.
#[derive(Debug, Default)]
struct RawConfig {
    cluster: Option<String>,
    name: Option<String>,
    site: Option<String>,
    role: Option<String>,
    listen: Option<String>,
    advertise: Option<String>,
    advertise_wan: Option<String>,
    seeds: Option<Vec<String>>,
    data_dir: Option<String>,
    control: Option<String>,
    control_socket: Option<String>,
    control_group: Option<String>,
    control_tokens: Option<String>,
    contract: Option<String>,
    insecure: Option<bool>,
    secret: Option<String>,
    tls: Option<RawTls>,
}

#[derive(Debug, Default)]
struct RawTls {
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    warn_fraction: Option<f64>,
}

impl RawConfig {
    fn from_toml(text: &str) -> Result<RawConfig, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|s| {
                    let (line, col) = line_col(text, s.start);
                    format!(" at line {line}, column {col}")
                })
                .unwrap_or_default();
            ConfigError::new(
                "config",
                format!("not valid TOML{at}: {}", e.message().trim()),
                "correct the TOML syntax; strings need double quotes, e.g. name = \"edge-us-1\"",
            )
        })?;
        // Unknown keys first: a misspelt key would otherwise surface as "missing".
        for key in table.keys() {
            if !KEYS.contains(&key.as_str()) {
                return Err(unknown_key(key, key, KEYS));
            }
        }
        let tls = match table.remove("tls") {
            None => None,
            Some(toml::Value::Table(mut t)) => {
                for key in t.keys() {
                    if !TLS_KEYS.contains(&key.as_str()) {
                        return Err(unknown_key(key, &format!("tls.{key}"), TLS_KEYS));
                    }
                }
                let warn_fraction = match t.remove("warn-fraction") {
                    None => None,
                    Some(toml::Value::Float(f)) if f > 0.0 && f < 1.0 => Some(f),
                    Some(other) => {
                        return Err(ConfigError::new(
                            "tls.warn-fraction",
                            format!("must be a number between 0 and 1, found {}", describe(&other)),
                            "write e.g. warn-fraction = 0.33 (warn when a third of a certificate's lifetime is left)",
                        ))
                    }
                };
                Some(RawTls {
                    warn_fraction,
                    ca: take_str(&mut t, "tls.ca", "ca", "\"/etc/clusterctl/ca.pem\"")?,
                    cert: take_str(&mut t, "tls.cert", "cert", "\"/etc/clusterctl/node.pem\"")?,
                    key: take_str(&mut t, "tls.key", "key", "\"/etc/clusterctl/node.key\"")?,
                })
            }
            Some(other) => {
                return Err(ConfigError::new(
                    "tls",
                    format!("must be a table, found {}", describe(&other)),
                    "write a [tls] table with ca, cert and key (see config.example.toml)",
                ))
            }
        };
        let t = &mut table;
        let seeds = match t.remove("seeds") {
            None => None,
            Some(toml::Value::Array(items)) => {
                if items.len() > MAX_SEEDS {
                    return Err(ConfigError::new(
                        "seeds",
                        format!("lists {} seeds; the limit is {MAX_SEEDS}", items.len()),
                        "list a few nodes of this node's own site (and, on gateways, the gateways of linked sites)",
                    ));
                }
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.into_iter().enumerate() {
                    match item {
                        toml::Value::String(s) => out.push(s),
                        other => {
                            return Err(ConfigError::new(
                                format!("seeds[{i}]"),
                                format!("must be a string, found {}", describe(&other)),
                                "write each seed as a string \"NAME@HOST:PORT\", e.g. \"gw-us-1@10.0.1.1:7400\"",
                            ))
                        }
                    }
                }
                Some(out)
            }
            Some(other) => {
                return Err(ConfigError::new(
                    "seeds",
                    format!("must be an array of strings, found {}", describe(&other)),
                    "write seeds = [\"gw-us-1@10.0.1.1:7400\", \"edge-us-2@10.0.1.12:7400\"]",
                ))
            }
        };
        let insecure = match t.remove("insecure") {
            None => None,
            Some(toml::Value::Boolean(b)) => Some(b),
            Some(other) => {
                return Err(ConfigError::new(
                    "insecure",
                    format!("must be true or false, found {}", describe(&other)),
                    "write insecure = true (labs only) or leave the key out",
                ))
            }
        };
        Ok(RawConfig {
            cluster: take_str(t, "cluster", "cluster", "\"prod\"")?,
            name: take_str(t, "name", "name", "\"edge-us-1\"")?,
            site: take_str(t, "site", "site", "\"us-east\"")?,
            role: take_str(t, "role", "role", "\"member\"")?,
            listen: take_str(t, "listen", "listen", "\"0.0.0.0:7400\"")?,
            advertise: take_str(t, "advertise", "advertise", "\"10.0.1.11:7400\"")?,
            advertise_wan: take_str(t, "advertise-wan", "advertise-wan", "\"198.51.100.7:7400\"")?,
            seeds,
            data_dir: take_str(t, "data-dir", "data-dir", "\"/var/lib/clusterctl\"")?,
            control: take_str(t, "control", "control", "\"127.0.0.1:7401\"")?,
            control_socket: take_str(
                t,
                "control-socket",
                "control-socket",
                "\"/var/lib/clusterctl/control.sock\"",
            )?,
            control_group: take_str(t, "control-group", "control-group", "\"clusterops\"")?,
            control_tokens: take_str(
                t,
                "control-tokens",
                "control-tokens",
                "\"/etc/clusterctl/tokens\"",
            )?,
            contract: take_str(
                t,
                "contract",
                "contract",
                "\"/etc/clusterctl/contract.toml\"",
            )?,
            insecure,
            secret: take_str(t, "secret", "secret", "\"/etc/clusterctl/cluster.secret\"")?,
            tls,
        })
    }

    /// Turns the raw file into a checked configuration; the one place every rule lives.
    fn validate(self, base_dir: &Path) -> Result<AgentConfig, ConfigError> {
        let cluster = required(
            self.cluster,
            "cluster",
            "cluster = \"prod\" (the same name as in the contract)",
        )?;
        let cluster = ClusterName::new(cluster.clone())
            .map_err(|e| bad_name("cluster", &cluster, e, "prod"))?;
        let name = required(
            self.name,
            "name",
            "name = \"edge-us-1\" (this node's name, unique in the cluster)",
        )?;
        let name =
            NodeName::new(name.clone()).map_err(|e| bad_name("name", &name, e, "edge-us-1"))?;
        let site = required(
            self.site,
            "site",
            "site = \"us-east\" (a site of the contract)",
        )?;
        let site =
            SiteName::new(site.clone()).map_err(|e| bad_name("site", &site, e, "us-east"))?;
        let role = required(
            self.role,
            "role",
            "role = \"member\" (or \"gateway\" for a contract gateway)",
        )?;
        let role = Role::parse(&role).ok_or_else(|| {
            ConfigError::new(
                "role",
                format!("{role:?} is not a role"),
                "write role = \"member\" or role = \"gateway\"",
            )
        })?;
        let ident = Ident { name, site, role };

        let listen_text = required(
            self.listen,
            "listen",
            "listen = \"0.0.0.0:7400\" (UDP address of the QUIC endpoint)",
        )?;
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            ConfigError::new(
                "listen",
                format!("{listen_text:?} is not an IP:PORT address"),
                "write an IP address and UDP port, e.g. listen = \"0.0.0.0:7400\" (IPv6: \"[::]:7400\")",
            )
        })?;
        let advertise = match self.advertise {
            Some(text) => {
                let addr: SocketAddr = text.parse().map_err(|_| {
                    ConfigError::new(
                        "advertise",
                        format!("{text:?} is not an IP:PORT address"),
                        "write the IP address and port peers dial, e.g. advertise = \"10.0.1.11:7400\"",
                    )
                })?;
                if addr.ip().is_unspecified() {
                    return Err(ConfigError::new(
                        "advertise",
                        format!("{addr} is a wildcard address, which peers cannot dial"),
                        "advertise the address other nodes reach this one on, e.g. advertise = \"10.0.1.11:7400\"",
                    ));
                }
                if addr.port() == 0 {
                    return Err(ConfigError::new(
                        "advertise",
                        format!("{addr} has port 0, which peers cannot dial"),
                        format!(
                            "advertise the port this node listens on, e.g. advertise = \"{}\"",
                            SocketAddr::new(addr.ip(), 7400)
                        ),
                    ));
                }
                addr
            }
            None if listen.ip().is_unspecified() => {
                return Err(ConfigError::new(
                    "advertise",
                    format!("is not set and listen is the wildcard address {listen}, which peers cannot dial"),
                    format!("add advertise = \"IP:{}\" with the address other nodes reach this one on", listen.port()),
                ));
            }
            None if listen.port() == 0 => {
                return Err(ConfigError::new(
                    "listen",
                    format!(
                        "{listen} has port 0: the port would be random and peers could not dial it"
                    ),
                    format!(
                        "choose a fixed port, e.g. listen = \"{}\"",
                        SocketAddr::new(listen.ip(), 7400)
                    ),
                ));
            }
            None => listen,
        };

        let control = match self.control {
            None => None,
            Some(text) => Some(text.parse::<SocketAddr>().map_err(|_| {
                ConfigError::new(
                    "control",
                    format!("{text:?} is not an IP:PORT address"),
                    format!("write an IP address and TCP port, e.g. control = \"{DEFAULT_CONTROL}\", or remove `control` to use only the control socket"),
                )
            })?),
        };
        let control_tokens = match self.control_tokens {
            None => None,
            Some(text) => {
                let dir = resolve_path(base_dir, &text, "control-tokens")?;
                let tokens = crate::auth::Tokens::load(&dir)
                    .map_err(|e| ConfigError::new("control-tokens", e.problem, e.fix))?;
                Some((dir, tokens))
            }
        };
        if let (Some(addr), None) = (control, &control_tokens) {
            let problem = if addr.ip().is_loopback() {
                format!("control = \"{addr}\" opens a TCP control listener without tokens: any local user could change the cluster")
            } else {
                format!("control = \"{addr}\" opens a TCP control listener on a non-loopback address without tokens: anyone who reaches {addr} could change the cluster")
            };
            return Err(ConfigError::new(
                "control",
                problem,
                "set control-tokens = \"DIR\" (a directory holding admin.token, and optionally read.token and app.token, each mode 0600), or remove `control`: the control socket (control-socket, default DATA-DIR/control.sock) needs no token",
            ));
        }
        let control_group = match self.control_group {
            None => None,
            Some(name) => match crate::auth::resolve_group(&name) {
                Some(gid) => Some((name, gid)),
                None => {
                    return Err(ConfigError::new(
                        "control-group",
                        format!("there is no group named {name:?} (see /etc/group)"),
                        "create the group (`groupadd NAME`), write its numeric gid, or remove control-group",
                    ))
                }
            },
        };

        let advertise_wan = match self.advertise_wan {
            None => None,
            Some(_) if ident.role != Role::Gateway => {
                return Err(ConfigError::new(
                    "advertise-wan",
                    "is set on a member; only gateways link to other sites",
                    "remove advertise-wan, or make this node a gateway (role = \"gateway\", listed in the contract)",
                ))
            }
            Some(text) => {
                let addr: SocketAddr = text.parse().map_err(|_| {
                    ConfigError::new(
                        "advertise-wan",
                        format!("{text:?} is not an IP:PORT address"),
                        "write the address gateways of other sites dial, e.g. advertise-wan = \"198.51.100.7:7400\"",
                    )
                })?;
                if addr.ip().is_unspecified() || addr.port() == 0 {
                    return Err(ConfigError::new(
                        "advertise-wan",
                        format!("{addr} cannot be dialed (wildcard address or port 0)"),
                        "write the address and port gateways of other sites dial, e.g. advertise-wan = \"198.51.100.7:7400\"",
                    ));
                }
                Some(addr)
            }
        };

        let seeds = parse_seeds(self.seeds.unwrap_or_default(), &ident, listen)?;

        let insecure = self.insecure.unwrap_or(false);
        let tls = match (insecure, self.tls) {
            (true, Some(_)) => {
                return Err(ConfigError::new(
                    "insecure",
                    "insecure = true and a [tls] table are both set",
                    "choose one: remove `insecure` to authenticate every link with [tls], or remove [tls] for a lab without authentication",
                ))
            }
            (false, None) => {
                return Err(ConfigError::new(
                    "tls",
                    "no [tls] table, and insecure is not set",
                    "add [tls] with ca, cert, key — or write `insecure = true` for a lab without authentication",
                ))
            }
            (true, None) => None,
            (false, Some(raw)) => Some(raw),
        };

        // Files: the contract first, since the other checks are about this node's place in it.
        let contract_text = required(self.contract, "contract", "contract = \"/etc/clusterctl/contract.toml\" (the topology contract, the same file on every node)")?;
        let contract_path = resolve_path(base_dir, &contract_text, "contract")?;
        let contract = load_contract(&contract_path)?;
        check_contract(&contract, &contract_path, &cluster, &ident)?;
        check_seed_sites(&contract, &ident, &seeds)?;

        let cert_warn_fraction = tls
            .as_ref()
            .and_then(|t| t.warn_fraction)
            .unwrap_or(DEFAULT_WARN_FRACTION);
        let tls = match tls {
            None => None,
            Some(raw) => Some(check_tls(raw, base_dir, &cluster, &ident)?),
        };

        let secret_text = required(
            self.secret,
            "secret",
            "secret = \"/etc/clusterctl/cluster.secret\" (the cluster secret, mode 0600; make one with `clusterctl secret generate FILE`)",
        )?;
        let secret_path = resolve_path(base_dir, &secret_text, "secret")?;
        let secret = load_secret(&secret_path, "secret")?;

        let data_dir_text = required(
            self.data_dir,
            "data-dir",
            "data-dir = \"/var/lib/clusterctl\" (where the node table is persisted)",
        )?;
        let data_dir = resolve_path(base_dir, &data_dir_text, "data-dir")?;
        check_data_dir(&data_dir)?;
        let control_socket = match self.control_socket {
            None => crate::auth::default_socket(&data_dir),
            Some(text) => resolve_path(base_dir, &text, "control-socket")?,
        };
        if control_socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(ConfigError::new(
                "control-socket",
                format!(
                    "{} is {} bytes long; a Unix socket path holds at most {MAX_SOCKET_PATH}",
                    control_socket.display(),
                    control_socket.as_os_str().len()
                ),
                "set control-socket to a shorter path, e.g. control-socket = \"/run/clusterctl/control.sock\"",
            ));
        }

        Ok(AgentConfig {
            path: PathBuf::new(),
            cluster,
            ident,
            listen,
            advertise,
            advertise_wan,
            seeds,
            data_dir,
            control_socket,
            control_group,
            control,
            control_tokens,
            contract_path,
            contract,
            tls,
            insecure,
            secret_path,
            secret,
            cert_warn_fraction,
        })
    }
}

/// Reads a cluster secret file: it must be owned by the agent's user (or root), readable by its
/// owner only (mode 0600 or 0400) and hold a hex secret. Used for the config's `secret`, for
/// `--secret` and for `clusterctl secret install`.
pub fn load_secret(path: &Path, key: &str) -> Result<Secret, ConfigError> {
    std::fs::metadata(path).map_err(|e| {
        ConfigError::new(
            key,
            format!("cannot read {}: {e}", path.display()),
            "point it at the cluster secret file, or create one with `clusterctl secret generate FILE`",
        )
    })?;
    crate::files::check_private(path, key)?;
    let text = read_capped(path, 4096)
        .map_err(|problem| ConfigError::new(key, problem, "point it at the cluster secret file"))?;
    let text = String::from_utf8(text).map_err(|_| {
        ConfigError::new(
            key,
            format!("{} is not text", path.display()),
            "a secret file holds hex, e.g. from `clusterctl secret generate FILE`",
        )
    })?;
    Secret::from_text(&text).map_err(|e| {
        ConfigError::new(
            key,
            format!("{} does not hold a usable secret", path.display()),
            e.to_string(),
        )
    })
}

fn required(value: Option<String>, key: &str, example: &str) -> Result<String, ConfigError> {
    value.ok_or_else(|| ConfigError::new(key, "is missing", format!("add {example}")))
}

fn bad_name(
    key: &str,
    value: &str,
    e: clusterctl_core::name::NameError,
    example: &str,
) -> ConfigError {
    ConfigError::new(
        key,
        format!("{value:?} {e}"),
        format!("use a DNS label (1-63 of a-z, 0-9 and '-', not starting or ending with '-'), e.g. {key} = \"{example}\""),
    )
}

/// Removes `key` from `t` and requires it to be a string.
fn take_str(
    t: &mut toml::Table,
    full_key: &str,
    key: &str,
    example: &str,
) -> Result<Option<String>, ConfigError> {
    match t.remove(key) {
        None => Ok(None),
        Some(toml::Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ConfigError::new(
            full_key,
            format!("must be a string, found {}", describe(&other)),
            format!("write it in double quotes, e.g. {key} = {example}"),
        )),
    }
}

fn describe(v: &toml::Value) -> String {
    match v {
        toml::Value::Table(_) => "a table".to_string(),
        toml::Value::Array(_) => "an array".to_string(),
        other => format!("{} {other}", other.type_str()),
    }
}

fn unknown_key(key: &str, full_key: &str, known: &[&str]) -> ConfigError {
    let dashed = key.replace('_', "-");
    let fix = if dashed != key && known.contains(&dashed.as_str()) {
        format!("write `{dashed}`: keys are kebab-case")
    } else if known == KEYS && TLS_KEYS.contains(&key) {
        format!("move `{key}` into the [tls] table")
    } else if let Some(close) = known.iter().find(|k| edit_distance(k, key) <= 2) {
        format!("did you mean `{close}`? Known keys: {}", known.join(", "))
    } else {
        format!("remove it; known keys: {}", known.join(", "))
    };
    ConfigError::new(full_key, "is not a known key", fix)
}

/// Levenshtein distance, for "did you mean" on short keys.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let col = before.iter().rev().take_while(|b| **b != b'\n').count() + 1;
    (line, col)
}

/// Reads at most `limit` bytes of `path`; the error text names the path and the cause.
fn read_capped(path: &Path, limit: u64) -> Result<Vec<u8>, String> {
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut buf = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if buf.len() as u64 > limit {
        return Err(format!(
            "{} is larger than the limit of {limit} bytes",
            path.display()
        ));
    }
    Ok(buf)
}

fn resolve_path(base_dir: &Path, text: &str, key: &str) -> Result<PathBuf, ConfigError> {
    if text.is_empty() {
        return Err(ConfigError::new(
            key,
            "is an empty path",
            format!("write a path; relative paths are relative to the config file's directory, e.g. {key} = \"/etc/clusterctl/...\""),
        ));
    }
    Ok(base_dir.join(text))
}

/// Splits `NAME@HOST:PORT` and resolves HOST, preferring an address of `family`'s IP version.
fn parse_seed(text: &str, family: SocketAddr) -> Result<Seed, (String, String)> {
    const FORM: &str = "write each seed as \"NAME@HOST:PORT\", e.g. \"gw-us-1@10.0.1.1:7400\"";
    let Some((name, hostport)) = text.split_once('@') else {
        return Err((format!("{text:?} has no node name"), FORM.to_string()));
    };
    let name = NodeName::new(name).map_err(|e| {
        (
            format!("node name {name:?} {e}"),
            "use the seed node's name as in its config, e.g. \"gw-us-1@10.0.1.1:7400\"".to_string(),
        )
    })?;
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let Some((host, port)) = rest.split_once("]:") else {
            return Err((
                format!("{text:?}: bad IPv6 address or missing port"),
                "write IPv6 seeds as \"NAME@[ADDR]:PORT\", e.g. \"gw-us-1@[fd00::1]:7400\""
                    .to_string(),
            ));
        };
        (host, port)
    } else {
        let Some((host, port)) = hostport.rsplit_once(':') else {
            return Err((format!("{text:?} has no port"), FORM.to_string()));
        };
        (host, port)
    };
    if host.is_empty() {
        return Err((format!("{text:?} has no host"), FORM.to_string()));
    }
    let port: u16 = match port.parse() {
        Ok(p) if p != 0 => p,
        _ => {
            return Err((
                format!("{text:?}: {port:?} is not a port (1-65535)"),
                FORM.to_string(),
            ))
        }
    };
    let addr = if let Ok(ip) = host.parse::<IpAddr>() {
        SocketAddr::new(ip, port)
    } else {
        let addrs: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|e| {
                (
                    format!("cannot resolve host {host:?}: {e}"),
                    "use an IP address, or a host name this machine resolves".to_string(),
                )
            })?
            .collect();
        let same_family = addrs.iter().find(|a| a.is_ipv4() == family.is_ipv4());
        match same_family.or(addrs.first()) {
            Some(a) => *a,
            None => {
                return Err((
                    format!("host {host:?} resolves to no address"),
                    "use an IP address, or a host name this machine resolves".to_string(),
                ))
            }
        }
    };
    Ok(Seed { name, addr })
}

fn parse_seeds(
    texts: Vec<String>,
    me: &Ident,
    listen: SocketAddr,
) -> Result<Vec<Seed>, ConfigError> {
    let mut seeds = Vec::with_capacity(texts.len());
    let mut names = BTreeSet::new();
    for (i, text) in texts.iter().enumerate() {
        let key = format!("seeds[{i}]");
        let seed = parse_seed(text, listen).map_err(|(p, f)| ConfigError::new(&key, p, f))?;
        if seed.name == me.name {
            return Err(ConfigError::new(
                key,
                format!("{text:?} names this node itself ({})", me.name),
                "remove it: a node does not seed itself",
            ));
        }
        if !names.insert(seed.name.clone()) {
            return Err(ConfigError::new(
                key,
                format!("seed {} is listed twice", seed.name),
                "keep one entry per seed node",
            ));
        }
        seeds.push(seed);
    }
    Ok(seeds)
}

/// Reads and parses a topology contract file (the config's `contract`).
pub fn load_contract(path: &Path) -> Result<Contract, ConfigError> {
    const FIX: &str = "point contract at the topology contract file (the same file on every node)";
    let bytes =
        read_capped(path, MAX_CONTRACT_BYTES).map_err(|p| ConfigError::new("contract", p, FIX))?;
    let text = String::from_utf8(bytes).map_err(|_| {
        ConfigError::new(
            "contract",
            format!("{} is not UTF-8 text", path.display()),
            FIX,
        )
    })?;
    Contract::parse(&text).map_err(|e| {
        ConfigError::new(
            "contract",
            format!("{} is not a valid contract: {e}", path.display()),
            "correct the contract file (the error names its key) and deploy the same file on every node",
        )
    })
}

fn check_contract(
    contract: &Contract,
    path: &Path,
    cluster: &ClusterName,
    me: &Ident,
) -> Result<(), ConfigError> {
    if contract.cluster != *cluster {
        return Err(ConfigError::new(
            "cluster",
            format!(
                "is {cluster:?} but the contract {} is for cluster {:?}",
                path.display(),
                contract.cluster.as_str()
            ),
            format!(
                "make them equal: set cluster = \"{}\", or point contract at the contract of cluster {cluster}",
                contract.cluster
            ),
        ));
    }
    contract.check_node(me).map_err(|refusal| match refusal {
        ContractRefusal::UnknownSite(site) => {
            let known: Vec<&str> = contract.sites().map(|s| s.name.as_str()).collect();
            ConfigError::new(
                "site",
                format!("site {site} is not in the contract {}", path.display()),
                format!(
                    "set site to one of: {}; or add a [[site]] named {site} to the contract on every node",
                    known.join(", ")
                ),
            )
        }
        ContractRefusal::NotListed { node, site } => ConfigError::new(
            "name",
            format!("node {node} is not listed in `nodes` of site {site} in the contract"),
            format!("add {node} to `nodes` of site {site} in the contract (on every node), or use a listed name"),
        ),
        ContractRefusal::NotAGateway { node, site } => ConfigError::new(
            "role",
            format!("is gateway, but {node} is not a gateway of site {site} in the contract"),
            format!("set role = \"member\", or add {node} to `gateways` of site {site} in the contract (on every node)"),
        ),
        other => ConfigError::new(
            "contract",
            other.to_string(),
            "correct the contract or this node's name, site and role",
        ),
    })
}

/// The site of `node` according to the contract, when the contract names it.
fn contract_site_of<'a>(contract: &'a Contract, node: &NodeName) -> Option<&'a SiteName> {
    contract
        .sites()
        .find(|s| s.gateways.contains(node) || s.nodes.as_ref().is_some_and(|n| n.contains(node)))
        .map(|s| &s.name)
}

/// Seeds the contract places in another site must be reachable under the contract: only a
/// gateway dials out of its site, and only to gateways of linked sites.
fn check_seed_sites(contract: &Contract, me: &Ident, seeds: &[Seed]) -> Result<(), ConfigError> {
    for (i, seed) in seeds.iter().enumerate() {
        let Some(site) = contract_site_of(contract, &seed.name) else {
            continue;
        };
        if *site == me.site {
            continue;
        }
        let key = format!("seeds[{i}]");
        if me.role != Role::Gateway {
            return Err(ConfigError::new(
                key,
                format!(
                    "{} is in site {site}, and member {} never dials outside its site {}",
                    seed.name, me.name, me.site
                ),
                format!("list only nodes of site {} as seeds of a member", me.site),
            ));
        }
        if !contract.is_gateway(site, &seed.name) {
            return Err(ConfigError::new(
                key,
                format!(
                    "{} is a member of site {site}; across sites only gateways link",
                    seed.name
                ),
                format!(
                    "list a gateway of site {site} instead, or a node of site {}",
                    me.site
                ),
            ));
        }
        if !contract.sites_linked(&me.site, site) {
            return Err(ConfigError::new(
                key,
                format!("{} is in site {site}, which the contract does not link to site {}", seed.name, me.site),
                format!("remove it, or add a [[link]] between {} and {site} to the contract (on every node)", me.site),
            ));
        }
    }
    Ok(())
}

fn check_tls(
    raw: RawTls,
    base_dir: &Path,
    cluster: &ClusterName,
    me: &Ident,
) -> Result<TlsFiles, ConfigError> {
    let ca = required(
        raw.ca,
        "tls.ca",
        "ca = \"/etc/clusterctl/ca.pem\" under [tls] (the cluster CA certificate)",
    )?;
    let cert = required(
        raw.cert,
        "tls.cert",
        "cert = \"/etc/clusterctl/node.pem\" under [tls] (this node's certificate)",
    )?;
    let key = required(
        raw.key,
        "tls.key",
        "key = \"/etc/clusterctl/node.key\" under [tls] (this node's private key)",
    )?;
    let files = TlsFiles {
        ca: resolve_path(base_dir, &ca, "tls.ca")?,
        cert: resolve_path(base_dir, &cert, "tls.cert")?,
        key: resolve_path(base_dir, &key, "tls.key")?,
    };
    let read = |key: &str, path: &Path| -> Result<Vec<u8>, ConfigError> {
        read_capped(path, MAX_PEM_BYTES).map_err(|problem| {
            ConfigError::new(
                key,
                problem,
                format!(
                    "point {key} at an existing PEM file readable by the user running the agent"
                ),
            )
        })
    };
    let ca_pem = read("tls.ca", &files.ca)?;
    let cert_pem = read("tls.cert", &files.cert)?;
    // Owner and mode first: a key of another user is "not yours" before it is "unreadable".
    if files.key.exists() {
        crate::files::check_private(&files.key, "tls.key")?;
    }
    let key_pem = read("tls.key", &files.key)?;

    let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&ca_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| pem_error("tls.ca", &files.ca, e))?;
    if cas.is_empty() {
        return Err(pem_error(
            "tls.ca",
            &files.ca,
            rustls_pki_types::pem::Error::NoItemsFound,
        ));
    }
    let cert_der = CertificateDer::from_pem_slice(&cert_pem)
        .map_err(|e| pem_error("tls.cert", &files.cert, e))?;
    PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| pem_error("tls.key", &files.key, e))?;

    let id = crate::pki::CertIdentity::from_der(&cert_der).map_err(|e| {
        ConfigError::new(
            "tls.cert",
            format!("{}: {e}", files.cert.display()),
            "point tls.cert at a node certificate issued by the cluster CA",
        )
    })?;
    if id.cluster != *cluster || id.ident != *me {
        return Err(ConfigError::new(
            "tls.cert",
            format!(
                "{} names {} in cluster {}, but this config is {} in cluster {cluster}",
                files.cert.display(),
                id.ident,
                id.cluster,
                me
            ),
            format!(
                "point tls.cert and tls.key at this node's own certificate, or issue one for {} with role {}",
                crate::pki::dns_name(cluster, &me.site, &me.name),
                me.role
            ),
        ));
    }
    let now = SystemTime::now();
    if id.not_after <= now {
        return Err(ConfigError::new(
            "tls.cert",
            format!(
                "{} expired at {}",
                files.cert.display(),
                humantime::format_rfc3339_seconds(id.not_after)
            ),
            "issue a new certificate for this node from the cluster CA",
        ));
    }
    if id.not_before > now {
        return Err(ConfigError::new(
            "tls.cert",
            format!(
                "{} is not valid before {}",
                files.cert.display(),
                humantime::format_rfc3339_seconds(id.not_before)
            ),
            "check this machine's clock, or issue a certificate valid from now",
        ));
    }
    let issued_by_ca = cas.iter().any(|ca| {
        x509_parser::parse_x509_certificate(ca)
            .map(|(_, c)| c.subject().to_string() == id.issuer)
            .unwrap_or(false)
    });
    if !issued_by_ca {
        return Err(ConfigError::new(
            "tls.ca",
            format!(
                "{} was issued by {:?}, and {} holds no certificate of that name",
                files.cert.display(),
                id.issuer,
                files.ca.display()
            ),
            "point tls.ca at the cluster CA that issued this node's certificate",
        ));
    }
    // The key must belong to the certificate. Keys rcgen cannot read (for example SEC1) are left
    // to the TLS stack to judge.
    let key_text = String::from_utf8_lossy(&key_pem);
    if let (Ok(pair), Ok((_, parsed))) = (
        rcgen::KeyPair::from_pem(&key_text),
        x509_parser::parse_x509_certificate(&cert_der),
    ) {
        if pair.public_key_raw() != &parsed.public_key().subject_public_key.data[..] {
            return Err(ConfigError::new(
                "tls.key",
                format!(
                    "{} is not the private key of {}",
                    files.key.display(),
                    files.cert.display()
                ),
                "point tls.key at the key the certificate was issued for",
            ));
        }
    }
    Ok(files)
}

fn pem_error(key: &str, path: &Path, e: rustls_pki_types::pem::Error) -> ConfigError {
    let (noun, marker) = match key {
        "tls.key" => ("PEM private key", "-----BEGIN PRIVATE KEY-----"),
        _ => ("PEM certificate", "-----BEGIN CERTIFICATE-----"),
    };
    let problem = match e {
        rustls_pki_types::pem::Error::NoItemsFound => format!("holds no {noun}"),
        other => format!("is not valid PEM: {other}"),
    };
    ConfigError::new(
        key,
        format!("{} {problem}", path.display()),
        format!("point {key} at a {noun} file ({marker})"),
    )
}

fn check_data_dir(dir: &Path) -> Result<(), ConfigError> {
    const FIX: &str = "choose a directory the agent's user can create and write, e.g. data-dir = \"/var/lib/clusterctl\"";
    std::fs::create_dir_all(dir).map_err(|e| {
        ConfigError::new(
            "data-dir",
            format!("cannot create {}: {e}", dir.display()),
            FIX,
        )
    })?;
    let probe = dir.join(format!(".write-check-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| {
        ConfigError::new(
            "data-dir",
            format!("cannot write in {}: {e}", dir.display()),
            FIX,
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{generate_ca, issue_node_cert, CertPair, Validity};
    use std::os::unix::fs::PermissionsExt;

    const CONTRACT: &str = r#"
cluster = "lab"
[[site]]
name = "us-east"
gateways = ["gw-us-1"]
[[site]]
name = "eu-west"
gateways = ["gw-eu-1"]
[[site]]
name = "ap-south"
gateways = ["gw-ap-1"]
[[link]]
between = ["us-east", "eu-west"]
"#;

    struct Fixture {
        dir: tempfile::TempDir,
        ca: CertPair,
    }

    fn ident(name: &str, site: &str, role: Role) -> Ident {
        Ident {
            name: NodeName::new(name).unwrap(),
            site: SiteName::new(site).unwrap(),
            role,
        }
    }

    impl Fixture {
        /// A directory with a contract, a CA and a certificate for edge-us-1 (member of us-east).
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("contract.toml"), CONTRACT).unwrap();
            let cluster = ClusterName::new("lab").unwrap();
            let ca = generate_ca(&cluster, Validity::days_from_now(10)).unwrap();
            std::fs::write(dir.path().join("ca.pem"), &ca.cert_pem).unwrap();
            let f = Fixture { dir, ca };
            f.issue("node", &ident("edge-us-1", "us-east", Role::Member));
            let secret = f.dir.path().join("cluster.secret");
            std::fs::write(
                &secret,
                "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n",
            )
            .unwrap();
            std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            f
        }

        fn issue(&self, stem: &str, id: &Ident) {
            let cluster = ClusterName::new("lab").unwrap();
            let pair = issue_node_cert(&self.ca, &cluster, id, Validity::days_from_now(5)).unwrap();
            self.write(&format!("{stem}.pem"), &pair.cert_pem);
            self.write(&format!("{stem}.key"), &pair.key_pem);
        }

        /// Writes a file of the fixture; keys mode 0600, as the agent requires.
        fn write(&self, name: &str, text: &str) {
            let path = self.dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            if name.ends_with(".key") {
                std::fs::set_permissions(
                    &path,
                    std::os::unix::fs::PermissionsExt::from_mode(0o600),
                )
                .unwrap();
            }
        }

        fn parse(&self, text: &str) -> Result<AgentConfig, ConfigError> {
            AgentConfig::parse(text, self.dir.path())
        }

        fn err(&self, text: &str) -> ConfigError {
            match self.parse(text) {
                Ok(c) => panic!("expected an error, got {c:?}"),
                Err(e) => e,
            }
        }
    }

    const GOOD: &str = r#"
cluster = "lab"
name = "edge-us-1"
site = "us-east"
role = "member"
listen = "127.0.0.1:7400"
seeds = ["gw-us-1@127.0.0.2:7400", "edge-us-2@localhost:7400"]
data-dir = "data"
contract = "contract.toml"
secret = "cluster.secret"

[tls]
ca = "ca.pem"
cert = "node.pem"
key = "node.key"
"#;

    /// GOOD with `from` replaced by `to` (exactly once).
    fn with(from: &str, to: &str) -> String {
        assert_eq!(GOOD.matches(from).count(), 1, "{from}");
        GOOD.replace(from, to)
    }

    fn assert_key(e: &ConfigError, key: &str, needle: &str) {
        assert_eq!(e.key, key, "{e}");
        assert!(
            e.to_string().contains(needle),
            "{e:?} should mention {needle:?}"
        );
        assert!(!e.fix.is_empty(), "{e}");
    }

    #[test]
    fn good_config_loads_with_defaults() {
        let f = Fixture::new();
        let c = f.parse(GOOD).unwrap();
        assert_eq!(c.cluster.as_str(), "lab");
        assert_eq!(c.ident, ident("edge-us-1", "us-east", Role::Member));
        assert_eq!(c.listen, "127.0.0.1:7400".parse().unwrap());
        assert_eq!(c.advertise, c.listen, "advertise defaults to listen");
        assert_eq!(c.control, None, "no TCP control listener unless asked");
        assert_eq!(c.control_socket, f.dir.path().join("data/control.sock"));
        assert_eq!(c.seeds.len(), 2);
        assert_eq!(c.seeds[0].to_string(), "gw-us-1@127.0.0.2:7400");
        assert!(c.seeds[1].addr.ip().is_loopback(), "{:?}", c.seeds[1]);
        assert!(c.seeds[1].addr.is_ipv4(), "prefers listen's family");
        assert_eq!(c.data_dir, f.dir.path().join("data"));
        assert!(c.data_dir.is_dir(), "data-dir is created");
        assert_eq!(c.contract_path, f.dir.path().join("contract.toml"));
        assert!(!c.insecure);
        let tls = c.tls.unwrap();
        assert_eq!(tls.key, f.dir.path().join("node.key"));
    }

    #[test]
    fn load_reads_relative_to_the_file_and_records_the_path() {
        let f = Fixture::new();
        f.write("agent.toml", GOOD);
        let path = f.dir.path().join("agent.toml");
        let c = AgentConfig::load(&path).unwrap();
        assert_eq!(c.path, path);
        assert_eq!(c.data_dir, f.dir.path().join("data"));
    }

    #[test]
    fn unreadable_config_file_is_named() {
        let e = AgentConfig::load(Path::new("/nonexistent/agent.toml")).unwrap_err();
        assert_key(&e, "config", "/nonexistent/agent.toml");
    }

    #[test]
    fn syntax_error_gives_line() {
        let f = Fixture::new();
        let e = f.err("cluster = lab\n");
        assert_key(&e, "config", "line 1");
    }

    #[test]
    fn unknown_keys_are_named_with_a_suggestion() {
        let f = Fixture::new();
        let e = f.err(&with("data-dir", "data_dir"));
        assert_key(&e, "data_dir", "`data-dir`");
        let e = f.err(&format!("colour = 1\n{GOOD}"));
        assert_key(&e, "colour", "is not a known key");
        let e = f.err(&format!("clustr = \"x\"\n{GOOD}"));
        assert_key(&e, "clustr", "`cluster`");
        let e = f.err(&with(
            "key = \"node.key\"",
            "key = \"node.key\"\npassword = \"x\"",
        ));
        assert_key(&e, "tls.password", "is not a known key");
        let e = f.err(&format!("ca = \"ca.pem\"\n{GOOD}"));
        assert_key(&e, "ca", "[tls]");
    }

    #[test]
    fn missing_required_keys_are_named() {
        let f = Fixture::new();
        for (line, key) in [
            ("cluster = \"lab\"", "cluster"),
            ("name = \"edge-us-1\"", "name"),
            ("site = \"us-east\"", "site"),
            ("role = \"member\"", "role"),
            ("listen = \"127.0.0.1:7400\"", "listen"),
            ("data-dir = \"data\"", "data-dir"),
            ("contract = \"contract.toml\"", "contract"),
            ("ca = \"ca.pem\"", "tls.ca"),
            ("cert = \"node.pem\"", "tls.cert"),
            ("key = \"node.key\"", "tls.key"),
        ] {
            let e = f.err(&with(line, ""));
            assert_key(&e, key, "is missing");
        }
    }

    #[test]
    fn wrong_types_are_named() {
        let f = Fixture::new();
        let e = f.err(&with("\"127.0.0.1:7400\"", "7400"));
        assert_key(&e, "listen", "must be a string");
        let e = f.err(&format!("insecure = \"yes\"\n{GOOD}"));
        assert_key(&e, "insecure", "true or false");
        let e = f.err(&with("\"gw-us-1@127.0.0.2:7400\"", "1"));
        assert_key(&e, "seeds[0]", "must be a string");
        let e = f.err(&with(
            "[tls]\nca = \"ca.pem\"\ncert = \"node.pem\"\nkey = \"node.key\"\n",
            "tls = true\n",
        ));
        assert_key(&e, "tls", "must be a table");
    }

    #[test]
    fn invalid_names_use_the_name_error() {
        let f = Fixture::new();
        let e = f.err(&with("name = \"edge-us-1\"", "name = \"Edge\""));
        assert_key(&e, "name", "contains 'E'");
        let e = f.err(&with("site = \"us-east\"", "site = \"-us\""));
        assert_key(&e, "site", "starts or ends with '-'");
        let e = f.err(&with("cluster = \"lab\"", "cluster = \"\""));
        assert_key(&e, "cluster", "is empty");
    }

    #[test]
    fn role_must_be_member_or_gateway() {
        let f = Fixture::new();
        let e = f.err(&with("role = \"member\"", "role = \"leader\""));
        assert_key(&e, "role", "\"leader\" is not a role");
    }

    #[test]
    fn addresses_must_parse() {
        let f = Fixture::new();
        let e = f.err(&with("127.0.0.1:7400\"", "localhost:7400\""));
        assert_key(&e, "listen", "not an IP:PORT");
        let e = f.err(&format!("advertise = \"10.0.0.1\"\n{GOOD}"));
        assert_key(&e, "advertise", "not an IP:PORT");
        let e = f.err(&format!("control = \"7401\"\n{GOOD}"));
        assert_key(&e, "control", "not an IP:PORT");
        let tokens = f.dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        crate::auth::ensure_token_file(&tokens.join("admin.token")).unwrap();
        let c = f
            .parse(&format!(
                "control = \"127.0.0.1:9000\"\ncontrol-tokens = \"tokens\"\n{GOOD}"
            ))
            .unwrap();
        assert_eq!(c.control.map(|a| a.port()), Some(9000));
        assert_eq!(c.control_tokens.map(|t| t.0), Some(tokens));
    }

    #[test]
    fn tcp_control_without_tokens_is_refused_naming_the_fix() {
        let f = Fixture::new();
        let e = f.err(&format!("control = \"0.0.0.0:7401\"\n{GOOD}"));
        assert_key(&e, "control", "non-loopback");
        assert!(e.fix.contains("control-tokens"), "{e}");
        let e = f.err(&format!("control = \"127.0.0.1:7401\"\n{GOOD}"));
        assert_key(&e, "control", "without tokens");
        let e = f.err(&format!("control-tokens = \"nowhere\"\n{GOOD}"));
        assert_key(&e, "control-tokens", "cannot read");
    }

    #[test]
    fn control_socket_path_is_checked() {
        let f = Fixture::new();
        let long = format!("/tmp/{}/control.sock", "x".repeat(120));
        let e = f.err(&format!("control-socket = \"{long}\"\n{GOOD}"));
        assert_key(&e, "control-socket", "at most 107");
        let e = f.err(&format!("control-group = \"no-such-group-here\"\n{GOOD}"));
        assert_key(&e, "control-group", "no group named");
        let c = f.parse(&format!("control-group = \"0\"\n{GOOD}")).unwrap();
        assert_eq!(c.control_group, Some(("0".to_string(), 0)));
    }

    #[test]
    fn wildcard_listen_needs_advertise() {
        let f = Fixture::new();
        let e = f.err(&with("127.0.0.1:7400\"", "0.0.0.0:7400\""));
        assert_key(&e, "advertise", "wildcard");
        let e = f.err(&with("127.0.0.1:7400\"", "[::]:7400\""));
        assert_key(&e, "advertise", "wildcard");
        let c = f
            .parse(&with(
                "127.0.0.1:7400\"",
                "0.0.0.0:7400\"\nadvertise = \"10.0.1.11:7400\"",
            ))
            .unwrap();
        assert_eq!(c.advertise, "10.0.1.11:7400".parse().unwrap());
        assert_eq!(c.listen, "0.0.0.0:7400".parse().unwrap());
    }

    #[test]
    fn advertise_must_be_dialable() {
        let f = Fixture::new();
        let e = f.err(&format!("advertise = \"0.0.0.0:7400\"\n{GOOD}"));
        assert_key(&e, "advertise", "wildcard");
        let e = f.err(&format!("advertise = \"10.0.0.1:0\"\n{GOOD}"));
        assert_key(&e, "advertise", "port 0");
        let e = f.err(&with("127.0.0.1:7400\"", "127.0.0.1:0\""));
        assert_key(&e, "listen", "port 0");
    }

    #[test]
    fn seed_syntax_is_checked() {
        let f = Fixture::new();
        for (bad, needle) in [
            ("127.0.0.2:7400", "no node name"),
            ("gw-us-1@127.0.0.2", "no port"),
            ("gw-us-1@127.0.0.2:http", "not a port"),
            ("gw-us-1@127.0.0.2:0", "not a port"),
            ("GW@127.0.0.2:7400", "contains 'G'"),
            ("gw-us-1@:7400", "no host"),
            ("gw-us-1@[::1:7400", "IPv6"),
        ] {
            let e = f.err(&with("gw-us-1@127.0.0.2:7400", bad));
            assert_key(&e, "seeds[0]", needle);
        }
        let c = f
            .parse(&with("gw-us-1@127.0.0.2:7400", "gw-us-1@[::1]:7400"))
            .unwrap();
        assert_eq!(c.seeds[0].addr, "[::1]:7400".parse().unwrap());
    }

    #[test]
    fn seed_naming_this_node_is_refused() {
        let f = Fixture::new();
        let e = f.err(&with("edge-us-2@localhost", "edge-us-1@localhost"));
        assert_key(&e, "seeds[1]", "itself");
        let e = f.err(&with("edge-us-2@localhost", "gw-us-1@localhost"));
        assert_key(&e, "seeds[1]", "twice");
    }

    #[test]
    fn member_seeds_stay_in_their_site() {
        let f = Fixture::new();
        let e = f.err(&with("edge-us-2@localhost", "gw-eu-1@localhost"));
        assert_key(&e, "seeds[1]", "never dials outside");
    }

    #[test]
    fn gateway_seeds_follow_contract_links() {
        let f = Fixture::new();
        f.issue("gw", &ident("gw-us-1", "us-east", Role::Gateway));
        let gw = GOOD
            .replace("edge-us-1", "gw-us-1")
            .replace("\"gw-us-1@127.0.0.2:7400\", ", "")
            .replace("role = \"member\"", "role = \"gateway\"")
            .replace("node.", "gw.");
        f.parse(&gw).unwrap();
        let ok = gw.replace("edge-us-2@", "gw-eu-1@");
        f.parse(&ok).unwrap();
        let e = f.err(&gw.replace("edge-us-2@", "gw-ap-1@"));
        assert_key(&e, "seeds[0]", "does not link");
    }

    #[test]
    fn contract_file_problems_are_reported() {
        let f = Fixture::new();
        let e = f.err(&with(
            "contract = \"contract.toml\"",
            "contract = \"missing.toml\"",
        ));
        assert_key(&e, "contract", "missing.toml");
        f.write("bad-contract.toml", "cluster = \"lab\"\n");
        let e = f.err(&with(
            "contract = \"contract.toml\"",
            "contract = \"bad-contract.toml\"",
        ));
        assert_key(&e, "contract", "no [[site]]");
        let e = f.err(&with("contract = \"contract.toml\"", "contract = \"\""));
        assert_key(&e, "contract", "empty path");
    }

    #[test]
    fn contract_cluster_must_match() {
        let f = Fixture::new();
        f.write("other.toml", &CONTRACT.replace("\"lab\"", "\"prod\""));
        let e = f.err(&with(
            "contract = \"contract.toml\"",
            "contract = \"other.toml\"",
        ));
        assert_key(&e, "cluster", "\"prod\"");
    }

    #[test]
    fn node_must_be_allowed_by_the_contract() {
        let f = Fixture::new();
        let e = f.err(&with("role = \"member\"", "role = \"gateway\""));
        assert_key(&e, "role", "not a gateway of site us-east");
        let e = f.err(&with("site = \"us-east\"", "site = \"mars\""));
        assert_key(&e, "site", "mars");
        f.write(
            "listed.toml",
            &CONTRACT.replace(
                "gateways = [\"gw-us-1\"]",
                "gateways = [\"gw-us-1\"]\nnodes = [\"gw-us-1\", \"edge-us-9\"]",
            ),
        );
        let e = f.err(&with(
            "contract = \"contract.toml\"",
            "contract = \"listed.toml\"",
        ));
        assert_key(&e, "name", "not listed");
    }

    #[test]
    fn tls_or_insecure_must_be_chosen() {
        let f = Fixture::new();
        let no_tls = with(
            "[tls]\nca = \"ca.pem\"\ncert = \"node.pem\"\nkey = \"node.key\"\n",
            "",
        );
        let e = f.err(&no_tls);
        assert_key(&e, "tls", "insecure = true");
        let e = f.err(&format!("insecure = false\n{no_tls}"));
        assert_key(&e, "tls", "no [tls]");
        let e = f.err(&format!("insecure = true\n{GOOD}"));
        assert_key(&e, "insecure", "choose one");
        let c = f.parse(&format!("insecure = true\n{no_tls}")).unwrap();
        assert!(c.insecure);
        assert!(c.tls.is_none());
    }

    #[test]
    fn tls_files_must_exist_and_be_readable() {
        let f = Fixture::new();
        let e = f.err(&with("key = \"node.key\"", "key = \"nope.key\""));
        assert_key(&e, "tls.key", "nope.key");
        let e = f.err(&with("ca = \"ca.pem\"", "ca = \"nope.pem\""));
        assert_key(&e, "tls.ca", "nope.pem");
        // A key the agent's user may not read. Root reads it anyway, so only check the outcome
        // when the read really fails.
        f.write("locked.key", "x");
        let locked = f.dir.path().join("locked.key");
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
        if std::fs::read(&locked).is_err() {
            let e = f.err(&with("key = \"node.key\"", "key = \"locked.key\""));
            assert_key(&e, "tls.key", "ermission denied");
        }
    }

    #[test]
    fn tls_files_must_hold_pem() {
        let f = Fixture::new();
        f.write("junk.pem", "hello");
        let e = f.err(&with("cert = \"node.pem\"", "cert = \"junk.pem\""));
        assert_key(&e, "tls.cert", "junk.pem");
        let e = f.err(&with("key = \"node.key\"", "key = \"junk.pem\""));
        assert_key(&e, "tls.key", "junk.pem");
        let e = f.err(&with("ca = \"ca.pem\"", "ca = \"junk.pem\""));
        assert_key(&e, "tls.ca", "holds no PEM certificate");
    }

    #[test]
    fn a_tls_key_readable_by_others_is_refused_with_the_chmod() {
        let f = Fixture::new();
        let key = f.dir.path().join("node.key");
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o640))
            .unwrap();
        let e = f.err(GOOD);
        assert_key(&e, "tls.key", "0640");
        assert_eq!(e.fix, format!("chmod 600 {}", key.display()));
    }

    #[test]
    fn certificate_must_name_this_node() {
        let f = Fixture::new();
        f.issue("other", &ident("edge-us-2", "us-east", Role::Member));
        let e = f.err(&with("cert = \"node.pem\"", "cert = \"other.pem\""));
        assert_key(&e, "tls.cert", "edge-us-2");
        let e = f.err(&with("key = \"node.key\"", "key = \"other.key\""));
        assert_key(&e, "tls.key", "not the private key");
    }

    #[test]
    fn certificate_must_come_from_the_configured_ca() {
        let f = Fixture::new();
        let other = generate_ca(
            &ClusterName::new("other").unwrap(),
            Validity::days_from_now(1),
        )
        .unwrap();
        f.write("other-ca.pem", &other.cert_pem);
        let e = f.err(&with("ca = \"ca.pem\"", "ca = \"other-ca.pem\""));
        assert_key(&e, "tls.ca", "issued by");
    }

    #[test]
    fn data_dir_must_be_creatable() {
        let f = Fixture::new();
        f.write("plain-file", "");
        let e = f.err(&with(
            "data-dir = \"data\"",
            "data-dir = \"plain-file/data\"",
        ));
        assert_key(&e, "data-dir", "cannot create");
    }

    #[test]
    fn display_is_one_line_naming_key_and_fix() {
        let e = ConfigError::new("tls.key", "is missing", "add it");
        assert_eq!(
            e.to_string(),
            "config error in `tls.key`: is missing — fix: add it"
        );
    }

    const EXAMPLE: &str = include_str!("../../../config.example.toml");

    #[test]
    fn example_config_parses_once_its_files_exist() {
        let f = Fixture::new();
        let etc = f.dir.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        // The example is edge-us-1 of us-east in cluster "prod".
        let cluster = ClusterName::new("prod").unwrap();
        std::fs::write(
            etc.join("contract.toml"),
            CONTRACT.replace("\"lab\"", "\"prod\""),
        )
        .unwrap();
        let ca = generate_ca(&cluster, Validity::days_from_now(10)).unwrap();
        let node = issue_node_cert(
            &ca,
            &cluster,
            &ident("edge-us-1", "us-east", Role::Member),
            Validity::days_from_now(5),
        )
        .unwrap();
        std::fs::write(etc.join("ca.pem"), &ca.cert_pem).unwrap();
        std::fs::write(etc.join("edge-us-1.pem"), &node.cert_pem).unwrap();
        std::fs::write(etc.join("edge-us-1.key"), &node.key_pem).unwrap();
        std::fs::set_permissions(
            etc.join("edge-us-1.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        std::fs::copy(
            f.dir.path().join("cluster.secret"),
            etc.join("cluster.secret"),
        )
        .unwrap();
        let text = EXAMPLE
            .replace("/etc/clusterctl", &etc.display().to_string())
            .replace(
                "/var/lib/clusterctl",
                &f.dir.path().join("data").display().to_string(),
            );
        let c = AgentConfig::parse(&text, f.dir.path()).unwrap();
        assert_eq!(c.ident.name.as_str(), "edge-us-1");
        assert!(c.listen.ip().is_unspecified());
        assert!(!c.advertise.ip().is_unspecified());
        assert!(!c.seeds.is_empty());
        assert!(c.tls.is_some());
        assert_eq!(c.control, None);
        // The commented TCP listener works as written once its tokens exist.
        std::fs::create_dir(etc.join("tokens")).unwrap();
        crate::auth::ensure_token_file(&etc.join("tokens/admin.token")).unwrap();
        let text = text
            .replace("# control = ", "control = ")
            .replace("# control-tokens = ", "control-tokens = ");
        let c = AgentConfig::parse(&text, f.dir.path()).unwrap();
        assert!(c.control.is_some() && c.control_tokens.is_some());
    }

    #[test]
    fn secret_file_must_be_private_and_well_formed() {
        use std::os::unix::fs::PermissionsExt;
        let f = Fixture::new();
        let p = f.dir.path().join("cluster.secret");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = f.parse(GOOD).unwrap_err();
        assert_key(&e, "secret", "chmod 600");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&p, "not hex").unwrap();
        let e = f.parse(GOOD).unwrap_err();
        assert_key(&e, "secret", "hex");
        let e = f.err(&with("secret = \"cluster.secret\"\n", ""));
        assert_key(&e, "secret", "secret generate");
    }

    #[test]
    fn example_config_uses_every_key_and_no_unknown_one() {
        let table: toml::Table = toml::from_str(EXAMPLE).unwrap();
        let keys: Vec<&str> = table.keys().map(String::as_str).collect();
        for k in KEYS {
            if [
                "advertise-wan",
                "control-socket",
                "control-group",
                "control",
                "control-tokens",
            ]
            .contains(k)
            {
                // Optional keys whose defaults are right for most: documented in a comment.
                assert!(
                    EXAMPLE.contains(&format!("\n# {k} = ")),
                    "config.example.toml lacks `{k}`"
                );
                continue;
            }
            assert!(keys.contains(k), "config.example.toml lacks `{k}`");
        }
        for k in &keys {
            assert!(KEYS.contains(k), "config.example.toml has unknown `{k}`");
        }
        let tls = table["tls"].as_table().unwrap();
        for k in TLS_KEYS {
            assert!(tls.contains_key(*k), "config.example.toml lacks `tls.{k}`");
        }
    }

    #[test]
    fn advertise_wan_is_for_gateways_only() {
        let f = Fixture::new();
        let e = f.err(&format!("advertise-wan = \"10.9.0.1:7400\"\n{GOOD}"));
        assert_key(&e, "advertise-wan", "only gateways");
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("cluster", "clustr"), 1);
        assert_eq!(edit_distance("seeds", "seed"), 1);
        assert_eq!(edit_distance("abc", "xyz"), 3);
    }
}
