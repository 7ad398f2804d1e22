//! The coordinator's open channels to agents, and what they cost.
//!
//! Each open channel is an HTTP/2 connection with its own read and write
//! buffers plus tonic's request buffer and its task: ~40 KB of coordinator
//! memory (measured, see docs/performance.md), and an HTTP/2 keep-alive ping
//! every 20 s. Kept forever, one per agent, they were most of the
//! coordinator's memory after a rollout and per-node work when idle. So a
//! channel is opened on first use, a sweeper closes channels unused for
//! [`IDLE_CLOSE`] and stops itself when none is left (an idle coordinator
//! holds no agent connection and does no work for one), and an operator
//! may cap how many are open (`--agent-channels`): beyond it the least
//! recently used are closed, trading reconnects for memory. A call holds its
//! own clone, so closing the pool's copy never cuts a call short.
//!
//! The pool also counts the agents it has been asked for (a hash each,
//! attached agents included): the in-flight bound grows with the fleet, not
//! with what happens to be open.

use std::{
    collections::{HashMap, HashSet},
    hash::{BuildHasher, RandomState},
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use tokio::time::Instant;
use tonic::transport::Channel;

/// A channel unused this long is closed.
pub const IDLE_CLOSE: Duration = Duration::from_secs(15);
/// How often the sweeper looks for idle channels while any is open.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// The fewest channels kept open, whatever the in-flight bound.
const MIN_OPEN: usize = 64;

/// Agent address and node id (the TLS server name is the node id).
pub type Key = (String, String);

struct Open {
    channel: Channel,
    last_used: Instant,
}

#[derive(Default)]
struct State {
    open: HashMap<Key, Open>,
    /// Hashes of every key asked for (how many agents the fleet has).
    seen: HashSet<u64>,
    sweeping: bool,
}

/// Shared, cheap to clone.
#[derive(Clone, Default)]
pub struct AgentChannels {
    state: Arc<Mutex<State>>,
    hasher: RandomState,
}

impl AgentChannels {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update is a single map operation: a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts `key` among the agents asked for (attached agents too, which
    /// never get a channel); returns how many distinct agents that makes.
    pub fn note(&self, key: &Key) -> usize {
        let hash = self.hasher.hash_one(key);
        let mut state = self.lock();
        state.seen.insert(hash);
        state.seen.len()
    }

    /// The open channel for `key`, or one made by `open` (then kept, closing
    /// the least recently used beyond `max_open`, at least [`MIN_OPEN`]).
    pub fn get_or_open<E>(
        &self,
        key: &Key,
        max_open: usize,
        open: impl FnOnce() -> Result<Channel, E>,
    ) -> Result<Channel, E> {
        let now = Instant::now();
        let mut state = self.lock();
        if let Some(entry) = state.open.get_mut(key) {
            entry.last_used = now;
            return Ok(entry.channel.clone());
        }
        let channel = open()?;
        state.open.insert(key.clone(), Open { channel: channel.clone(), last_used: now });
        let max_open = max_open.max(MIN_OPEN);
        if state.open.len() > max_open {
            close_least_recent(&mut state.open, max_open / 2);
        }
        if !state.sweeping && tokio::runtime::Handle::try_current().is_ok() {
            state.sweeping = true;
            tokio::spawn(sweep(Arc::downgrade(&self.state)));
        }
        Ok(channel)
    }

    /// Channels open now.
    pub fn open_count(&self) -> usize {
        self.lock().open.len()
    }
}

/// Keeps the `keep` most recently used (amortised: one selection per
/// `max_open / 2` new channels, not a scan per call).
fn close_least_recent(open: &mut HashMap<Key, Open>, keep: usize) {
    let mut times: Vec<Instant> = open.values().map(|o| o.last_used).collect();
    let Some(cut) = times.len().checked_sub(keep.max(1)) else { return };
    let (_, nth, _) = times.select_nth_unstable(cut);
    let threshold = *nth;
    open.retain(|_, o| o.last_used >= threshold);
}

/// Closes channels idle past [`IDLE_CLOSE`]; ends once none is open (the
/// next new channel starts another) or the pool is gone.
async fn sweep(state: Weak<Mutex<State>>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(state) = state.upgrade() else { return };
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        state.open.retain(|_, o| o.last_used.elapsed() < IDLE_CLOSE);
        if state.open.is_empty() {
            state.sweeping = false;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: usize) -> Key {
        (format!("n{i}"), format!("127.0.0.1:{}", 1000 + i))
    }

    fn lazy(i: usize) -> Result<Channel, String> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", key(i).1));
        Ok(endpoint.map_err(|e| e.to_string())?.connect_lazy())
    }

    #[tokio::test(start_paused = true)]
    async fn a_channel_is_reused_and_agents_are_counted_once() {
        let pool = AgentChannels::new();
        let mut opened = 0;
        for _ in 0..3 {
            pool.get_or_open(&key(1), 100, || {
                opened += 1;
                lazy(1)
            })
            .expect("channel");
            assert_eq!(pool.note(&key(1)), 1);
        }
        assert_eq!(opened, 1);
        assert_eq!(pool.open_count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn beyond_the_cap_the_least_recently_used_are_closed_and_agents_still_counted() {
        let pool = AgentChannels::new();
        let mut seen = 0;
        for i in 0..300 {
            tokio::time::advance(Duration::from_millis(1)).await;
            pool.get_or_open(&key(i), 100, || lazy(i)).expect("channel");
            seen = pool.note(&key(i));
            // Node 0 is used all along: it is never the least recent.
            pool.get_or_open(&key(0), 100, || lazy(0)).expect("channel");
        }
        assert_eq!(seen, 300, "every agent asked for is counted, open or not");
        assert!(pool.open_count() <= 100, "{} open", pool.open_count());
        let state = pool.lock();
        assert!(state.open.contains_key(&key(0)), "the busiest agent kept its channel");
        assert!(state.open.contains_key(&key(299)), "the newest kept its channel");
        assert!(!state.open.contains_key(&key(1)), "an old one was closed");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_channels_are_closed_and_the_sweeper_stops() {
        let pool = AgentChannels::new();
        for i in 0..10 {
            pool.get_or_open(&key(i), 100, || lazy(i)).expect("channel");
        }
        tokio::time::sleep(IDLE_CLOSE / 2).await;
        pool.get_or_open(&key(0), 100, || lazy(0)).expect("channel");
        tokio::time::sleep(IDLE_CLOSE / 2 + SWEEP_EVERY).await;
        assert_eq!(pool.open_count(), 1, "only the one used since is open");
        tokio::time::sleep(IDLE_CLOSE + SWEEP_EVERY).await;
        assert_eq!(pool.open_count(), 0);
        assert!(!pool.lock().sweeping, "no sweeper runs with nothing open");
        pool.get_or_open(&key(3), 100, || lazy(3)).expect("channel");
        assert!(pool.lock().sweeping, "a new channel starts it again");
    }
}
