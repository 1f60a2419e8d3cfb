//! The agent: one owner task drives the [`Engine`]; connection tasks feed it.
//!
//! ```text
//!   accept loop ──┐                         ┌── control API (axum, loopback)
//!   dial tasks ───┤ bounded mpsc (Net)      │ bounded mpsc (Command)
//!   conn readers ─┴──────────► owner task ◄─┘
//!                                 │  engine.poll_output()
//!                                 ├─► per-connection lanes ─► two long-lived QUIC uni streams
//!                                 │   (control first; data on the bulk lane, see [`crate::data`])
//!                                 ├─► conn.send_datagram (SWIM)
//!                                 ├─► persister (watch, coalescing) ─► table.snap
//!                                 └─► event log (ring + broadcast)
//! ```
//!
//! Lane readers settle routed frames for other nodes themselves (and answer echo requests for
//! this node), from the route snapshot the owner publishes (see [`crate::data`]); everything
//! else reaches the owner decoded.
//!
//! A connection is registered (and its frames read) only after the hello/ack passed every check
//! of [`Engine::check_hello`] / [`Engine::check_ack`]: a refused peer never gets an application
//! frame processed.

use crate::config::TlsFiles;
use crate::config::{AgentConfig, ConfigError};
use crate::control::{self, EventLog};
use crate::data::{
    self, BulkLane, DataPath, DataStats, LinkLanes, Queued, Routes, SharedRoutes, ToOwner,
};
use crate::files::DataDirLock;
use crate::inbox::{Command, DialFail, MetricsSnapshot, Net};
use crate::persist::{self, PersistError};
use crate::tls::{self, RejectSide, RejectSink, Security, TlsError, TlsMaterial};
use bytes::Bytes;
use clusterctl_api::{EventKind, KeyringReport, ReloadReport, SecretRequest};
use clusterctl_core::engine::EventOut;
use clusterctl_core::engine::LOCAL_SEND_ERROR;
use clusterctl_core::engine::{
    Engine, EngineConfig, EngineError, HelloMaker, LinkInfo, Output, Reply, Timing,
};
use clusterctl_core::name::ClusterName;
use clusterctl_core::name::{Ident, NodeName};
use clusterctl_core::secret::{KeyId, SecretError, BINDING_LEN, EXPORTER_LABEL};
use clusterctl_core::table::NodeRecord;
use clusterctl_core::wire::{
    Handshake, Lane, LoadSpec, WireError, MAX_HANDSHAKE, PROTOCOL_VERSION,
};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::time::{timeout, Instant};
use tracing::{debug, error, info, warn};

/// Time allowed for QUIC + TLS and for the hello/ack.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most handshakes in progress at once.
const MAX_HANDSHAKES: usize = 256;
/// Most lane streams read at once per connection (a peer opens two: control and bulk).
const LANES_IN_FLIGHT: usize = 4;
/// Two connections of one pair established within this window are a crossing dial.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(2);
/// Application close code for the losing connection of a simultaneous dial.
const CLOSE_DUPLICATE: u32 = 3;
/// Longest wait for the final snapshot at shutdown.
const FINAL_SAVE: Duration = Duration::from_secs(5);
/// How often the certificate files are checked for changes.
const TLS_FILES_POLL: Duration = Duration::from_secs(2);
/// Capacity of the channel from connection tasks to the owner.
const NET_QUEUE: usize = 8192;
/// Capacity, in batches, of the channel from bulk readers to the owner (data for this node).
const BULK_TO_OWNER: usize = 32;
/// The route snapshot is rebuilt at least this often (liveness changes move routes too).
const ROUTES_EVERY: Duration = Duration::from_millis(250);

/// Options that are not part of the config file.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Come back even over a tombstone (`clusterctl agent --rejoin`).
    pub rejoin: bool,
    /// Start with only this cluster secret (`clusterctl agent --secret FILE`), replacing the
    /// persisted keyring.
    pub secret: Option<std::path::PathBuf>,
    pub timing: Timing,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            rejoin: false,
            secret: None,
            timing: Timing::lan(),
        }
    }
}

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Persist(#[from] PersistError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("{0}")]
    Forgotten(String),
    #[error("{0}")]
    Io(String),
}

impl AgentError {
    /// Process exit code: 2 for configuration problems, 3 when forgotten, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            AgentError::Config(_) | AgentError::Tls(_) => 2,
            AgentError::Engine(EngineError::Forgotten(_)) | AgentError::Forgotten(_) => 3,
            AgentError::Engine(EngineError::Contract(_)) => 2,
            _ => 1,
        }
    }
}

#[derive(Debug)]
struct ChannelSink(mpsc::Sender<Net>);

impl RejectSink for ChannelSink {
    fn rejected(&self, side: RejectSide, claimed: Option<String>, reason: String) {
        warn!(
            peer = claimed.as_deref().unwrap_or("<unknown>"),
            ?side,
            "refused a peer certificate: {reason}"
        );
        // Our own dials report their failure themselves, under the name we dialed.
        if side == RejectSide::Accepting {
            // Never block inside the handshake: if the owner is behind, the log still has it.
            let _ = self.0.try_send(Net::TlsRejected { claimed, reason });
        }
    }
}

struct ConnEntry {
    id: u64,
    conn: quinn::Connection,
    /// Who dialed: the connection dialed by the lower name wins a crossing dial.
    dialer: NodeName,
    established: Instant,
    control: mpsc::Sender<Queued>,
    bulk: BulkLane,
}

/// Takes the data directory's lock, binds the sockets named in `cfg` and runs the agent until
/// `shutdown` resolves. A data directory held by another agent stops this one before it binds
/// anything (exit code 2, naming the holder).
pub async fn run(
    cfg: AgentConfig,
    opts: AgentOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    let lock = DataDirLock::acquire(&cfg.data_dir, &cfg.path)?;
    let security = match &cfg.tls {
        Some(files) => {
            let m = TlsMaterial::load(&files.ca, &files.cert, &files.key)?;
            let id = &m.identity;
            if id.ident != cfg.ident || id.cluster != cfg.cluster {
                return Err(ConfigError {
                    key: "tls.cert".into(),
                    problem: format!(
                        "{} names {} ({}) of site {} in cluster {}, but this config is {} ({}) of site {} in cluster {}",
                        files.cert.display(),
                        id.ident.name,
                        id.ident.role,
                        id.ident.site,
                        id.cluster,
                        cfg.ident.name,
                        cfg.ident.role,
                        cfg.ident.site,
                        cfg.cluster
                    ),
                    fix: "issue a certificate for this node's name, site and role from the cluster CA".into(),
                }
                .into());
            }
            Security::Mutual(Arc::new(m))
        }
        None => {
            warn!("running with insecure = true: links are neither authenticated nor verified; every report says secure=false");
            Security::Insecure {
                node: cfg.ident.name.clone(),
            }
        }
    };
    let udp =
        std::net::UdpSocket::bind(cfg.listen).map_err(|e| bind_error("listen", cfg.listen, &e))?;
    let control = bind_control(&cfg).await?;
    run_locked(cfg, opts, security, udp, control, lock, shutdown).await
}

