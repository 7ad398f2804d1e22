//! Module sources split across local-protocol frames ([`SourcePart`]).
//!
//! A frame may hold at most [`MAX_FRAME_BYTES`](crate::local::MAX_FRAME_BYTES)
//! of JSON, and JSON escaping can make a source up to six times longer than it
//! is (a quote costs two bytes, a control character six). So sources are cut
//! by their *escaped* length, never by their raw size, and every piece fits a
//! frame whatever the source holds.

use crate::v1::SourcePart;

/// Escaped bytes of source text one [`SourcePart`] carries at most: far below
/// the frame limit (room for ids and names), small enough that a big stack
/// does not hold the socket for long between other frames.
pub const PART_TEXT_BYTES: usize = 1024 * 1024;

/// Bytes `c` takes inside a JSON string as serde_json (and Python's
/// `json.dumps(ensure_ascii=False)`) write it.
pub fn escaped_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// Bytes `text` takes inside a JSON string (without the quotes).
pub fn escaped_text_len(text: &str) -> usize {
    text.chars().map(escaped_len).sum()
}

/// Cuts `text` at character boundaries into pieces of at most `budget`
/// escaped bytes each (`budget` is raised to 6, the widest character). An
/// empty text is one empty piece, so every module has at least one.
pub fn split_escaped(text: &str, budget: usize) -> Vec<&str> {
    let budget = budget.max(6);
    let mut pieces = Vec::new();
    let (mut start, mut used) = (0, 0);
    for (at, c) in text.char_indices() {
        let len = escaped_len(c);
        if used + len > budget {
            pieces.push(&text[start..at]);
            (start, used) = (at, 0);
        }
        used += len;
    }
    pieces.push(&text[start..]);
    pieces
}

/// The [`SourcePart`]s of one patch's modules, in module order, each piece
/// at most [`PART_TEXT_BYTES`] escaped bytes.
pub fn source_parts(patch_id: &str, modules: &[(String, String)]) -> Vec<SourcePart> {
    modules
        .iter()
        .flat_map(|(module, source)| {
            split_escaped(source, PART_TEXT_BYTES).into_iter().map(move |text| SourcePart {
                patch_id: patch_id.to_string(),
                module: module.clone(),
                text: text.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use crate::{
        local::{encode_frame, FrameError, MAX_FRAME_BYTES},
        v1::{runtime_frame::Body, RuntimeFrame, RuntimePrepare},
    };

    /// 2 MiB of characters that escape (quotes, backslashes, control
    /// characters) and non-ASCII ones: far beyond the limit once escaped.
    fn escapable(chars: usize) -> String {
        ['"', '\\', '\u{1}', 'é', '\n', '€', 'x'].iter().cycle().take(chars).collect()
    }

    #[test]
    fn escaped_length_matches_serde_json() {
        let text = escapable(10_000) + "\u{7f}\u{1f}\u{2028}🦀";
        let json = serde_json::to_string(&text).expect("json");
        assert_eq!(escaped_text_len(&text), json.len() - 2);
    }

    #[test]
    fn pieces_stay_within_budget_and_join_to_the_source() {
        let text = escapable(3000);
        for budget in [1, 6, 7, 100, 4096] {
            let pieces = split_escaped(&text, budget);
            assert!(pieces.iter().all(|p| escaped_text_len(p) <= budget.max(6)), "budget {budget}");
            assert_eq!(pieces.concat(), text);
        }
        assert_eq!(split_escaped("", 10), vec![""]);
    }

    #[test]
    fn a_bundle_of_escapable_characters_never_makes_a_frame_the_receiver_refuses() {
        // Four modules of 2 MiB (the module limit) of characters that escape:
        // 8 MiB raw, far below the frame limit, but some 19 MiB once escaped.
        let source: String = ['\u{1}', '"', '\\', 'é'].iter().cycle().take(2 * 1024 * 1024 * 4 / 5).collect();
        let modules: Vec<(String, String)> = (0..4).map(|i| (format!("zone.m{i}"), source.clone())).collect();
        let raw: usize = modules.iter().map(|(_, s)| s.len()).sum();
        assert!(raw < MAX_FRAME_BYTES);
        let whole = RuntimeFrame {
            id: 9,
            reply_to: 0,
            traceparent: String::new(),
            body: Some(Body::Prepare(RuntimePrepare {
                patch_id: "p".into(),
                modules: modules.iter().cloned().collect(),
                parts: 0,
                revert: false,
            })),
        };
        assert!(matches!(encode_frame(&whole), Err(FrameError::TooLarge { .. })), "one frame would be refused");

        let mut joined: BTreeMap<String, String> = BTreeMap::new();
        for part in source_parts(&"a".repeat(64), &modules) {
            joined.entry(part.module.clone()).or_default().push_str(&part.text);
            let frame =
                RuntimeFrame { id: 9, reply_to: 0, traceparent: String::new(), body: Some(Body::SourcePart(part)) };
            let bytes = encode_frame(&frame).expect("every part fits a frame");
            assert!(bytes.len() - 4 <= PART_TEXT_BYTES + 200);
        }
        assert_eq!(joined, modules.into_iter().collect::<BTreeMap<_, _>>());
    }
}
