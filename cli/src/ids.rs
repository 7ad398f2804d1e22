//! Ids as operators type them: a unique prefix stands for the whole id
//! (`75deee21aaef` as `nodes list` prints a patch), and an unknown id is
//! answered with the nearest known one ("did you mean ro-3-12?").
//!
//! Pure: the callers fetch the known ids (only after an exact lookup
//! failed, so a full id costs nothing extra).

use anyhow::anyhow;

use crate::exit::Failure;

/// The one known id `given` names: itself, or the only id it prefixes.
pub fn resolve(what: &str, given: &str, known: &[String]) -> Result<String, Failure> {
    if known.iter().any(|k| k == given) {
        return Ok(given.to_string());
    }
    let matching: Vec<&String> = known.iter().filter(|k| !given.is_empty() && k.starts_with(given)).collect();
    match matching.as_slice() {
        [one] => Ok((*one).clone()),
        [] => {
            let hint = nearest(given, known).map(|n| format!("; did you mean {n}?")).unwrap_or_default();
            Err(Failure::refused(anyhow!("{what} {given:?} not found{hint}")))
        }
        many => {
            let shown: Vec<&str> = many.iter().take(5).map(|s| s.as_str()).collect();
            let more = if many.len() > 5 { format!(" and {} more", many.len() - 5) } else { String::new() };
            Err(Failure::refused(anyhow!(
                "{what} prefix {given:?} is ambiguous: {}{more}; give more of the id",
                shown.join(", ")
            )))
        }
    }
}

/// The known id closest to `given` by edit distance, if close enough to be a typo.
fn nearest<'a>(given: &str, known: &'a [String]) -> Option<&'a str> {
    // Compare against as much of each id as was typed (a mistyped prefix).
    let score = |k: &String| {
        let cut: String = k.chars().take(given.chars().count().max(1)).collect();
        distance(given, k).min(distance(given, &cut))
    };
    let best = known.iter().min_by_key(|k| score(k))?;
    (score(best) <= (given.chars().count() / 3).max(2)).then_some(best.as_str())
}

/// Levenshtein distance.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let here = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(here + 1);
            prev = here;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn refusal(result: Result<String, Failure>) -> String {
        format!("{:#}", result.expect_err("refused").error)
    }

    #[test]
    fn exact_ids_and_unique_prefixes_resolve() {
        let known = ids(&["ro-1-1", "ro-1-12", "ro-2-3", "75deee21aaef0011"]);
        assert_eq!(resolve("rollout", "ro-1-1", &known).ok(), Some("ro-1-1".into()), "exact beats prefix");
        assert_eq!(resolve("rollout", "ro-2", &known).ok(), Some("ro-2-3".into()));
        assert_eq!(resolve("patch", "75deee21aaef", &known).ok(), Some("75deee21aaef0011".into()));
    }

    #[test]
    fn ambiguity_and_typos_are_explained() {
        let known = ids(&["ro-1-1", "ro-1-12", "ro-2-3"]);
        let err = refusal(resolve("rollout", "ro-1-", &known));
        assert!(err.contains("ambiguous: ro-1-1, ro-1-12"), "{err}");
        let err = refusal(resolve("rollout", "ro-2-4", &known));
        assert_eq!(err, "rollout \"ro-2-4\" not found; did you mean ro-2-3?");
        let err = refusal(resolve("rollout", "something-else", &known));
        assert_eq!(err, "rollout \"something-else\" not found");
        assert_eq!(distance("kitten", "sitting"), 3);
    }
}