/// Binds the control socket (mode 0600, or 0660 for `control-group`) and, when configured, the
/// TCP control listener.
pub async fn bind_control(cfg: &AgentConfig) -> Result<control::Listeners, AgentError> {
    use std::os::unix::fs::PermissionsExt;
    let path = &cfg.control_socket;
    let sock_err = |problem: String, fix: &str| -> AgentError {
        ConfigError {
            key: "control-socket".into(),
            problem,
            fix: fix.into(),
        }
        .into()
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| {
            sock_err(
                format!("cannot create {}: {e}", parent.display()),
                "choose a directory the agent's user can write",
            )
        })?;
    }
    if path.exists() {
        // A socket someone answers on belongs to a running agent; a dead one is left over.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(sock_err(
                format!(
                    "{} is in use: another agent serves its control API there",
                    path.display()
                ),
                "stop that agent, or give this one another data-dir / control-socket",
            ));
        }
        std::fs::remove_file(path).map_err(|e| {
            sock_err(
                format!("cannot remove the stale socket {}: {e}", path.display()),
                "remove it by hand",
            )
        })?;
    }
    let socket = tokio::net::UnixListener::bind(path).map_err(|e| {
        sock_err(
            format!("cannot bind {}: {e}", path.display()),
            "choose a path in a directory the agent's user can write",
        )
    })?;
    let mode = if let Some((name, gid)) = &cfg.control_group {
        std::os::unix::fs::chown(path, None, Some(*gid)).map_err(|e| ConfigError {
            key: "control-group".into(),
            problem: format!("cannot give {} to group {name}: {e}", path.display()),
            fix: "run the agent as a member of that group (or as root), or remove control-group"
                .into(),
        })?;
        0o660
    } else {
        0o600
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| {
        sock_err(
            format!("cannot set the mode of {}: {e}", path.display()),
            "choose a path the agent's user owns",
        )
    })?;
    let tcp = match cfg.control {
        None => None,
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| bind_error("control", addr, &e))?,
        ),
    };
    Ok(control::Listeners { socket, tcp })
}

fn bind_error(key: &str, addr: SocketAddr, e: &std::io::Error) -> AgentError {
    let (problem, fix) = match e.kind() {
        std::io::ErrorKind::AddrInUse => (
            format!("address {addr} is already in use"),
            "stop the process using it, or choose another port".to_string(),
        ),
        std::io::ErrorKind::AddrNotAvailable => (
            format!("address {addr} is not an address of this machine"),
            "use an address assigned to a local interface".to_string(),
        ),
        std::io::ErrorKind::PermissionDenied => (
            format!("not allowed to bind {addr}"),
            "use a port above 1023 or run with the needed privileges".to_string(),
        ),
        _ => (
            format!("cannot bind {addr}: {e}"),
            "choose another address".to_string(),
        ),
    };
    ConfigError {
        key: key.into(),
        problem,
        fix,
    }
    .into()
}

/// Runs the agent on already-bound sockets (tests bind port 0), after taking the data
/// directory's lock.
pub async fn run_bound(
    cfg: AgentConfig,
    opts: AgentOptions,
    security: Security,
    udp: std::net::UdpSocket,
    control_listeners: control::Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    let lock = DataDirLock::acquire(&cfg.data_dir, &cfg.path)?;
    run_locked(cfg, opts, security, udp, control_listeners, lock, shutdown).await
}

/// The agent itself; `_lock` is held until it returns.
async fn run_locked(
    cfg: AgentConfig,
    opts: AgentOptions,
    security: Security,
    udp: std::net::UdpSocket,
    control_listeners: control::Listeners,
    _lock: DataDirLock,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    let restored = persist::load(&cfg.data_dir)?;
    let reset_to = match &opts.secret {
        Some(p) => Some(crate::config::load_secret(p, "--secret")?),
        None => None,
    };
    let keyring = crate::keyring::load_or_init(&cfg.data_dir, &cfg.secret, reset_to)?;
    let wall_base_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let ecfg = EngineConfig {
        cluster: cfg.cluster.clone(),
        me: cfg.ident.clone(),
        addr: cfg.advertise.to_string(),
        wan_addr: cfg.advertise_wan.map(|a| a.to_string()),
        contract: cfg.contract.clone(),
        secure: matches!(security, Security::Mutual(_)),
        version: crate::VERSION.to_string(),
        seeds: cfg
            .seeds
            .iter()
            .map(|s| (s.name.clone(), s.addr.to_string()))
            .collect(),
        rejoin: opts.rejoin,
        timing: opts.timing.clone(),
        wall_base_ms,
        seed: wall_base_ms ^ u64::from(std::process::id()),
        keyring,
        cert: match &security {
            Security::Mutual(m) => Some(m.summary()),
            Security::Insecure { .. } => None,
        },
        cert_warn_fraction: cfg.cert_warn_fraction,
    };
    let epoch = Instant::now();
    let mut engine = Engine::new(ecfg, restored, Duration::ZERO)?;
    // The raised clock is on disk before anything leaves this node.
    persist::store(&cfg.data_dir, &engine.records()).map_err(|e| {
        AgentError::Io(format!(
            "cannot write {}: {e}",
            persist::snapshot_path(&cfg.data_dir).display()
        ))
    })?;

    let (net_tx, net_rx) = mpsc::channel(NET_QUEUE);
    let sink: Arc<dyn RejectSink> = Arc::new(ChannelSink(net_tx.clone()));
    let (server_cfg, client_cfg) = tls::endpoint_configs(&security, &cfg.cluster, sink.clone())?;
    let runtime =
        quinn::default_runtime().ok_or_else(|| AgentError::Io("no async runtime".into()))?;
    let endpoint = quinn::Endpoint::new(tls::endpoint_config(), Some(server_cfg), udp, runtime)
        .map_err(|e| AgentError::Io(format!("cannot start the QUIC endpoint: {e}")))?;

    let events = Arc::new(EventLog::new(cfg.ident.name.to_string()));
    let (cmd_tx, cmd_rx) = mpsc::channel(256);
    let (bulk_tx, bulk_rx) = mpsc::channel(BULK_TO_OWNER);
    let data = DataPath {
        me: cfg.ident.name.clone(),
        routes: SharedRoutes::default(),
        stats: Arc::new(DataStats::default()),
    };
    let control_addr = match &control_listeners.tcp {
        Some(l) => l
            .local_addr()
            .map_err(|e| AgentError::Io(e.to_string()))?
            .to_string(),
        None => "-".to_string(),
    };
    let access = control::Access {
        socket: crate::auth::SocketAccess {
            owner: crate::files::current_uid(),
            group: cfg.control_group.as_ref().map(|g| g.1),
        },
        tokens: cfg.control_tokens.as_ref().map(|t| t.1.clone()),
    };
    let info = control::StaticInfo {
        cluster: cfg.cluster.to_string(),
        name: cfg.ident.name.to_string(),
        site: cfg.ident.site.to_string(),
        role: cfg.ident.role,
        addr: cfg.advertise.to_string(),
        secure: matches!(security, Security::Mutual(_)),
        contract_hash: cfg.contract.hash().to_string(),
        started_at: clusterctl_core::engine::format_rfc3339_ms(wall_base_ms),
    };
    let control_task = tokio::spawn(control::serve(
        control_listeners,
        cmd_tx.clone(),
        events.clone(),
        info,
        data.clone(),
        access,
    ));
    info!(
        node = %cfg.ident.name,
        site = %cfg.ident.site,
        role = %cfg.ident.role,
        listen = %cfg.listen,
        control = %control_addr,
        socket = %cfg.control_socket.display(),
        clock = engine.clock(),
        contract = cfg.contract.hash(),
        "agent started"
    );

    let accept_task = tokio::spawn(accept_loop(endpoint.clone(), net_tx.clone()));
    let (persist_tx, persist_rx) = watch::channel::<Option<Vec<NodeRecord>>>(None);
    let persist_task = tokio::spawn(persister(cfg.data_dir.clone(), persist_rx));

    let mut owner = Owner {
        tls_files: cfg.tls.clone(),
        contract_path: cfg.contract_path.clone(),
        contract_hash: cfg.contract.hash().to_string(),
        contract_warning: None,
        tls_mtimes: cfg.tls.as_ref().map(tls_mtimes),
        sink,
        cluster: cfg.cluster.clone(),
        ident: cfg.ident.clone(),
        wall_base_ms,
        data_dir: cfg.data_dir.clone(),
        epoch,
        endpoint: endpoint.clone(),
        client_cfg,
        security,
        conns: HashMap::new(),
        next_conn_id: 1,
        net_tx,
        bulk_tx,
        data,
        cmd_tx,
        drops_reported: 0,
        routes_key: None,
        routes_at: Instant::now(),
        pending: HashMap::new(),
        next_token: 1,
        events,
        persist_tx,
        fatal: None,
        meter: Arc::default(),
    };
    owner.drain(&mut engine);
    let result = owner
        .run(&mut engine, net_rx, bulk_rx, cmd_rx, shutdown)
        .await;

    // The final snapshot goes through the persister too (one writer): it saves the last value
    // and ends once the sender is gone. Then close everything.
    let persist_tx = owner.persist_tx;
    persist_tx.send_replace(Some(engine.records()));
    drop(persist_tx);
    if timeout(FINAL_SAVE, persist_task).await.is_err() {
        error!(
            "the final node table snapshot was not written within {} s",
            FINAL_SAVE.as_secs()
        );
    }
    endpoint.close(0u32.into(), b"shutting down");
    let _ = timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    accept_task.abort();
    control_task.abort();
    let _ = std::fs::remove_file(&cfg.control_socket);
    result
}

