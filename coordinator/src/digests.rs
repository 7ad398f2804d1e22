//! A process's module digests (module → sha256 of the source it runs), and
//! the pool that keeps one copy of each distinct map.
//!
//! Every heartbeat carries the digest of every managed module each process
//! runs, and a fleet on one build and one patch stack reports the same map
//! from every process. Kept per process, 32 modules cost ~21 KB per node at
//! 10,000 nodes (docs/performance.md, eleventh part); shared, the fleet holds
//! one map per distinct stack and each process a pointer.

use std::collections::BTreeMap;

use crate::interned::{Pool, Shared};

/// Module → digest, cheap to clone (copies share the map). Stored and
/// serialized as the plain JSON object it always was.
pub type Digests = Shared<BTreeMap<String, String>>;

/// One copy of each distinct digest map in use, found by its fingerprint
/// ([`hotfleet_proto::digests::fingerprint`]), which agents send in place
/// of a map that changed (a fleet's processes change to the same map at once).
#[derive(Default)]
pub struct DigestPool(Pool<String, BTreeMap<String, String>>);

impl DigestPool {
    /// The pool's copy of `digests` (adding it if new).
    pub fn share(&self, digests: Digests) -> Digests {
        if digests.is_empty() {
            return digests;
        }
        // ~3.5 KB hashed with 32 modules, and only for a map sent whole (a
        // first registration, a map the pool lacked).
        let fingerprint = hotfleet_proto::digests::fingerprint(digests.iter());
        Shared(self.0.share(fingerprint, digests.0))
    }

    /// The map of this fingerprint, if some process sent it whole and it is
    /// still held.
    pub fn named(&self, fingerprint: &str) -> Option<Digests> {
        self.0.get(fingerprint).map(Shared)
    }

    /// Distinct maps held (some may no longer be in use until the next sweep).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interned::SWEEP_FROM;

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
