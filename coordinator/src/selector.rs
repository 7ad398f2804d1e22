//! Label selectors with kubectl's semantics: `k=v`, `k==v`, `k!=v`,
//! `k in (a,b)`, `k notin (a,b)`, `k` (exists) and `!k` (absent), comma-joined,
//! every requirement must hold. One parser for the coordinator (rollout
//! targets, `nodes list`) and the CLI (checked before anything is sent), so
//! what an operator types means the same everywhere.
//!
//! As in kubectl, `k!=v` and `k notin (…)` also match nodes without the label.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use serde::{Deserialize, Serialize};

use crate::{
    input::{self, excerpt},
    planner::PlanError,
};

/// What one key must satisfy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    Equals(String),
    NotEquals(String),
    In(BTreeSet<String>),
    NotIn(BTreeSet<String>),
    Exists,
    Absent,
}

impl Requirement {
    fn holds(&self, value: Option<&String>) -> bool {
        match (self, value) {
            (Requirement::Equals(want), Some(v)) => v == want,
            (Requirement::NotEquals(not), v) => v != Some(not),
            (Requirement::In(set), Some(v)) => set.contains(v),
            (Requirement::NotIn(set), v) => v.is_none_or(|v| !set.contains(v)),
            (Requirement::Exists, v) => v.is_some(),
            (Requirement::Absent, v) => v.is_none(),
            (Requirement::Equals(_) | Requirement::In(_), None) => false,
        }
    }
}

/// A label selector; empty (`all`) matches every node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    requirements: BTreeMap<String, Requirement>,
}

/// Label keys and values: what Kubernetes allows (letters, digits, `-_./`).
fn valid_word(word: &str) -> bool {
    word.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

/// Splits on commas outside parentheses (`zone in (a,b),tier=x`).
fn split_top_level(text: &str) -> Result<Vec<&str>, String> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err("unbalanced or nested parentheses".into());
        }
    }
    if depth != 0 {
        return Err("a \"(\" is not closed".into());
    }
    parts.push(&text[start..]);
    Ok(parts)
}

/// `(a, b)` as a set of valid values.
fn value_set(text: &str) -> Result<BTreeSet<String>, String> {
    let inner = text
        .trim()
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .ok_or_else(|| format!("{} is not a parenthesised list like (a,b)", excerpt(text.trim())))?;
    let mut set = BTreeSet::new();
    for value in inner.split(',').map(str::trim) {
        if value.is_empty() || !valid_word(value) {
            return Err(format!("{} is not a label value", excerpt(value)));
        }
        set.insert(value.to_string());
    }
    Ok(set)
}

/// One requirement: `(key, what it must satisfy)`.
fn requirement(part: &str) -> Result<(String, Requirement), String> {
    let part = part.trim();
    if part.is_empty() {
        return Err("an empty requirement (a stray comma?)".into());
    }
    let (key, req) = if let Some(key) = part.strip_prefix('!') {
        (key.trim(), Requirement::Absent)
    } else if let Some((key, value)) = part.split_once("!=") {
        (key.trim(), Requirement::NotEquals(value.trim().to_string()))
    } else if let Some((key, value)) = part.split_once("==").or_else(|| part.split_once('=')) {
        (key.trim(), Requirement::Equals(value.trim().to_string()))
    } else if let Some((key, rest)) = part.split_once(" notin ") {
        (key.trim(), Requirement::NotIn(value_set(rest)?))
    } else if let Some((key, rest)) = part.split_once(" in ") {
        (key.trim(), Requirement::In(value_set(rest)?))
    } else {
        (part, Requirement::Exists)
    };
    if key.is_empty() {
        return Err(format!("{} has no label key", excerpt(part)));
    }
    if !valid_word(key) {
        return Err(format!("{} is not a label key (letters, digits, -_./)", excerpt(key)));
    }
    if let Requirement::Equals(v) | Requirement::NotEquals(v) = &req {
        if !valid_word(v) || v.contains('=') {
            return Err(format!("{} is not a label value", excerpt(v)));
        }
    }
    Ok((key.to_string(), req))
}