struct Owner {
    tls_files: Option<TlsFiles>,
    /// The contract file, and the hash of the contract in use.
    contract_path: std::path::PathBuf,
    contract_hash: String,
    /// Why the contract on disk is not the one in use, since the last `reload` found it.
    contract_warning: Option<String>,
    tls_mtimes: Option<Vec<Option<SystemTime>>>,
    sink: Arc<dyn RejectSink>,
    cluster: ClusterName,
    ident: Ident,
    wall_base_ms: u64,
    data_dir: std::path::PathBuf,
    epoch: Instant,
    endpoint: quinn::Endpoint,
    client_cfg: quinn::ClientConfig,
    security: Security,
    conns: HashMap<NodeName, ConnEntry>,
    next_conn_id: u64,
    net_tx: mpsc::Sender<Net>,
    bulk_tx: mpsc::Sender<ToOwner>,
    data: DataPath,
    /// For tasks that answer the owner later (loads other nodes asked for).
    cmd_tx: mpsc::Sender<Command>,
    /// Data messages dropped that were already reported as an event.
    drops_reported: u64,
    /// The links the published route snapshot was built from, and when.
    routes_key: Option<(u64, u64)>,
    routes_at: Instant,
    pending: HashMap<u64, oneshot::Sender<Reply>>,
    next_token: u64,
    events: Arc<EventLog>,
    persist_tx: watch::Sender<Option<Vec<NodeRecord>>>,
    fatal: Option<String>,
    /// UDP traffic of the connections, for `/metrics`.
    meter: Arc<crate::meter::WireMeter>,
}

