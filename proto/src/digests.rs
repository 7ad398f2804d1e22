//! The fingerprint of a process's module digests (module → sha256 of the
//! source it runs), computed the same way by the agent that sends it and the
//! coordinator that looks it up.
//!
//! With 32 modules a map is ~3.5 KB, and a fleet on one patch stack runs one
//! map. After a patch lands every process's map changes at once: instead of
//! each sending the new map whole, each names it by fingerprint, and the
//! coordinator takes the copy the first sender gave it.

use sha2::{Digest, Sha256};

/// Hex characters in a fingerprint (128 bits of the sha256).
pub const FINGERPRINT_LEN: usize = 32;

/// The fingerprint of the map `entries` (order does not matter; module names
/// are unique in a map).
pub fn fingerprint<'a>(entries: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    let mut sorted: Vec<(&String, &String)> = entries.into_iter().collect();
    sorted.sort_unstable();
    let mut hash = Sha256::new();
    for (module, digest) in sorted {
        // Length-prefixed, so no two maps encode alike.
        for part in [module, digest] {
            hash.update((part.len() as u64).to_le_bytes());
            hash.update(part.as_bytes());
        }
    }
    let sum = hash.finalize();
    sum[..FINGERPRINT_LEN / 2].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;

    #[test]
    fn a_map_has_one_fingerprint_whatever_its_order_and_another_map_another() {
        let pairs = [("game.a", "aa"), ("game.b", "bb"), ("game.c", "cc")];
        let hashed: HashMap<String, String> = pairs.iter().map(|(m, d)| (m.to_string(), d.to_string())).collect();
        let sorted: BTreeMap<String, String> = hashed.clone().into_iter().collect();
        let one = fingerprint(&hashed);
        assert_eq!(one, fingerprint(&sorted));
        assert_eq!(one.len(), FINGERPRINT_LEN);
        assert!(one.bytes().all(|b| b.is_ascii_hexdigit()));
        let mut changed = sorted.clone();
        changed.insert("game.a".into(), "a2".into());
        assert_ne!(fingerprint(&changed), one);
        // Where one part ends and the next begins is part of the encoding.
        let shifted: BTreeMap<String, String> = [("game.ab".to_string(), "a".to_string())].into();
        let unshifted: BTreeMap<String, String> = [("game.a".to_string(), "ba".to_string())].into();
        assert_ne!(fingerprint(&shifted), fingerprint(&unshifted));
        assert_ne!(fingerprint(&BTreeMap::new()), one);
    }
}
