//! A node's per-process figures (baselines, window starts), keyed by
//! process id: a sorted vector, not a `BTreeMap`.
//!
//! A node runs one or a few game processes, and a `BTreeMap` allocates a
//! whole leaf of 11 entries for its first one: ~0.9 KB for a node's baselines
//! and ~0.4 KB for its window start, in every node state of a rollout, in
//! each copy a transition makes and in every state read from the store
//! (docs/performance.md, ninth part). Stored the same way (a JSON object), so
//! states written before read as they did.

use std::{fmt, marker::PhantomData};

use serde::{
    de::{MapAccess, Visitor},
    Deserialize, Deserializer, Serialize, Serializer,
};

/// Entries sorted by process id, each id once.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessMap<V>(Vec<(String, V)>);

impl<V> Default for ProcessMap<V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<V> ProcessMap<V> {
    pub fn new() -> Self {
        Self::default()
    }

    fn position(&self, process_id: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(id, _)| id.as_str().cmp(process_id))
    }

    pub fn get(&self, process_id: &str) -> Option<&V> {
        self.position(process_id).ok().map(|i| &self.0[i].1)
    }

    pub fn get_mut(&mut self, process_id: &str) -> Option<&mut V> {
        self.position(process_id).ok().map(|i| &mut self.0[i].1)
    }

    /// Sets `process_id`'s value; returns the one it replaced.
    pub fn insert(&mut self, process_id: String, value: V) -> Option<V> {
        match self.position(&process_id) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.0.insert(i, (process_id, value));
                None
            }
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// In process id order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &V)> {
        self.into_iter()
    }
}

impl<'a, V> IntoIterator for &'a ProcessMap<V> {
    type Item = (&'a String, &'a V);
    type IntoIter = std::iter::Map<std::slice::Iter<'a, (String, V)>, fn(&'a (String, V)) -> (&'a String, &'a V)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(id, v)| (id, v))
    }
}

impl<V> FromIterator<(String, V)> for ProcessMap<V> {
    /// A later value for the same id wins, as with a map.
    fn from_iter<I: IntoIterator<Item = (String, V)>>(entries: I) -> Self {
        let mut map = Self::new();
        for (id, value) in entries {
            map.insert(id, value);
        }
        map.0.shrink_to_fit();
        map
    }
}

impl<V, const N: usize> From<[(String, V); N]> for ProcessMap<V> {
    fn from(entries: [(String, V); N]) -> Self {
        entries.into_iter().collect()
    }
}

impl<V: Serialize> Serialize for ProcessMap<V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for ProcessMap<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries<V>(PhantomData<V>);

        impl<'de, V: Deserialize<'de>> Visitor<'de> for Entries<V> {
            type Value = ProcessMap<V>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of process ids")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
                let mut map = ProcessMap(Vec::with_capacity(access.size_hint().unwrap_or(0).min(64)));
                while let Some((id, value)) = access.next_entry::<String, V>()? {
                    map.insert(id, value);
                }
                map.0.shrink_to_fit();
                Ok(map)
            }
        }

        deserializer.deserialize_map(Entries(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::ProcessMap;

    #[test]
    fn reads_and_writes_as_the_map_it_replaces() {
        let map: ProcessMap<u64> = [("zone-b".to_string(), 2), ("zone-a".to_string(), 1)].into();
        let json = serde_json::to_string(&map).expect("encode");
        let before: BTreeMap<String, u64> = [("zone-a".to_string(), 1), ("zone-b".to_string(), 2)].into();
        assert_eq!(json, serde_json::to_string(&before).expect("encode"), "the same JSON object");
        let back: ProcessMap<u64> = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, map);
        assert_eq!(back.iter().map(|(id, v)| (id.as_str(), *v)).collect::<Vec<_>>(), [("zone-a", 1), ("zone-b", 2)]);
        assert!(serde_json::from_str::<ProcessMap<u64>>("[1,2]").is_err(), "not a map");
        assert!(serde_json::from_str::<ProcessMap<u64>>(r#"{"a":"x"}"#).is_err(), "a bad value");
    }

    #[test]
    fn keeps_one_entry_per_process_in_order() {
        let mut map = ProcessMap::new();
        assert_eq!(map.insert("b".to_string(), 1), None);
        assert_eq!(map.insert("a".to_string(), 2), None);
        assert_eq!(map.insert("b".to_string(), 3), Some(1));
        assert_eq!(map.len(), 2);
        assert_eq!(map.get("b"), Some(&3));
        assert_eq!(map.get("c"), None);
        *map.get_mut("a").expect("a") += 10;
        assert_eq!(map.iter().map(|(id, v)| (id.clone(), *v)).collect::<Vec<_>>(), [("a".into(), 12), ("b".into(), 3)]);
        let last_wins: ProcessMap<u64> = [("a".to_string(), 1), ("a".to_string(), 2)].into();
        assert_eq!(last_wins.get("a"), Some(&2));
    }
}
