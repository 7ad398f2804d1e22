//! The operator's read path: "ask the leader's engine, or read the store",
//! decided here once for every read, so the gRPC handlers only decode, call
//! one of these and encode.
//!
//! Every coordinator serves reads: live from the engine while it leads (an
//! active rollout's latest snapshot), from the store otherwise (a follower,
//! or a finished rollout), so an operator can follow a rollout on any
//! coordinator and across a fail-over ([`Cluster::watch`]).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    drift::{BuildStacks, ProcessDrift},
    error::{Error, Result},
    planner::Selector,
    registry::{self, NodeView},
    rollout::{Rollout, RolloutState},
    store::{AuditEntry, FreezeRecord, Store},
    term::{Cluster, Term},
};

/// How often a watch served from the store (a follower's) polls it.
const STORE_POLL: Duration = Duration::from_millis(300);

/// A rollout as an operator sees it: its state, and whether the fleet freeze
/// holds it (which the state alone does not say).
#[derive(Debug, Clone)]
pub struct RolloutView {
    /// Shared with the engine's snapshot when live: a watch copies no state.
    pub state: Arc<RolloutState>,
    pub frozen: bool,
}

/// A node as `nodes list` shows it: the node, the active rollout that owns
/// it, and each process's stack against its build's.
#[derive(Debug, Clone)]
pub struct NodeListing {
    pub node: NodeView,
    pub owner: Option<String>,
    pub drift: Vec<ProcessDrift>,
}

/// Which page of `nodes list`: after the node id a previous page ended on,
/// at most `size` nodes (0: no count limit).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageRequest {
    pub after: Option<String>,
    pub size: usize,
}

/// One page of nodes; `next` is where the next page starts after (None: the last page).
#[derive(Debug, Clone)]
pub struct NodePage {
    pub nodes: Vec<NodeListing>,
    pub next: Option<String>,
    pub summary: NodesSummary,
}

/// Every matching node counted by liveness and by build.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodesSummary {
    pub total: usize,
    pub by_liveness: BTreeMap<String, usize>,
    pub by_build: BTreeMap<String, usize>,
}

impl NodesSummary {
    pub fn of<'a>(nodes: impl Iterator<Item = &'a NodeView>) -> Self {
        let mut summary = NodesSummary::default();
        for node in nodes {
            summary.total += 1;
            *summary.by_liveness.entry(node.liveness.name().to_string()).or_default() += 1;
            let mut builds = node.candidate().builds;
            builds.dedup();
            for build in builds {
                *summary.by_build.entry(build).or_default() += 1;
            }
        }
        summary
    }
}

/// A rollout as the store has it (what a follower serves, and finished rollouts).
pub async fn stored_rollout(store: &dyn Store, id: &str) -> Result<RolloutState> {
    let rollout = store.rollout(id).await?.ok_or_else(|| Error::NotFound { what: "rollout", id: id.to_string() })?;
    let nodes = store.rollout_nodes(id).await?;
    Ok(RolloutState::from_store(rollout, nodes))
}

/// Newest first (ties by id), unfinished only with `active_only`, at most `limit`.
fn newest(mut all: Vec<Rollout>, active_only: bool, limit: usize) -> Vec<Rollout> {
    all.retain(|r| !active_only || !r.phase.is_terminal());
    all.sort_by(|a, b| b.created_at_ms.cmp(&a.created_at_ms).then_with(|| b.id.cmp(&a.id)));
    all.truncate(limit);
    all
}

/// One page of the audit log, newest first, and the `before` of the next
/// (older) page: `None` when there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditPage {
    pub records: Vec<AuditEntry>,
    pub next_before: Option<u64>,
}

impl Cluster {
    /// A build's patch stack with its rollouts (from the store, on any coordinator).
    pub async fn stack(&self, build: &str) -> Result<Vec<crate::stack::StackLine>> {
        crate::stack::listing(self.store.as_ref(), build).await
    }

    /// At most `limit` audit entries older than `before` (from the store, on
    /// any coordinator).
    pub async fn audit(&self, limit: usize, before: Option<u64>) -> Result<AuditPage> {
        // One more than asked: whether an older page exists, without a second read.
        let mut records = self.store.audit(limit.saturating_add(1), before).await?;
        let next_before =
            if records.len() > limit { limit.checked_sub(1).and_then(|i| records.get(i)).map(|e| e.seq) } else { None };
        records.truncate(limit);
        Ok(AuditPage { records, next_before })
    }