impl Owner {
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    async fn run(
        &mut self,
        engine: &mut Engine,
        mut net_rx: mpsc::Receiver<Net>,
        mut bulk_rx: mpsc::Receiver<ToOwner>,
        mut cmd_rx: mpsc::Receiver<Command>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), AgentError> {
        tokio::pin!(shutdown);
        let mut rtt_every = tokio::time::interval(Duration::from_secs(1));
        rtt_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut files_every = tokio::time::interval(TLS_FILES_POLL);
        files_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            let wake = self.epoch + engine.poll_timeout();
            // Biased: control input (handshakes, control frames, datagrams, commands, timers)
            // is served before data for this node, so a ping never waits behind a bulk load.
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some(msg) = net_rx.recv() => self.on_net(engine, msg),
                Some(cmd) = cmd_rx.recv() => self.on_command(engine, cmd),
                _ = tokio::time::sleep_until(wake) => engine.handle_timeout(self.now()),
                _ = rtt_every.tick() => {
                    for (peer, c) in &self.conns {
                        engine.handle_rtt(peer, c.conn.rtt().as_micros().min(u128::from(u32::MAX)) as u32);
                    }
                    self.report_drops();
                }
                _ = files_every.tick() => {
                    let now_mtimes = self.tls_files.as_ref().map(tls_mtimes);
                    if now_mtimes != self.tls_mtimes {
                        self.tls_mtimes = now_mtimes;
                        self.reload(engine, "the certificate files changed");
                    }
                }
                Some(()) = async {
                    match hangup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.reload(engine, "SIGHUP");
                }
                Some(batch) = bulk_rx.recv() => {
                    if self.conns.get(&batch.peer).is_some_and(|c| c.id == batch.conn_id) {
                        let now = self.now();
                        for f in batch.frames {
                            engine.handle_frame(now, &batch.peer, f);
                        }
                    }
                }
            }
            self.drain(engine);
            self.publish_routes(engine);
            if let Some(reason) = self.fatal.take() {
                error!("{reason}");
                return Err(AgentError::Forgotten(reason));
            }
        }
        // Graceful leave: tell the rings and every peer, give the frames a moment to go out.
        info!("leaving the cluster");
        engine.leave(self.now());
        self.drain(engine);
        let deadline = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < deadline
            && self
                .conns
                .values()
                .any(|c| c.control.capacity() < data::CONTROL_QUEUE)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        for c in self.conns.values() {
            c.conn.close(0u32.into(), b"left");
        }
        Ok(())
    }

    fn drain(&mut self, engine: &mut Engine) {
        while let Some(out) = engine.poll_output() {
            match out {
                Output::Dial { peer, addr } => {
                    let hello = engine.hello_maker();
                    tokio::spawn(dial(
                        self.endpoint.clone(),
                        self.client_cfg.clone(),
                        peer,
                        addr,
                        hello,
                        self.net_tx.clone(),
                    ));
                }
                Output::Send { to, frame } => {
                    let Some(c) = self.conns.get(&to) else {
                        continue;
                    };
                    let lane = frame.lane();
                    let bytes = frame.encode_prefixed();
                    match lane {
                        Lane::Control => {
                            if c.control.try_send(Queued::control(bytes)).is_err() {
                                warn!(peer = %to, "control queue full: frame dropped");
                            }
                        }
                        // The owner never waits: a data frame that finds the lane full is
                        // dropped and counted (senders that can wait use the lane directly).
                        Lane::Bulk => {
                            if c.bulk.try_send(bytes).is_err() {
                                self.data
                                    .stats
                                    .dropped
                                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                    }
                }
                Output::Datagram { to, bytes } => {
                    if let Some(c) = self.conns.get(&to) {
                        let _ = c.conn.send_datagram(Bytes::from(bytes));
                    }
                }
                Output::Close { peer, reason } => {
                    if let Some(c) = self.conns.remove(&peer) {
                        c.conn.close(2u32.into(), reason.as_bytes());
                    }
                }
                Output::Persist => {
                    self.persist_tx.send_replace(Some(engine.records()));
                }
                Output::Event(e) => self.events.record(e),
                Output::Reply { token, reply } => {
                    if let Some(tx) = self.pending.remove(&token) {
                        let _ = tx.send(reply);
                    }
                }
                Output::Fatal(reason) => {
                    self.persist_tx.send_replace(Some(engine.records()));
                    self.fatal = Some(reason);
                }
                Output::RunLoad { handle, spec } => {
                    let req = clusterctl_api::LoadRequest {
                        target: spec.target.to_string(),
                        from: None,
                        count: spec.count,
                        size: spec.size,
                        timeout_ms: spec.timeout_ms,
                    };
                    let (data, cmd) = (self.data.clone(), self.cmd_tx.clone());
                    tokio::spawn(async move {
                        let result = data::run_load(data, cmd.clone(), req).await;
                        let _ = cmd.send(Command::LoadDone { handle, result }).await;
                    });
                }
            }
        }
    }

    /// Reports data messages dropped since the last call (at most once a second: called from
    /// the RTT tick) as a warning event, so that loss shows in `clusterctl events` and the log
    /// as well as in `/metrics`.
    fn report_drops(&mut self) {
        let dropped = DataStats::get(&self.data.stats.dropped);
        if dropped > self.drops_reported {
            let at_ms = self.wall_base_ms + self.now().as_millis() as u64;
            self.events.record(EventOut {
                kind: EventKind::Warning,
                node: Some(self.ident.name.clone()),
                peer: None,
                reason: format!(
                    "dropped {} data messages: a bulk lane stayed full ({dropped} since start, clusterctl_data_dropped)",
                    dropped - self.drops_reported
                ),
                at_ms,
            });
            self.drops_reported = dropped;
        }
    }

    /// Rebuilds the route snapshot of the data path when a link changed, and every
    /// [`ROUTES_EVERY`] otherwise (new records and failure-detector verdicts move routes too;
    /// the period bounds the cost of a busy table).
    fn publish_routes(&mut self, engine: &Engine) {
        let key = (engine.links_generation(), self.next_conn_id);
        if self.routes_key == Some(key) && self.routes_at.elapsed() < ROUTES_EVERY {
            return;
        }
        self.routes_key = Some(key);
        self.routes_at = Instant::now();
        let me = &self.ident.name;
        let hops = engine
            .table()
            .live()
            .filter(|r| r.name != *me)
            .filter_map(|r| Some((r.name.clone(), engine.next_hop(&r.name).ok()?)))
            .collect();
        let links = self
            .conns
            .iter()
            .filter(|(peer, _)| engine.is_linked(peer))
            .map(|(peer, c)| {
                let lanes = LinkLanes {
                    conn_id: c.id,
                    control: c.control.clone(),
                    bulk: c.bulk.clone(),
                    rtt_us: c.conn.rtt().as_micros().min(u128::from(u32::MAX)) as u32,
                };
                (peer.clone(), lanes)
            })
            .collect();
        self.data.routes.set(Routes::new(hops, links));
    }

    fn link_info(
        &self,
        conn: &quinn::Connection,
        peer: Ident,
        contract_hash: String,
        key: KeyId,
    ) -> LinkInfo {
        LinkInfo {
            key: Some(key),
            peer,
            contract_hash,
            secure: matches!(self.security, Security::Mutual(_)),
            protocol: tls::protocol_label(conn, &self.security),
            rtt_us: conn.rtt().as_micros().min(u128::from(u32::MAX)) as u32,
        }
    }

    /// Registers an established connection; returns false if it lost a duplicate race.
    fn register(
        &mut self,
        engine: &mut Engine,
        conn: quinn::Connection,
        peer: &NodeName,
        dialer: NodeName,
    ) -> Option<u64> {
        let me = engine.me().name.clone();
        let preferred = |d: &NodeName| *d == std::cmp::min(me.clone(), peer.clone());
        let mut refresh = false;
        if let Some(old) = self.conns.get(peer) {
            // Two dials crossing (both ends dialed within moments): keep the one the lower name
            // dialed, at both ends. Anything later is a peer that came back (a restart, a network
            // change) while we still hold its old, dead connection: the new one wins.
            let crossing = old.established.elapsed() < DUPLICATE_WINDOW;
            if crossing && preferred(&old.dialer) && !preferred(&dialer) {
                conn.close(CLOSE_DUPLICATE.into(), b"duplicate connection");
                return None;
            }
            refresh = !crossing;
            old.conn
                .close(CLOSE_DUPLICATE.into(), b"duplicate connection");
        }
        let id = self.next_conn_id;
        self.next_conn_id += 1;
        let (ctx, crx) = mpsc::channel(data::CONTROL_QUEUE);
        let (bulk, brx) = BulkLane::new();
        tokio::spawn(data::lane_writer(conn.clone(), Lane::Control, crx));
        tokio::spawn(data::lane_writer(conn.clone(), Lane::Bulk, brx));
        tokio::spawn(reader(
            conn.clone(),
            peer.clone(),
            id,
            self.net_tx.clone(),
            self.bulk_tx.clone(),
            self.data.clone(),
        ));
        let replaced = self
            .conns
            .insert(
                peer.clone(),
                ConnEntry {
                    id,
                    conn,
                    dialer,
                    control: ctx,
                    bulk,
                    established: Instant::now(),
                },
            )
            .is_some();
        if replaced && !refresh {
            return None; // a crossing dial: already up in the engine, nothing new to learn
        }
        // New, or a peer that came back: the engine takes the link (again), syncs and announces.
        Some(id)
    }

    fn on_net(&mut self, engine: &mut Engine, msg: Net) {
        let now = self.now();
        match msg {
            Net::Hello {
                conn,
                hello,
                cert,
                binding,
                reply,
            } => {
                self.meter.track(&conn);
                let cert_ref = cert.as_ref().map(|c| (&c.cluster, &c.ident));
                let cert_ref = match self.security {
                    Security::Mutual(_) => cert_ref,
                    Security::Insecure { .. } => None,
                };
                match engine.check_hello(&hello, cert_ref, &binding) {
                    Ok(ack) => {
                        let peer = hello.ident.name.clone();
                        let key = ack.secret.key;
                        let _ = reply.send(Ok(ack));
                        let info = self.link_info(
                            &conn,
                            hello.ident.clone(),
                            hello.contract_hash.clone(),
                            key,
                        );
                        if self.register(engine, conn, &peer, peer.clone()).is_some() {
                            engine.handle_link_up(now, info);
                        }
                    }
                    Err(refusal) => {
                        warn!(peer = %hello.ident.name, "refused: {}", refusal.reason);
                        engine.handle_refused(
                            now,
                            Some(hello.ident.name.clone()),
                            Some(refusal.code),
                            &refusal.reason,
                            true,
                        );
                        let _ = reply.send(Err(refusal));
                    }
                }
            }
            Net::Ack {
                conn,
                expected,
                ack,
                cert,
                binding,
            } => {
                self.meter.track(&conn);
                let cert_ref = match self.security {
                    Security::Mutual(_) => cert.as_ref().map(|c| (&c.cluster, &c.ident)),
                    Security::Insecure { .. } => None,
                };
                match engine.check_ack(now, &expected, &ack, cert_ref, &binding) {
                    Ok(key) => {
                        let me = engine.me().name.clone();
                        let info = self.link_info(
                            &conn,
                            ack.ident.clone(),
                            ack.contract_hash.clone(),
                            key,
                        );
                        if self.register(engine, conn, &expected, me).is_some() {
                            engine.handle_link_up(now, info);
                        }
                    }
                    Err(refusal) => {
                        conn.close(1u32.into(), refusal.reason.as_bytes());
                        engine.handle_refused(
                            now,
                            Some(expected),
                            Some(refusal.code),
                            &refusal.reason,
                            true,
                        );
                    }
                }
            }
            Net::OtherVersion {
                peer,
                cert,
                from,
                version,
                reply,
            } => {
                let Err(refusal) = engine.check_hello_version(version) else {
                    return; // not sent for our own version; dropping `reply` closes it
                };
                let peer = peer.or_else(|| match self.security {
                    Security::Mutual(_) => cert.map(|c| c.ident.name),
                    Security::Insecure { .. } => None,
                });
                warn!(peer = ?peer, %from, "refused: {}", refusal.reason);
                let reason = match peer {
                    Some(_) => refusal.reason.clone(),
                    None => format!("{} (from {from})", refusal.reason),
                };
                engine.handle_refused(now, peer, Some(refusal.code), &reason, true);
                if let Some(reply) = reply {
                    let _ = reply.send(refusal);
                }
            }
            Net::PeerRefused { peer, refusal } => {
                warn!(peer = %peer, "refused by peer: {}", refusal.reason);
                engine.handle_refused(now, Some(peer), Some(refusal.code), &refusal.reason, false);
            }
            Net::DialFailed { peer, reason, kind } => {
                debug!(peer = %peer, "dial failed: {reason}");
                match kind {
                    DialFail::Duplicate => engine.handle_dial_superseded(&peer),
                    DialFail::Unreachable => engine.handle_dial_failed(now, &peer, &reason, false),
                    DialFail::RefusedByPeer => {
                        engine.handle_refused(now, Some(peer), None, &reason, false)
                    }
                    DialFail::RefusedByUs => {
                        engine.handle_refused(now, Some(peer), None, &reason, true)
                    }
                }
            }
            Net::InboundStalled { from } => {
                engine.handle_inbound_stalled(now, &from.to_string());
            }
            Net::TlsRejected { claimed, reason } => {
                let name = claimed.and_then(|c| NodeName::new(c).ok());
                engine.handle_refused(now, name, None, &format!("TLS: {reason}"), true);
            }
            Net::Frame {
                peer,
                conn_id,
                frame,
            } => {
                if self.conns.get(&peer).is_some_and(|c| c.id == conn_id) {
                    engine.handle_frame(now, &peer, frame);
                }
            }
            Net::BadFrame {
                peer,
                conn_id,
                bytes,
            } => {
                if self.conns.get(&peer).is_some_and(|c| c.id == conn_id) {
                    engine.handle_frame_bytes(now, &peer, &bytes);
                }
            }
            Net::Datagram {
                peer,
                conn_id,
                bytes,
            } => {
                if self.conns.get(&peer).is_some_and(|c| c.id == conn_id) {
                    engine.handle_datagram(now, &peer, &bytes);
                }
            }
            Net::Closed {
                peer,
                conn_id,
                reason,
            } => {
                if self.conns.get(&peer).is_some_and(|c| c.id == conn_id) {
                    self.conns.remove(&peer);
                    engine.handle_link_down(now, &peer, &reason);
                }
            }
        }
    }

    fn on_command(&mut self, engine: &mut Engine, cmd: Command) {
        let now = self.now();
        match cmd {
            Command::Topology { reply } => {
                let mut t = engine.topology(now);
                if let Some(w) = &self.contract_warning {
                    t.warnings.push(w.clone());
                }
                let _ = reply.send(t);
            }
            Command::Members { reply } => {
                let _ = reply.send(engine.members());
            }
            Command::Clock { reply } => {
                let _ = reply.send(engine.clock());
            }
            Command::Ping { req, reply } => {
                let token = self.token(reply);
                let target = match NodeName::new(req.target.clone()) {
                    Ok(t) => t,
                    Err(e) => {
                        self.fail_token(token, format!("target {:?}: {e}", req.target));
                        return;
                    }
                };
                let from = match req.from.as_deref().map(NodeName::new).transpose() {
                    Ok(f) => f,
                    Err(e) => {
                        self.fail_token(token, format!("from: {e}"));
                        return;
                    }
                };
                engine.start_ping(
                    now,
                    token,
                    from,
                    target,
                    req.count,
                    Duration::from_millis(req.timeout_ms.clamp(1, 60_000)),
                );
            }
            Command::Probe { timeout_ms, reply } => {
                let token = self.token(reply);
                engine.start_probe_links(
                    now,
                    token,
                    Duration::from_millis(timeout_ms.clamp(1, 60_000)),
                );
            }
            Command::Forget { name, force, reply } => {
                let r = NodeName::new(name.clone())
                    .map_err(|e| format!("{name:?}: {e}"))
                    .and_then(|n| engine.forget(now, &n, force));
                let _ = reply.send(r);
            }
            Command::Certs { reply } => {
                let _ = reply.send(engine.certs(now));
            }
            Command::Reload { reply } => {
                let _ = reply.send(self.reload(engine, "clusterctl reload"));
            }
            Command::Secrets { reply } => {
                let _ = reply.send(engine.secrets());
            }
            Command::Secret { req, reply } => {
                let _ = reply.send(self.keyring_op(engine, now, &req));
            }
            Command::Sink {
                target,
                reset,
                timeout,
                reply,
            } => {
                let token = self.token(reply);
                engine.start_sink_read(now, token, target, reset, timeout);
            }
            Command::LoadFrom {
                from,
                target,
                req,
                reply,
            } => {
                let token = self.token(reply);
                let spec = LoadSpec {
                    target,
                    count: req.count,
                    size: req.size,
                    timeout_ms: req.timeout_ms,
                };
                engine.start_load_from(now, token, from, spec);
            }
            Command::LoadDone { handle, result } => engine.load_done(now, handle, result),
            Command::Metrics { reply } => {
                let _ = reply.send(MetricsSnapshot {
                    data_forwarded: DataStats::get(&self.data.stats.forwarded),
                    data_dropped: DataStats::get(&self.data.stats.dropped),
                    load_sent: DataStats::get(&self.data.stats.load_sent),
                    control_forwarded: DataStats::get(&self.data.stats.control_forwarded),
                    echo_answered: DataStats::get(&self.data.stats.echo_answered),
                    control_dropped: DataStats::get(&self.data.stats.control_dropped),
                    counters: engine.counters.clone(),
                    links_up: engine.linked_peers().len() as u64,
                    table_records: engine.table().len() as u64,
                    clock: engine.clock(),
                    health_score: u64::from(engine.health_score()),
                    wire: self.meter.totals(),
                });
            }
        }
    }

    /// `clusterctl secret install|use|remove` on this node; the keyring is persisted before the
    /// answer.
    fn keyring_op(
        &mut self,
        engine: &mut Engine,
        now: Duration,
        req: &SecretRequest,
    ) -> Result<KeyringReport, String> {
        let key = || -> Result<KeyId, String> {
            let text = req.key.as_deref().ok_or("this operation needs a key id")?;
            text.parse().map_err(|e: SecretError| e.to_string())
        };
        let changed = match req.op.as_str() {
            "install" => {
                let file = req
                    .file
                    .as_deref()
                    .ok_or("install needs the path of a secret file")?;
                let secret = crate::config::load_secret(std::path::Path::new(file), "file")
                    .map_err(|e| format!("{} — {}", e.problem, e.fix))?;
                engine.install_key(now, secret).map_err(|e| e.to_string())?
            }
            "use" => engine.use_key(now, key()?).map_err(|e| e.to_string())?,
            "remove" => {
                engine.remove_key(now, key()?).map_err(|e| e.to_string())?;
                true
            }
            other => {
                return Err(format!(
                    "unknown operation {other:?}: use install, use or remove"
                ))
            }
        };
        if changed {
            crate::keyring::store(&self.data_dir, engine.keyring()).map_err(|e| {
                format!(
                    "the keyring changed but could not be written to {}: {e}",
                    self.data_dir.display()
                )
            })?;
        }
        let ring = engine.keyring();
        Ok(KeyringReport {
            node: engine.me().name.to_string(),
            primary: ring.primary().to_string(),
            keys: ring.ids().iter().map(ToString::to_string).collect(),
            changed,
        })
    }

    /// Re-reads the certificate, key and CA bundle, and compares the contract on disk with the
    /// one in use (a changed contract is reported, not applied: it needs a restart).
    fn reload(&mut self, engine: &mut Engine, why: &str) -> ReloadReport {
        let mut report = self.reload_tls(engine, why);
        report.contract_changed = self.check_contract(why);
        report
    }

    /// Compares the contract file with the contract in use; a difference is recorded once per
    /// distinct file content as a `contract-changed` event and kept for `topology`'s warnings.
    fn check_contract(&mut self, why: &str) -> Option<String> {
        let on_disk = match crate::config::load_contract(&self.contract_path) {
            Ok(c) => c.hash().to_string(),
            Err(e) => {
                let msg = format!(
                    "the contract on disk cannot be used ({e}); the contract in use ({}) stays",
                    self.contract_hash
                );
                self.note_contract(why, msg.clone());
                return Some(msg);
            }
        };
        if on_disk == self.contract_hash {
            self.contract_warning = None;
            return None;
        }
        let msg = format!(
            "the contract on disk ({}, {on_disk}) differs from the one in use ({}): restart this node to apply it (live contract changes are not supported yet)",
            self.contract_path.display(),
            self.contract_hash
        );
        self.note_contract(why, msg.clone());
        Some(msg)
    }

    fn note_contract(&mut self, why: &str, msg: String) {
        if self.contract_warning.as_deref() != Some(msg.as_str()) {
            self.events.record_now(
                EventKind::ContractChanged,
                Some(self.ident.name.to_string()),
                format!("{msg} (found by {why})"),
            );
        }
        self.contract_warning = Some(msg);
    }

    /// Re-reads the certificate, key and CA bundle. New handshakes use the new material; open
    /// links stay up. Bad new files are refused (with an event) and the old material stays.
    fn reload_tls(&mut self, engine: &mut Engine, why: &str) -> ReloadReport {
        let node = self.ident.name.to_string();
        let Some(files) = self.tls_files.clone() else {
            return ReloadReport {
                node,
                reloaded: false,
                reason: Some(
                    "this node runs insecure = true: there is no certificate to reload".into(),
                ),
                cert: None,
                contract_changed: None,
            };
        };
        let attempt = || -> Result<(Security, quinn::ServerConfig, quinn::ClientConfig), String> {
            let m =
                TlsMaterial::load(&files.ca, &files.cert, &files.key).map_err(|e| e.to_string())?;
            let id = &m.identity;
            if id.ident != self.ident || id.cluster != self.cluster {
                return Err(format!(
                    "the new certificate names {} ({}) of site {} in cluster {}, not this node",
                    id.ident.name, id.ident.role, id.ident.site, id.cluster
                ));
            }
            let wall = SystemTime::now();
            if id.not_after <= wall {
                return Err("the new certificate has expired".into());
            }
            if id.not_before > wall {
                return Err("the new certificate is not valid yet".into());
            }
            let security = Security::Mutual(Arc::new(m));
            let (server, client) =
                tls::endpoint_configs(&security, &self.cluster, self.sink.clone())
                    .map_err(|e| e.to_string())?;
            Ok((security, server, client))
        };
        let now = self.now();
        let at_ms = self.wall_base_ms + now.as_millis() as u64;
        let (reloaded, reason) = match attempt() {
            Ok((security, server, client)) => {
                self.endpoint.set_server_config(Some(server));
                self.client_cfg = client;
                let summary = match &security {
                    Security::Mutual(m) => Some(m.summary()),
                    Security::Insecure { .. } => None,
                };
                self.security = security;
                if let Some(c) = &summary {
                    self.events.record(EventOut {
                        kind: EventKind::TlsReloaded,
                        node: Some(self.ident.name.clone()),
                        peer: None,
                        reason: format!(
                            "reloaded ({why}): certificate {} issued by CA {}, trusting CAs {}; open links stay up",
                            c.leaf,
                            c.issuer,
                            c.trusts.join(",")
                        ),
                        at_ms,
                    });
                }
                engine.set_cert(now, summary);
                (true, None)
            }
            Err(reason) => {
                self.events.record(EventOut {
                    kind: EventKind::TlsReloaded,
                    node: Some(self.ident.name.clone()),
                    peer: None,
                    reason: format!(
                        "refused a reload ({why}): {reason}; the material in use stays"
                    ),
                    at_ms,
                });
                (false, Some(reason))
            }
        };
        ReloadReport {
            node,
            reloaded,
            reason,
            cert: engine
                .certs(now)
                .node_certs
                .into_iter()
                .find(|n| n.name == self.ident.name.as_str())
                .and_then(|n| n.cert),
            contract_changed: None,
        }
    }

    fn token(&mut self, reply: oneshot::Sender<Reply>) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        self.pending.insert(t, reply);
        t
    }

    fn fail_token(&mut self, token: u64, why: String) {
        // Dropping the sender makes the control handler answer 400 with this reason logged.
        warn!("bad request: {why}");
        self.pending.remove(&token);
    }
}

