//! One shared copy of each value many nodes report alike. A fleet on one
//! build and one patch stack reports the same stack and the same module
//! digests from every process; the registry, every copy of a status (a
//! listing, the reconciler's view, a record written behind) and every term
//! hold a pointer to one copy instead of a copy each.
//!
//! Module digests ([`crate::digests`]) are pooled by their fingerprint, patch
//! stacks ([`PatchStack`]) by a hash of the stack.

use std::{
    collections::{hash_map::RandomState, HashMap},
    fmt,
    hash::{BuildHasher, Hash},
    ops::Deref,
    sync::{Arc, Mutex},
};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Values no holder points at any more are dropped once the pool has
/// doubled since the last sweep (and never below this many).
pub const SWEEP_FROM: usize = 64;

/// One copy of each distinct value in use, found by a key derived from it.
pub struct Pool<K, V> {
    inner: Mutex<Entries<K, V>>,
}

struct Entries<K, V> {
    values: HashMap<K, Arc<V>>,
    sweep_at: usize,
}

impl<K, V> Default for Pool<K, V> {
    fn default() -> Self {
        Self { inner: Mutex::new(Entries { values: HashMap::new(), sweep_at: 0 }) }
    }
}

impl<K: Hash + Eq, V: PartialEq> Pool<K, V> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Entries<K, V>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pool's copy of `value`, found by `key` (adding it if new). A
    /// different value under the same key (a hash collision) is kept apart,
    /// unshared: the first keeps the key.
    pub fn share(&self, key: K, value: Arc<V>) -> Arc<V> {
        let mut pool = self.lock();
        match pool.values.get(&key) {
            Some(shared) if **shared == *value => return shared.clone(),
            Some(_) => return value,
            None => {}
        }
        if pool.values.len() >= pool.sweep_at {
            // The pool's own reference is the last one: nobody holds it.
            pool.values.retain(|_, v| Arc::strong_count(v) > 1);
            pool.sweep_at = (pool.values.len() * 2).max(SWEEP_FROM);
        }
        pool.values.insert(key, value.clone());
        value
    }

    /// The value under `key`, if one was shared and is still held.
    pub fn get<Q: Hash + Eq + ?Sized>(&self, key: &Q) -> Option<Arc<V>>
    where
        K: std::borrow::Borrow<Q>,
    {
        self.lock().values.get(key).cloned()
    }

    /// Distinct values held (some may no longer be in use until the next sweep).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().values.len()
    }
}

/// A value held once and pointed at by all who report it alike; cheap to
/// clone (copies share it). Serialized as the value itself, so what was
/// stored before it was shared reads the same.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Shared<T>(pub(crate) Arc<T>);

impl<T> Shared<T> {
    /// Whether both point at the same shared value (not just equal ones).
    pub fn shares(&self, other: &Shared<T>) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl<T> Deref for Shared<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: fmt::Debug> fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<T> From<T> for Shared<T> {
    fn from(value: T) -> Self {
        Self(Arc::new(value))
    }
}

impl<T: FromIterator<I>, I> FromIterator<I> for Shared<T> {
    fn from_iter<It: IntoIterator<Item = I>>(iter: It) -> Self {
        Self(Arc::new(iter.into_iter().collect()))
    }
}

impl<T: IntoIterator + Clone> IntoIterator for Shared<T> {
    type Item = T::Item;
    type IntoIter = T::IntoIter;

    /// Takes the value when this is its last holder, copies it otherwise.
    fn into_iter(self) -> Self::IntoIter {
        Arc::unwrap_or_clone(self.0).into_iter()
    }
}

impl<T: PartialEq> PartialEq<T> for Shared<T> {
    fn eq(&self, other: &T) -> bool {
        *self.0 == *other
    }
}

impl<T: Serialize> Serialize for Shared<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Shared<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(d).map(Self::from)
    }
}

/// A process's committed patch ids, oldest first.
pub type PatchStack = Shared<Vec<String>>;

/// One copy of each distinct patch stack in use. Each rollout puts one more
/// patch on every node's stack: held per process, 10,000 nodes grew ~0.9 MB
/// per rollout, rollout after rollout (docs/performance.md, fourteenth part).
/// Hashed with keys of its own (a stack is an agent's input: one crafted to
/// collide with another's would only go unshared, never be taken for it).
#[derive(Default)]
pub struct StackPool {
    pool: Pool<u64, Vec<String>>,
    keys: RandomState,
}

impl StackPool {
    /// The pool's copy of `stack` (adding it if new).
    pub fn share(&self, stack: PatchStack) -> PatchStack {
        if stack.is_empty() {
            return stack;
        }
        Shared(self.pool.share(self.keys.hash_one(&*stack.0), stack.0))
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.pool.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stack(depth: u32, top: u32) -> PatchStack {
        (0..depth).map(|i| format!("{:064x}", i + top)).collect()
    }

    #[test]
    fn equal_stacks_from_many_processes_become_one_shared_copy_until_none_holds_it() {
        let pool = StackPool::default();
        let first = pool.share(stack(3, 0));
        let held: Vec<PatchStack> = (0..1_000).map(|_| pool.share(stack(3, 0))).collect();
        assert!(held.iter().all(|s| s.shares(&first)), "one stack for every process on it");
        assert_eq!(pool.len(), 1);
        assert!(!pool.share(stack(4, 0)).shares(&first), "one more patch, another stack");
        assert!(pool.share(PatchStack::default()).is_empty(), "nothing committed: nothing pooled");
        drop((first, held));
        // The fleet moves on, patch after patch: the stacks left behind are let go.
        let mut live = Vec::new();
        for top in 0..1_000 {
            live = vec![pool.share(stack(2, top))];
        }
        assert!(pool.len() <= 2 * SWEEP_FROM, "{} stacks kept for {} in use", pool.len(), live.len());
        assert!(pool.share(stack(2, 999)).shares(&live[0]));
    }

    #[test]
    fn a_pool_keeps_a_value_whose_key_another_holds_apart() {
        let pool: Pool<u64, Vec<String>> = Pool::default();
        let a = pool.share(7, Arc::new(vec!["a".to_string()]));
        let b = pool.share(7, Arc::new(vec!["b".to_string()]));
        assert_eq!(*b, vec!["b".to_string()], "never the other value");
        assert!(Arc::ptr_eq(&pool.get(&7).expect("held"), &a), "the first keeps the key");
    }

    #[test]
    fn a_stack_reads_and_writes_as_a_plain_json_array() {
        let json = serde_json::to_string(&stack(2, 5)).expect("serialize");
        let plain: Vec<String> = serde_json::from_str(&json).expect("a plain array");
        assert_eq!(stack(2, 5), plain);
        let back: PatchStack = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, stack(2, 5));
    }
}
