//! Wire counters: the UDP traffic of this node's QUIC connections, as quinn counts it.
//!
//! Every connection that reached the hello/ack (accepted or refused there) is tracked from then
//! until it closes; its final figures then move into a running total, so the totals only grow
//! while the agent runs. Bytes are UDP payload (QUIC packets, TLS handshake included); IP and
//! UDP headers are not counted (add 28 bytes per datagram for IPv4). Connections that failed
//! before the hello (TLS refused, timed out) are not counted.
//!
//! The task that waits for a tracked connection to close holds a handle to it, so such a
//! connection does not close when the agent drops its own handles: the agent closes every
//! connection explicitly (refusals, duplicates, `Output::Close`, shutdown), which this relies on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Most connections tracked at once; beyond it new ones go uncounted (a warning says so).
pub const MAX_TRACKED: usize = 4096;

/// UDP datagrams and their payload bytes, sent and received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WireTotals {
    pub tx_bytes: u64,
    pub tx_datagrams: u64,
    pub rx_bytes: u64,
    pub rx_datagrams: u64,
}

impl WireTotals {
    fn of(conn: &quinn::Connection) -> WireTotals {
        let s = conn.stats();
        WireTotals {
            tx_bytes: s.udp_tx.bytes,
            tx_datagrams: s.udp_tx.datagrams,
            rx_bytes: s.udp_rx.bytes,
            rx_datagrams: s.udp_rx.datagrams,
        }
    }

    fn add(&mut self, o: WireTotals) {
        self.tx_bytes = self.tx_bytes.saturating_add(o.tx_bytes);
        self.tx_datagrams = self.tx_datagrams.saturating_add(o.tx_datagrams);
        self.rx_bytes = self.rx_bytes.saturating_add(o.rx_bytes);
        self.rx_datagrams = self.rx_datagrams.saturating_add(o.rx_datagrams);
    }
}

/// The wire counters of one agent: live connections plus the total of closed ones.
#[derive(Debug, Default)]
pub struct WireMeter {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    closed: WireTotals,
    live: HashMap<usize, quinn::Connection>,
}

impl WireMeter {
    /// Counts `conn` from now until it closes (once, however often it is passed). Needs a tokio
    /// runtime: a task waits for the close.
    pub fn track(self: &Arc<Self>, conn: &quinn::Connection) {
        let id = conn.stable_id();
        {
            let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            if g.live.contains_key(&id) {
                return;
            }
            if g.live.len() >= MAX_TRACKED {
                tracing::warn!("{MAX_TRACKED} connections tracked: wire counters skip this one");
                return;
            }
            g.live.insert(id, conn.clone());
        }
        let meter = Arc::clone(self);
        let conn = conn.clone();
        tokio::spawn(async move {
            conn.closed().await;
            let mut g = meter.inner.lock().unwrap_or_else(|p| p.into_inner());
            // Moving the final figures under the lock: never counted twice nor missed.
            if g.live.remove(&id).is_some() {
                let last = WireTotals::of(&conn);
                g.closed.add(last);
            }
        });
    }

    /// Totals since the agent started: closed connections plus the live ones' figures so far.
    pub fn totals(&self) -> WireTotals {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut t = g.closed;
        for c in g.live.values() {
            t.add(WireTotals::of(c));
        }
        t
    }
}