/// A value both ends of this TLS session derive and nobody else can (a TLS exporter): the cluster
/// secret proofs are bound to it, so they cannot be replayed on another connection.
fn session_binding(conn: &quinn::Connection) -> Vec<u8> {
    let mut out = vec![0u8; BINDING_LEN];
    // Exporting from an established QUIC-TLS session cannot fail for a 32-byte output; if it
    // ever did, the all-zero binding makes the peer's proof check fail (a refusal, not a hole).
    let _ = conn.export_keying_material(&mut out, EXPORTER_LABEL, b"");
    out
}

/// Modification times of the certificate, key and CA files (None where unreadable).
fn tls_mtimes(f: &TlsFiles) -> Vec<Option<SystemTime>> {
    [&f.ca, &f.cert, &f.key]
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

async fn resolve(addr: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = addr.parse() {
        return Ok(a);
    }
    tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr} resolves to no address"))
}

fn classify(e: &quinn::ConnectionError) -> DialFail {
    match e {
        quinn::ConnectionError::ConnectionClosed(_) => DialFail::RefusedByPeer,
        quinn::ConnectionError::TransportError(_) => DialFail::RefusedByUs,
        quinn::ConnectionError::ApplicationClosed(c) if c.error_code == CLOSE_DUPLICATE.into() => {
            DialFail::Duplicate
        }
        quinn::ConnectionError::ApplicationClosed(_) => DialFail::RefusedByPeer,
        _ => DialFail::Unreachable,
    }
}

