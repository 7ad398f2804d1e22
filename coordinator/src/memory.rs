//! How the coordinator asks the C allocator for memory.
//!
//! glibc's malloc gives a thread that finds its arena locked a new arena, up
//! to eight per core, and a freed block goes back to the arena it came from.
//! The embedded store's writes run on blocking threads beside the workers,
//! and each arena keeps its own free space resident. With one arena per
//! worker thread, a 10,000-node rollout's peak on the embedded store fell
//! from ~12.9 to ~11.8 KB per node, its times unchanged (docs/performance.md,
//! tenth part); on etcd, with no blocking threads, it did not move.

/// What [`bound_arenas`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arenas {
    /// Bounded to this many.
    Bounded(usize),
    /// `MALLOC_ARENA_MAX` is set: the operator's choice stands.
    FromEnvironment,
    /// Not glibc, or glibc refused the setting: its default stands.
    AllocatorDefault,
}

/// The bound to set, if any: one arena per worker thread (at least one),
/// unless the environment already chose.
pub fn arena_bound(environment_sets_it: bool, worker_threads: usize) -> Option<usize> {
    (!environment_sets_it).then_some(worker_threads.max(1))
}

/// Bounds the allocator's arenas to `worker_threads` (see the module docs).
/// Call it before any thread is started: a thread keeps the arena it first
/// allocated from.
pub fn bound_arenas(worker_threads: usize) -> Arenas {
    let Some(bound) = arena_bound(std::env::var_os("MALLOC_ARENA_MAX").is_some(), worker_threads) else {
        return Arenas::FromEnvironment;
    };
    if set_arena_max(bound) {
        Arenas::Bounded(bound)
    } else {
        Arenas::AllocatorDefault
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_arena_max(bound: usize) -> bool {
    let bound = i32::try_from(bound).unwrap_or(i32::MAX);
    // SAFETY: mallopt only sets a tunable of the allocator; M_ARENA_MAX takes
    // effect for arenas created after it.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, bound) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_arena_max(_bound: usize) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_arena_per_worker_unless_the_environment_chose() {
        assert_eq!(arena_bound(false, 2), Some(2));
        assert_eq!(arena_bound(false, 16), Some(16));
        assert_eq!(arena_bound(false, 0), Some(1));
        assert_eq!(arena_bound(true, 2), None);
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn glibc_takes_the_bound() {
        // This test process may have MALLOC_ARENA_MAX set by whoever runs it.
        let expected =
            if std::env::var_os("MALLOC_ARENA_MAX").is_some() { Arenas::FromEnvironment } else { Arenas::Bounded(64) };
        // A bound above what a test process reaches: it changes nothing here.
        assert_eq!(bound_arenas(64), expected);
    }
}