    /// The fleet freeze: the leader's, or the stored one.
    pub async fn freeze(&self) -> Result<Option<FreezeRecord>> {
        match self.term() {
            Some(term) => Ok(term.engine.freeze_status()),
            None => Ok(self.store.freeze().await?),
        }
    }

    /// Whether the fleet is frozen (unknown counts as not: it only annotates reads).
    pub async fn frozen(&self) -> bool {
        self.freeze().await.ok().flatten().is_some()
    }

    /// `state` with the freeze flag an operator is shown beside it.
    pub async fn view(&self, state: impl Into<Arc<RolloutState>>) -> RolloutView {
        RolloutView { frozen: self.frozen().await, state: state.into() }
    }

    /// A rollout's current state: live on the leader, from the store elsewhere.
    pub async fn rollout(&self, id: &str) -> Result<RolloutState> {
        match self.term() {
            Some(term) => term.engine.get(id).await,
            None => stored_rollout(self.store.as_ref(), id).await,
        }
    }

    /// Rollouts newest first; unfinished ones come with their node states.
    pub async fn rollouts(&self, active_only: bool, limit: usize) -> Result<Vec<RolloutState>> {
        let term = self.term();
        let mut out = Vec::new();
        for rollout in newest(self.store.rollouts().await?, active_only, limit) {
            if let Some(live) = term.as_ref().and_then(|t| t.engine.snapshot(&rollout.id)) {
                out.push(live);
                continue;
            }
            if rollout.phase.is_terminal() {
                out.push(RolloutState { rollout, nodes: BTreeMap::new() });
            } else {
                let nodes = self.store.rollout_nodes(&rollout.id).await?;
                out.push(RolloutState::from_store(rollout, nodes));
            }
        }
        Ok(out)
    }

    /// One page of the nodes matching `selector`, in node id order, each
    /// with the active rollout holding it and its processes' drift, and the
    /// summary of every match. A follower shows the stored fleet, liveness
    /// left to the leader. `fits` is asked about each listing after the
    /// page's first (which is always taken) and ends the page at the first
    /// `false`: what fits one answer is the transport's to say.
    pub async fn nodes_page(
        &self,
        selector: &Selector,
        page: &PageRequest,
        mut fits: impl FnMut(&NodeListing) -> bool,
    ) -> Result<NodePage> {
        let mut owned = self.owned_nodes(selector).await?;
        owned.sort_by(|a, b| a.0.status.node_id.cmp(&b.0.status.node_id));
        let summary = NodesSummary::of(owned.iter().map(|(n, _)| n));
        let start = match &page.after {
            Some(after) => owned.partition_point(|(n, _)| n.status.node_id.as_str() <= after.as_str()),
            None => 0,
        };
        let mut stacks = BuildStacks::new(self.store.as_ref());
        let mut nodes: Vec<NodeListing> = Vec::new();
        let mut next = None;
        for (node, owner) in owned.into_iter().skip(start) {
            if page.size > 0 && nodes.len() >= page.size {
                next = nodes.last().map(|l| l.node.status.node_id.clone());
                break;
            }
            let drift = stacks.judge(&node.status, owner.is_some()).await;
            let listing = NodeListing { node, owner, drift };
            if !nodes.is_empty() && !fits(&listing) {
                next = nodes.last().map(|l| l.node.status.node_id.clone());
                break;
            }
            nodes.push(listing);
        }
        Ok(NodePage { nodes, next, summary })
    }

    /// Nodes matching `selector`, with the active rollout holding each.
    async fn owned_nodes(&self, selector: &Selector) -> Result<Vec<(NodeView, Option<String>)>> {
        let matching = |n: &NodeView| selector.matches(&n.candidate().labels);
        let owned: Vec<(NodeView, Option<String>)> = if let Some(term) = self.term() {
            term.registry
                .list()
                .into_iter()
                .filter(matching)
                .map(|n| {
                    let owner = term.engine.active_rollout_of(&n.status.node_id);
                    (n, owner)
                })
                .collect()
        } else {
            let active = self.rollouts(true, usize::MAX).await?;
            let views = registry::stored_views(self.store.as_ref()).await.map_err(Error::from)?;
            views
                .into_iter()
                .filter(matching)
                .map(|n| {
                    let owner = active
                        .iter()
                        .find(|s| s.rollout.all_nodes().any(|id| *id == n.status.node_id))
                        .map(|s| s.rollout.id.clone());
                    (n, owner)
                })
                .collect()
        };
        Ok(owned)
    }