async fn dial(
    endpoint: quinn::Endpoint,
    client_cfg: quinn::ClientConfig,
    peer: NodeName,
    addr: String,
    hello: HelloMaker,
    net: mpsc::Sender<Net>,
) {
    let fail = |reason: String, kind: DialFail| Net::DialFailed {
        peer: peer.clone(),
        reason,
        kind,
    };
    let msg = async {
        let sa = resolve(&addr)
            .await
            .map_err(|r| fail(r, DialFail::Unreachable))?;
        let connecting = endpoint
            .connect_with(client_cfg, sa, peer.as_str())
            .map_err(|e| fail(tls::describe_connect_error(&e), DialFail::Unreachable))?;
        let conn = match timeout(HANDSHAKE_TIMEOUT, connecting).await {
            Err(_) => {
                return Err(fail(
                    format!("no answer from {sa} within {HANDSHAKE_TIMEOUT:?}"),
                    DialFail::Unreachable,
                ))
            }
            Ok(Err(e)) => return Err(fail(tls::describe_connection_error(&e), classify(&e))),
            Ok(Ok(c)) => c,
        };
        let binding = session_binding(&conn);
        let hello = hello.make(&binding);
        let exchange = async {
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| (tls::describe_connection_error(&e), classify(&e)))?;
            send.write_all(&Handshake::Hello(hello).encode())
                .await
                .map_err(|e| (format!("sending hello: {e}"), DialFail::Unreachable))?;
            let _ = send.finish();
            let bytes = recv.read_to_end(MAX_HANDSHAKE).await.map_err(|e| match e {
                quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(ce)) => {
                    (tls::describe_connection_error(&ce), classify(&ce))
                }
                other => (format!("reading ack: {other}"), DialFail::Unreachable),
            })?;
            Ok(Handshake::decode_answer(&bytes))
        };
        match timeout(HANDSHAKE_TIMEOUT, exchange).await {
            Err(_) => {
                conn.close(1u32.into(), b"hello timeout");
                Err(fail(
                    "no answer to hello in time".into(),
                    DialFail::Unreachable,
                ))
            }
            Ok(Err((reason, kind))) => {
                conn.close(1u32.into(), b"hello failed");
                Err(fail(reason, kind))
            }
            Ok(Ok(Err(WireError::Version(version)))) => {
                conn.close(1u32.into(), b"refused");
                Ok(Net::OtherVersion {
                    peer: Some(peer.clone()),
                    cert: None,
                    from: conn.remote_address(),
                    version,
                    reply: None,
                })
            }
            Ok(Ok(Err(e))) => {
                conn.close(1u32.into(), b"hello failed");
                Err(fail(
                    format!("bad answer to hello: {e}"),
                    DialFail::Unreachable,
                ))
            }
            Ok(Ok(Ok(Handshake::Ack(ack)))) => {
                let cert = tls::peer_identity(&conn);
                Ok(Net::Ack {
                    conn,
                    expected: peer.clone(),
                    ack,
                    cert,
                    binding,
                })
            }
            Ok(Ok(Ok(Handshake::Refuse(refusal)))) => {
                conn.close(1u32.into(), b"refused");
                Ok(Net::PeerRefused {
                    peer: peer.clone(),
                    refusal,
                })
            }
            Ok(Ok(Ok(Handshake::Hello(_)))) => {
                conn.close(1u32.into(), b"protocol error");
                Err(fail(
                    "peer answered a hello with a hello".into(),
                    DialFail::Unreachable,
                ))
            }
        }
    }
    .await;
    let msg = match msg {
        Err(Net::DialFailed {
            peer,
            reason,
            kind: DialFail::Unreachable,
        }) => {
            // Silence may be our own: a send this node's kernel refuses (a firewall's output
            // rule, no route) only ever shows as a timeout to QUIC.
            let local = endpoint.local_addr().ok().map(|a| a.ip());
            let reason = match resolve(&addr)
                .await
                .ok()
                .and_then(|to| local_send_error(local, to))
            {
                Some(e) => format!("{LOCAL_SEND_ERROR}: {e} ({reason})"),
                None => reason,
            };
            Net::DialFailed {
                peer,
                reason,
                kind: DialFail::Unreachable,
            }
        }
        other => other.unwrap_or_else(|m| m),
    };
    let _ = net.send(msg).await;
}

