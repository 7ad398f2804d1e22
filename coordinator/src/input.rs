//! Bounds on everything a caller sends, operators and agents alike: the
//! longest text each field may hold, how many entries a list may have, the
//! range of each number, and the one helper ([`excerpt`]) that quotes caller
//! input in a message.
//!
//! Why one place: a field without a cap is a way to fill the store, the audit
//! log and every reply that echoes it (a 4 MB selector refused 25 times once
//! grew the store by 150 MB). The gRPC decode layer checks identifiers and
//! free text before anything else looks at them; the domain's spec validation
//! ([`crate::rollout::RolloutSpec::validate`]) checks its own numbers and
//! lists with the same helpers, so a spec built in-process is held to the
//! same bounds. No message ever quotes more than [`QUOTE_CHARS`] characters
//! of what was sent.

use std::{fmt::Debug, ops::RangeInclusive};

/// Rollout, patch, node and process ids.
pub const MAX_ID: usize = 128;
/// A target build name.
pub const MAX_BUILD: usize = 128;
/// A label selector as text (`zone=a,region=eu`).
pub const MAX_SELECTOR: usize = 1024;
/// An operator's reason (freeze, pause, abort...).
pub const MAX_REASON: usize = 1024;
/// A rollout's description.
pub const MAX_DESCRIPTION: usize = 4096;
/// A label key, and a label value.
pub const MAX_LABEL_KEY: usize = 128;
pub const MAX_LABEL_VALUE: usize = 256;
/// Labels on one node.
pub const MAX_LABELS: usize = 64;
/// An address (agent advertise address).
pub const MAX_ADDR: usize = 256;
/// A canary or wave size as text (`25%`, `3`), and a step name.
pub const MAX_SIZE_TEXT: usize = 32;
pub const MAX_STEP_NAME: usize = 64;
/// Wave sizes and pause-before steps in one spec.
pub const MAX_STEPS: usize = 64;
/// Game processes one node may report.
pub const MAX_PROCESSES: usize = 256;
/// Patches on one process's stack, and modules (live digests) it reports.
pub const MAX_STACK: usize = 1024;
pub const MAX_MODULES: usize = 4096;
/// Prepared or expired patches one node may report.
pub const MAX_PREPARED: usize = 1024;
/// Other free text an agent reports (versions, a game's health detail, a module name, a digest).
pub const MAX_SHORT_TEXT: usize = 1024;

/// Characters of caller input a message may quote.
pub const QUOTE_CHARS: usize = 48;

/// Why input was refused. Each names the field and the bound, and quotes at
/// most a short prefix of the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("{field} is {len} bytes long, more than the {max} accepted (starts {quoted})")]
    TooLong { field: &'static str, len: usize, max: usize, quoted: String },
    #[error("{field} has {count} entries, more than the {max} accepted")]
    TooMany { field: &'static str, count: usize, max: usize },
    #[error("{field} {value} is out of range: {range}")]
    OutOfRange { field: &'static str, value: String, range: String },
}

/// A short, printable, quoted prefix of `text` for a message: at most
/// [`QUOTE_CHARS`] characters, control characters dropped, and the full
/// length named when it was cut.
pub fn excerpt(text: &str) -> String {
    let total = text.chars().count();
    let shown: String = text.chars().filter(|c| !c.is_control()).take(QUOTE_CHARS).collect();
    if total > QUOTE_CHARS {
        format!("{shown:?}... ({} bytes)", text.len())
    } else {
        format!("{shown:?}")
    }
}

/// `text`, cut to at most `max` bytes on a character boundary (audit details
/// and anything else stored that is not refused outright).
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    const MARK: &str = "...(truncated)";
    let mut end = max.saturating_sub(MARK.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MARK}", &text[..end])
}

/// Refuses `value` longer than `max` bytes.
pub fn text(field: &'static str, value: &str, max: usize) -> Result<(), InputError> {
    if value.len() > max {
        return Err(InputError::TooLong { field, len: value.len(), max, quoted: excerpt(value) });
    }
    Ok(())
}

/// Refuses a list of more than `max` entries.
pub fn count(field: &'static str, count: usize, max: usize) -> Result<(), InputError> {
    if count > max {
        return Err(InputError::TooMany { field, count, max });
    }
    Ok(())
}

/// Refuses `value` outside `range`; `unit` follows each number in the
/// message. Numbers are shown in their short form (`1e300`, not 300 digits).
pub fn number<T: PartialOrd + Debug>(
    field: &'static str,
    value: T,
    range: RangeInclusive<T>,
    unit: &str,
) -> Result<(), InputError> {
    if range.contains(&value) {
        return Ok(());
    }
    Err(InputError::OutOfRange {
        field,
        value: format!("{value:?}{unit}"),
        range: format!("give {:?}{unit} to {:?}{unit}", range.start(), range.end()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_are_short_printable_and_name_the_length() {
        assert_eq!(excerpt("zone=a"), "\"zone=a\"");
        let huge = "x".repeat(4 << 20);
        let quoted = excerpt(&huge);
        assert!(quoted.len() < 80, "{quoted}");
        assert!(quoted.ends_with("(4194304 bytes)"), "{quoted}");
        assert_eq!(excerpt("a\nb\u{1b}[31m"), "\"ab[31m\"");
    }

    #[test]
    fn truncation_keeps_a_char_boundary_and_says_so() {
        assert_eq!(truncate("short", 10), "short");
        let cut = truncate(&"é".repeat(100), 31);
        assert!(cut.len() <= 31 && cut.ends_with("...(truncated)"), "{cut}");
    }

    #[test]
    fn bounds_name_the_field_and_never_echo_the_input() {
        let err = text("selector", &"k=v,".repeat(1 << 20), MAX_SELECTOR).expect_err("too long");
        let message = err.to_string();
        assert!(message.starts_with("selector is 4194304 bytes long, more than the 1024 accepted"), "{message}");
        assert!(message.len() < 200, "{message}");
        text("selector", "zone=a", MAX_SELECTOR).expect("fits");
        assert!(count("waves", 65, MAX_STEPS).expect_err("too many").to_string().contains("65 entries"));
        let err = number("health_window_ms", u64::MAX, 1..=86_400_000, " ms").expect_err("u64::MAX");
        assert_eq!(
            err.to_string(),
            "health_window_ms 18446744073709551615 ms is out of range: give 1 ms to 86400000 ms"
        );
        number("max_unhealthy", 3u32, 0..=10, "").expect("in range");
        let err = number("tick_p99_factor", 1e300, 1.0..=1000.0, "").expect_err("huge");
        assert_eq!(err.to_string(), "tick_p99_factor 1e300 is out of range: give 1.0 to 1000.0");
        assert!(number("tick_p99_factor", f64::NAN, 1.0..=1000.0, "").is_err());
    }
}