    /// Follows a rollout until it ends: every new state, once. Unknown
    /// rollouts are refused here, before any stream exists. The stream
    /// follows the engine while this coordinator leads the rollout and the
    /// store otherwise, so it survives a change of leader; it ends when the
    /// rollout does, or when the receiver is dropped.
    pub async fn watch(&self, id: &str) -> Result<ReceiverStream<RolloutView>> {
        let first = self.rollout(id).await?;
        let (tx, rx) = mpsc::channel(8);
        let follower = Follower { cluster: self.clone(), id: id.to_string(), tx, last: None };
        tokio::spawn(follower.run(first));
        Ok(ReceiverStream::new(rx))
    }
}

/// The producer behind one [`Cluster::watch`] stream.
struct Follower {
    cluster: Cluster,
    id: String,
    tx: mpsc::Sender<RolloutView>,
    /// (generation, epoch) of the last state sent: each state goes out once.
    last: Option<(u64, u64)>,
}

impl Follower {
    async fn run(mut self, first: RolloutState) {
        if !self.send(Arc::new(first)).await {
            return;
        }
        loop {
            if let Some((term, rx)) = self.live() {
                if !self.follow_live(&term, rx).await {
                    return;
                }
            }
            match stored_rollout(self.cluster.store.as_ref(), &self.id).await {
                Ok(state) => {
                    if !self.send(Arc::new(state)).await {
                        return;
                    }
                }
                // The store is unreachable: keep the watch open, keep trying.
                Err(err) => tracing::debug!(rollout = %self.id, error = %err, "watch: store read failed; retrying"),
            }
            // A coordinator shutting down ends its watches (their clients
            // reconnect); otherwise it could not stop serving.
            if self.tx.is_closed() || self.cluster.closing().is_cancelled() {
                return;
            }
            tokio::select! {
                _ = self.cluster.closing().cancelled() => return,
                _ = tokio::time::sleep(STORE_POLL) => {}
            }
        }
    }

    /// The engine's snapshots, while this coordinator leads and drives it.
    fn live(&self) -> Option<(Arc<Term>, watch::Receiver<Arc<RolloutState>>)> {
        let term = self.cluster.term()?;
        let rx = term.engine.subscribe(&self.id)?;
        Some((term, rx))
    }

    /// `false` once the watch is over; `true` when the driver finished or
    /// the term ended: the store has the rest.
    async fn follow_live(&mut self, term: &Term, mut rx: watch::Receiver<Arc<RolloutState>>) -> bool {
        let ended = term.ended();
        loop {
            let state = rx.borrow_and_update().clone();
            if !self.send(state).await {
                return false;
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return true },
                _ = ended.cancelled() => return true,
            }
        }
    }

    /// Sends `state` unless it was sent already. `false` once the rollout
    /// is over or nobody listens any more.
    async fn send(&mut self, state: Arc<RolloutState>) -> bool {
        let key = (state.rollout.generation, state.rollout.epoch);
        let terminal = state.rollout.phase.is_terminal();
        if self.last != Some(key) {
            self.last = Some(key);
            let view = self.cluster.view(state).await;
            if self.tx.send(view).await.is_err() {
                return false;
            }
        }
        !terminal
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        planner::Plan,
        rollout::{Phase, RolloutSpec},
    };

    fn record(id: &str, created_at_ms: u64, done: bool) -> Rollout {
        let mut r = RolloutState::new(
            id.into(),
            RolloutSpec::new("p"),
            "b1".into(),
            Plan::default(),
            "a".into(),
            1,
            created_at_ms,
        )
        .rollout;
        if done {
            r.phase = Phase::Completed;
        }
        r
    }

    #[test]
    fn newest_first_ties_by_id_active_only_and_limited() {
        let all = vec![record("a", 1, true), record("b", 3, false), record("c", 3, true), record("d", 2, false)];
        let ids = |rs: Vec<Rollout>| rs.into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(ids(newest(all.clone(), false, 10)), ["c", "b", "d", "a"]);
        assert_eq!(ids(newest(all.clone(), true, 10)), ["b", "d"]);
        assert_eq!(ids(newest(all, false, 2)), ["c", "b"]);
    }
}