/// Whether this node's own kernel refuses a UDP send from `from` to `to` (a firewall rule on
/// the output hook: EPERM; no route: ENETUNREACH): one byte to the peer's cluster port (a QUIC
/// endpoint drops it as too short). The error's name, or None when the send goes out.
pub(crate) fn local_send_error(from: Option<std::net::IpAddr>, to: SocketAddr) -> Option<String> {
    let bind_ip = from.unwrap_or(match to {
        SocketAddr::V4(_) => std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    });
    let sock = std::net::UdpSocket::bind(SocketAddr::new(bind_ip, 0)).ok()?;
    let _ = sock.set_nonblocking(true);
    match sock.send_to(&[0u8], to) {
        Ok(_) => None,
        Err(e) => {
            let name = match e.raw_os_error() {
                Some(1) => "EPERM".to_string(),
                Some(13) => "EACCES".to_string(),
                Some(101) => "ENETUNREACH".to_string(),
                Some(113) => "EHOSTUNREACH".to_string(),
                Some(11) => return None, // EAGAIN: the send was not refused
                _ => e.to_string(),
            };
            Some(name)
        }
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, net: mpsc::Sender<Net>) {
    let limit = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    while let Some(incoming) = endpoint.accept().await {
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            incoming.refuse();
            continue;
        };
        let net = net.clone();
        tokio::spawn(async move {
            accept_one(incoming, net).await;
            drop(permit);
        });
    }
}

