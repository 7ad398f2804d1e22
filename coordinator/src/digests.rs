//! A process's module digests (module → sha256 of the source it runs), and
//! the pool that keeps one copy of each distinct map.
//!
//! Every heartbeat carries the digest of every managed module each process
//! runs, and a fleet on one build and one patch stack reports the same map
//! from every process. Kept per process, 32 modules cost ~21 KB per node at
//! 10,000 nodes (docs/performance.md, eleventh part); shared, the fleet holds
//! one map per distinct stack and each process a pointer.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    ops::Deref,
    sync::{Arc, Mutex},
};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Module → digest, cheap to clone (copies share the map). Stored and
/// serialized as the plain JSON object it always was.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Digests(Arc<BTreeMap<String, String>>);

impl Digests {
    /// Whether both point at the same shared map (not just equal ones).
    pub fn shares(&self, other: &Digests) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Deref for Digests {
    type Target = BTreeMap<String, String>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl fmt::Debug for Digests {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<BTreeMap<String, String>> for Digests {
    fn from(map: BTreeMap<String, String>) -> Self {
        Self(Arc::new(map))
    }
}

impl<const N: usize> From<[(String, String); N]> for Digests {
    fn from(entries: [(String, String); N]) -> Self {
        entries.into_iter().collect()
    }
}

impl FromIterator<(String, String)> for Digests {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        Self(Arc::new(iter.into_iter().collect()))
    }
}

impl IntoIterator for Digests {
    type Item = (String, String);
    type IntoIter = std::collections::btree_map::IntoIter<String, String>;

    /// Takes the map when this is its last holder, copies it otherwise.
    fn into_iter(self) -> Self::IntoIter {
        Arc::unwrap_or_clone(self.0).into_iter()
    }
}

impl Serialize for Digests {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Digests {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        BTreeMap::deserialize(d).map(Self::from)
    }
}

/// Maps no process holds any more are dropped once the pool has doubled
/// since the last sweep (and never below this many).
const SWEEP_FROM: usize = 64;

/// One copy of each distinct digest map in use, found by its fingerprint
/// ([`hotfleet_proto::digests::fingerprint`]), which agents send in place
/// of a map that changed (a fleet's processes change to the same map at once).
#[derive(Default)]
pub struct DigestPool {
    inner: Mutex<Pool>,
}

#[derive(Default)]
struct Pool {
    maps: HashMap<String, Digests>,
    sweep_at: usize,
}

impl DigestPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pool's copy of `digests` (adding it if new).
    pub fn share(&self, digests: Digests) -> Digests {
        if digests.is_empty() {
            return digests;
        }
        // Hashed outside the lock: ~3.5 KB with 32 modules, and only a map
        // sent whole (a first registration, a map the pool lacked) gets here.
        let fingerprint = hotfleet_proto::digests::fingerprint(digests.iter());
        let mut pool = self.lock();
        match pool.maps.get(&fingerprint) {
            Some(shared) if *shared == digests => return shared.clone(),
            // Two maps on one 128-bit fingerprint: keep the first, this one unshared.
            Some(_) => return digests,
            None => {}
        }
        if pool.maps.len() >= pool.sweep_at {
            // The pool's own reference is the last one: no process runs it.
            pool.maps.retain(|_, m| Arc::strong_count(&m.0) > 1);
            pool.sweep_at = (pool.maps.len() * 2).max(SWEEP_FROM);
        }
        pool.maps.insert(fingerprint, digests.clone());
        digests
    }

    /// The map of this fingerprint, if some process sent it whole and it is
    /// still held.
    pub fn named(&self, fingerprint: &str) -> Option<Digests> {
        self.lock().maps.get(fingerprint).cloned()
    }

    /// Distinct maps held (some may no longer be in use until the next sweep).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().maps.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stack(patch: u32, modules: u32) -> Digests {
        (0..modules).map(|m| (format!("game.mod_{m}"), format!("{patch:08}{m:056x}"))).collect()
    }

    #[test]
    fn equal_maps_from_many_processes_become_one_shared_copy() {
        let pool = DigestPool::default();
        let first = pool.share(stack(1, 32));
        let held: Vec<Digests> = (0..1_000).map(|_| pool.share(stack(1, 32))).collect();
        assert!(held.iter().all(|d| d.shares(&first)), "one map for every process on one stack");
        assert_eq!(pool.len(), 1);
        assert!(!pool.share(stack(2, 32)).shares(&first), "another stack, another map");
    }

    #[test]
    fn a_map_one_process_sent_is_found_by_its_fingerprint_until_none_holds_it() {
        let pool = DigestPool::default();
        let name = |d: &Digests| hotfleet_proto::digests::fingerprint(d.iter());
        assert_eq!(pool.named(&name(&stack(1, 32))), None, "nobody sent it yet");
        let sent = pool.share(stack(1, 32));
        let found = pool.named(&name(&stack(1, 32))).expect("named after one process sent it");
        assert!(found.shares(&sent), "the same shared copy");
        assert_eq!(pool.named(&name(&stack(2, 32))), None, "another stack's map is not this one");
        drop((sent, found));
        // The fleet moves on: once swept, the old map is asked for whole again.
        let live: Vec<Digests> = (2..(2 + SWEEP_FROM as u32 + 1)).map(|p| pool.share(stack(p, 2))).collect();
        assert_eq!(pool.named(&name(&stack(1, 32))), None);
        assert!(pool.named(&name(&live[0])).is_some());
    }

    #[test]
    fn maps_no_process_holds_are_dropped_as_the_fleet_moves_on() {
        let pool = DigestPool::default();
        let mut live = Vec::new();
        for patch in 0..1_000 {
            // Every process moves to the next stack; the last one is let go.
            live = vec![pool.share(stack(patch, 4))];
        }
        assert!(pool.len() <= 2 * SWEEP_FROM, "{} maps kept for {} in use", pool.len(), live.len());
        assert!(pool.share(stack(999, 4)).shares(&live[0]), "the one in use is still shared");
    }

    #[test]
    fn digests_read_and_write_as_a_plain_json_object() {
        let digests = stack(7, 2);
        let json = serde_json::to_string(&digests).expect("serialize");
        let plain: BTreeMap<String, String> = serde_json::from_str(&json).expect("a plain object");
        assert_eq!(plain, *digests);
        let back: Digests = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, digests);
    }
}
