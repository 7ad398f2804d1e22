//! The patches prepared on this node and waiting for commit or abort, each
//! with a deadline (presumed abort), and the recent ones whose deadline ran
//! out. Plain data: the participant decides when to take, renew or expire.

use std::{
    collections::VecDeque,
    time::{Duration, SystemTime},
};

/// How many expired prepares are remembered.
const REMEMBERED_EXPIRED: usize = 256;

/// A patch prepared on this node, waiting for commit or abort.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub rollout_id: String,
    pub patch_id: String,
    /// The processes that prepared it.
    pub processes: Vec<String>,
    /// How long it waits from its prepare or its rollout's latest command.
    pub ttl: Duration,
    pub expires_at: SystemTime,
    /// A revert's prepare is dropped as a revert (the runtime holds the
    /// revert's transaction, not the patch's).
    pub rollout_kind: crate::command::RolloutKind,
}

impl Prepared {
    fn is(&self, rollout_id: &str, patch_id: &str) -> bool {
        self.rollout_id == rollout_id && self.patch_id == patch_id
    }
}

/// A prepare whose TTL ran out (presumed abort), kept so a late commit and
/// the node's reports can say so rather than "never prepared".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    pub rollout_id: String,
    pub patch_id: String,
    pub ttl: Duration,
    pub expired_at: SystemTime,
}

/// Prepared patches and recent expiries.
#[derive(Debug, Default)]
pub struct PreparedTable {
    waiting: Vec<Prepared>,
    expired: VecDeque<Expired>,
}

impl PreparedTable {
    pub fn waiting(&self) -> &[Prepared] {
        &self.waiting
    }

    pub fn expired(&self) -> impl Iterator<Item = &Expired> {
        self.expired.iter()
    }

    /// Records a prepare, replacing an earlier one of the same rollout and patch.
    pub fn insert(&mut self, prepared: Prepared) {
        self.remove(&prepared.rollout_id, &prepared.patch_id);
        self.waiting.push(prepared);
    }

    /// Takes out (and returns) the prepare of this rollout and patch.
    pub fn remove(&mut self, rollout_id: &str, patch_id: &str) -> Option<Prepared> {
        let position = self.waiting.iter().position(|p| p.is(rollout_id, patch_id))?;
        Some(self.waiting.remove(position))
    }

    /// The latest expiry of this rollout and patch, if remembered.
    pub fn expiry_of(&self, rollout_id: &str, patch_id: &str) -> Option<&Expired> {
        self.expired.iter().rev().find(|e| e.rollout_id == rollout_id && e.patch_id == patch_id)
    }

    /// Another full TTL from `now` for every prepare of `rollout_id` still
    /// waiting. One already past its deadline stays due: presumed abort may
    /// have been decided.
    pub fn renew(&mut self, rollout_id: &str, now: SystemTime) {
        for p in self.waiting.iter_mut().filter(|p| p.rollout_id == rollout_id && p.expires_at > now) {
            p.expires_at = p.expires_at.max(now + p.ttl);
        }
    }

    /// Takes out every prepare due at `now`, remembering each as expired.
    pub fn take_due(&mut self, now: SystemTime) -> Vec<Prepared> {
        let (due, waiting): (Vec<Prepared>, Vec<Prepared>) = self.waiting.drain(..).partition(|p| p.expires_at <= now);
        self.waiting = waiting;
        self.expired.extend(due.iter().map(|p| Expired {
            rollout_id: p.rollout_id.clone(),
            patch_id: p.patch_id.clone(),
            ttl: p.ttl,
            expired_at: p.expires_at,
        }));
        while self.expired.len() > REMEMBERED_EXPIRED {
            self.expired.pop_front();
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepared(rollout: &str, ttl_s: u64, now: SystemTime) -> Prepared {
        Prepared {
            rollout_kind: Default::default(),
            rollout_id: rollout.into(),
            patch_id: "p".into(),
            processes: vec!["a".into()],
            ttl: Duration::from_secs(ttl_s),
            expires_at: now + Duration::from_secs(ttl_s),
        }
    }

    #[test]
    fn renewal_extends_only_the_rollout_named_and_never_revives() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let mut table = PreparedTable::default();
        table.insert(prepared("r1", 10, t0));
        table.insert(prepared("r2", 10, t0));
        table.renew("r1", t0 + Duration::from_secs(8));
        assert_eq!(table.take_due(t0 + Duration::from_secs(12)).len(), 1, "r2 is due, r1 renewed");
        assert_eq!(table.waiting()[0].rollout_id, "r1");
        assert!(table.expiry_of("r2", "p").is_some());
        // Past its deadline: a renewal comes too late.
        table.renew("r1", t0 + Duration::from_secs(19));
        assert_eq!(table.waiting()[0].expires_at, t0 + Duration::from_secs(18));
        assert_eq!(table.take_due(t0 + Duration::from_secs(19)).len(), 1);
        assert!(table.waiting().is_empty());
    }

    #[test]
    fn a_prepare_again_replaces_and_remove_takes_it() {
        let now = SystemTime::now();
        let mut table = PreparedTable::default();
        table.insert(prepared("r1", 10, now));
        table.insert(prepared("r1", 20, now));
        assert_eq!(table.waiting().len(), 1);
        assert_eq!(table.remove("r1", "p").map(|p| p.ttl), Some(Duration::from_secs(20)));
        assert!(table.remove("r1", "p").is_none());
    }
}