async fn accept_one(incoming: quinn::Incoming, net: mpsc::Sender<Net>) {
    let remote = incoming.remote_address();
    let conn = match timeout(HANDSHAKE_TIMEOUT, incoming).await {
        Ok(Ok(c)) => c,
        // Either it times out here, or the dialer gives up first and its close (which still
        // gets through) says so: an application close during the handshake.
        Ok(Err(quinn::ConnectionError::TimedOut)) | Err(_) => {
            debug!(%remote, "incoming handshake stalled");
            let _ = net.send(Net::InboundStalled { from: remote }).await;
            return;
        }
        Ok(Err(quinn::ConnectionError::ConnectionClosed(c)))
            if c.error_code == quinn::TransportErrorCode::APPLICATION_ERROR =>
        {
            // The peer's packets reach us but the handshake never completes: our answers do
            // not reach it. One half of the evidence for a one-way link.
            debug!(%remote, "incoming handshake stalled");
            let _ = net.send(Net::InboundStalled { from: remote }).await;
            return;
        }
        Ok(Err(e)) if tls::refused_for_no_client_certificate(&e) => {
            // Refused by our TLS layer before any certificate verifier ran: counted and
            // reported here, with the address (the verifier reports every other refusal).
            let reason = format!(
                "peer at {remote} presented no client certificate (this node requires mutual TLS)"
            );
            warn!(%remote, "refused: {reason}");
            let _ = net
                .send(Net::TlsRejected {
                    claimed: None,
                    reason,
                })
                .await;
            return;
        }
        Ok(Err(e)) => {
            debug!(%remote, "incoming handshake failed: {}", tls::describe_connection_error(&e));
            return;
        }
    };
    let hello = async {
        let (send, mut recv) = conn.accept_bi().await.ok()?;
        let bytes = recv.read_to_end(MAX_HANDSHAKE).await.ok()?;
        Some((send, bytes))
    };
    let hello = match timeout(HANDSHAKE_TIMEOUT, hello).await {
        Ok(Some((send, bytes))) => match Handshake::version_of(&bytes) {
            Ok(version) if version != PROTOCOL_VERSION => {
                refuse_other_version(conn, send, remote, version, net).await;
                return;
            }
            _ => Ok(Some((send, Handshake::decode(&bytes)))),
        },
        Ok(None) => Ok(None),
        Err(elapsed) => Err(elapsed),
    };
    let (mut send, hello) = match hello {
        Ok(Some((send, Ok(Handshake::Hello(h))))) => (send, h),
        Ok(Some((_, Ok(_)))) | Ok(Some((_, Err(_)))) => {
            warn!(%remote, "dropped a connection whose first message is not a hello");
            conn.close(1u32.into(), b"expected hello");
            return;
        }
        _ => {
            conn.close(1u32.into(), b"no hello");
            return;
        }
    };
    let cert = tls::peer_identity(&conn);
    let binding = session_binding(&conn);
    let (tx, rx) = oneshot::channel();
    if net
        .send(Net::Hello {
            conn: conn.clone(),
            hello,
            cert,
            binding,
            reply: tx,
        })
        .await
        .is_err()
    {
        return;
    }
    match rx.await {
        Ok(Ok(ack)) => {
            let _ = send.write_all(&Handshake::Ack(ack).encode()).await;
            let _ = send.finish();
        }
        Ok(Err(refusal)) => {
            let _ = send.write_all(&Handshake::Refuse(refusal).encode()).await;
            let _ = send.finish();
            // Let the refusal reach the dialer before the connection goes.
            let _ = timeout(Duration::from_secs(2), send.stopped()).await;
            conn.close(1u32.into(), b"refused");
        }
        Err(_) => conn.close(1u32.into(), b"shutting down"),
    }
}

/// Acceptor side: the dialer's hello is of protocol `version`, not ours. The owner reports the
/// refusal; it goes back under the dialer's version byte, which the dialer can read.
async fn refuse_other_version(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    from: SocketAddr,
    version: u8,
    net: mpsc::Sender<Net>,
) {
    let (tx, rx) = oneshot::channel();
    let sent = net
        .send(Net::OtherVersion {
            peer: None,
            cert: tls::peer_identity(&conn),
            from,
            version,
            reply: Some(tx),
        })
        .await;
    match (sent, rx.await) {
        (Ok(()), Ok(refusal)) => {
            let _ = send
                .write_all(&Handshake::encode_refusal(&refusal, version))
                .await;
            let _ = send.finish();
            // Let the refusal reach the dialer before the connection goes.
            let _ = timeout(Duration::from_secs(2), send.stopped()).await;
            conn.close(1u32.into(), b"refused");
        }
        _ => conn.close(1u32.into(), b"shutting down"),
    }
}

/// Accepts the lane streams of a connection (each read by its own task, see
/// [`DataPath::read_lane`]) and its datagrams; reports the close to the owner.
async fn reader(
    conn: quinn::Connection,
    peer: NodeName,
    conn_id: u64,
    net: mpsc::Sender<Net>,
    bulk: mpsc::Sender<ToOwner>,
    data: DataPath,
) {
    let limit = Arc::new(Semaphore::new(LANES_IN_FLIGHT));
    let reason = loop {
        tokio::select! {
            s = conn.accept_uni() => match s {
                Ok(recv) => {
                    let Ok(permit) = limit.clone().try_acquire_owned() else {
                        warn!(peer = %peer, "closed a link whose peer opened more than {LANES_IN_FLIGHT} lanes");
                        conn.close(4u32.into(), b"too many lanes");
                        break "the peer opened too many lanes".to_string();
                    };
                    let read = data.clone().read_lane(conn.clone(), recv, peer.clone(), conn_id, net.clone(), bulk.clone());
                    tokio::spawn(async move {
                        read.await;
                        drop(permit);
                    });
                }
                Err(e) => break tls::describe_connection_error(&e),
            },
            d = conn.read_datagram() => match d {
                Ok(bytes) => {
                    let _ = net.send(Net::Datagram { peer: peer.clone(), conn_id, bytes }).await;
                }
                Err(e) => break tls::describe_connection_error(&e),
            },
        }
    };
    let reason = match conn.close_reason() {
        Some(quinn::ConnectionError::TimedOut) => {
            match local_send_error(conn.local_ip(), conn.remote_address()) {
                Some(e) => format!("{LOCAL_SEND_ERROR}: {e} ({reason})"),
                None => reason,
            }
        }
        _ => reason,
    };
    let _ = net
        .send(Net::Closed {
            peer,
            conn_id,
            reason,
        })
        .await;
}

/// The one writer of the snapshot while the agent runs: it saves the latest table it was sent
/// (coalescing bursts), and returns after saving the last value once the sender is dropped.
async fn persister(dir: std::path::PathBuf, mut rx: watch::Receiver<Option<Vec<NodeRecord>>>) {
    while rx.changed().await.is_ok() {
        let Some(records) = rx.borrow_and_update().clone() else {
            continue;
        };
        let dir = dir.clone();
        let res = tokio::task::spawn_blocking(move || persist::store(&dir, &records)).await;
        if let Ok(Err(e)) = res {
            error!("cannot write the node table snapshot: {e}");
        }
        // Coalesce bursts of changes.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