impl Selector {
    /// Parses `"all"`, `""`, or comma-joined requirements.
    pub fn parse(text: &str) -> Result<Self, PlanError> {
        input::text("selector", text, input::MAX_SELECTOR)?;
        let err = |reason: String| PlanError::Selector { selector: excerpt(text), reason };
        let trimmed = text.trim();
        let mut requirements = BTreeMap::new();
        if trimmed.is_empty() || trimmed == "all" || trimmed == "*" {
            return Ok(Self { requirements });
        }
        for part in split_top_level(trimmed).map_err(err)? {
            let (key, req) = requirement(part).map_err(err)?;
            if requirements.contains_key(&key) {
                return Err(err(format!("label {} given twice", excerpt(&key))));
            }
            requirements.insert(key, req);
        }
        Ok(Self { requirements })
    }

    /// Whether a node with these labels is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|(k, req)| req.holds(labels.get(k)))
    }

    /// Whether this selects every node.
    pub fn is_all(&self) -> bool {
        self.requirements.is_empty()
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("all");
        }
        let list = |set: &BTreeSet<String>| set.iter().cloned().collect::<Vec<_>>().join(",");
        let parts: Vec<String> = self
            .requirements
            .iter()
            .map(|(k, req)| match req {
                Requirement::Equals(v) => format!("{k}={v}"),
                Requirement::NotEquals(v) => format!("{k}!={v}"),
                Requirement::In(set) => format!("{k} in ({})", list(set)),
                Requirement::NotIn(set) => format!("{k} notin ({})", list(set)),
                Requirement::Exists => k.clone(),
                Requirement::Absent => format!("!{k}"),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// Stored as its text; a rollout stored before the text form (`{"labels": {k: v}}`) still reads.
impl Serialize for Selector {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Selector {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Stored {
            Text(String),
            Labels { labels: BTreeMap<String, String> },
        }
        match Stored::deserialize(deserializer)? {
            Stored::Text(text) => Selector::parse(&text).map_err(serde::de::Error::custom),
            Stored::Labels { labels } => {
                Ok(Selector { requirements: labels.into_iter().map(|(k, v)| (k, Requirement::Equals(v))).collect() })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn sel(text: &str) -> Selector {
        Selector::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn every_kubectl_operator_matches_as_kubectl_does() {
        let eu = labels(&[("region", "eu"), ("zone", "a")]);
        let us = labels(&[("region", "us")]);
        let bare = labels(&[]);
        let cases: [(&str, [bool; 3]); 9] = [
            ("region=eu", [true, false, false]),
            ("region==eu", [true, false, false]),
            ("region!=eu", [false, true, true]),
            ("region in (eu, ap)", [true, false, false]),
            ("region notin (eu,ap)", [false, true, true]),
            ("zone", [true, false, false]),
            ("!zone", [false, true, true]),
            ("region in (eu,us),!zone", [false, true, false]),
            ("all", [true, true, true]),
        ];
        for (text, want) in cases {
            let s = sel(text);
            assert_eq!([s.matches(&eu), s.matches(&us), s.matches(&bare)], want, "{text}");
        }
    }

    #[test]
    fn canonical_text_round_trips() {
        let s = sel("zone=a, region in (us,eu),!gpu,tier notin (x)");
        assert_eq!(s.to_string(), "!gpu,region in (eu,us),tier notin (x),zone=a");
        assert_eq!(sel(&s.to_string()), s);
        assert_eq!(sel("").to_string(), "all");
    }

    #[test]
    fn mistakes_are_refused_with_the_reason() {
        for (bad, why) in [
            ("=a", "no label key"),
            ("zone=a,zone=b", "given twice"),
            ("zone in a,b", "parenthesised"),
            ("zone in (a", "not closed"),
            ("zone in ()", "not a label value"),
            ("zone=a,", "empty requirement"),
            ("zo ne", "not a label key"),
            ("zone=a=b", "not a label value"),
            ("zone=(a)", "not a label value"),
        ] {
            let err = Selector::parse(bad).expect_err(bad).to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn stored_as_text_and_the_old_label_map_still_reads() {
        let s = sel("zone=a,region!=eu");
        let json = serde_json::to_string(&s).expect("encode");
        assert_eq!(json, "\"region!=eu,zone=a\"");
        assert_eq!(serde_json::from_str::<Selector>(&json).expect("decode"), s);
        let old: Selector = serde_json::from_str(r#"{"labels":{"zone":"a"}}"#).expect("old form");
        assert_eq!(old, sel("zone=a"));
    }
}
