//! How read commands print: text for people, JSON or YAML for machines
//! (`-o/--output`). Both structured forms come from the same serde value, so
//! they always carry the same fields; YAML is written here (block style,
//! strings quoted as JSON strings, which YAML reads unchanged) rather than
//! pulled in as a dependency.

use serde::Serialize;
use serde_json::Value;

/// The version of every object the CLI prints under `-o json|yaml`.
pub const API_VERSION: &str = "hotfleet/v1";

/// A closed stdout ends the CLI quietly, by SIGPIPE, as it ends `ls` or
/// `kubectl` (`hotfleet patch show X | head -1`; a shell reports 141).
///
/// SIGPIPE itself stays ignored, Rust's default: the CLI's sockets are
/// written with `writev`, which raises SIGPIPE on a connection the peer has
/// just closed. With SIGPIPE at its default, a leader stopping mid-`rollout
/// watch` killed the watch silently instead of letting it reconnect. So a
/// write to the closed stdout panics in `println!`, and this hook turns that
/// one panic (and only a broken pipe's) into the signal.
pub fn end_quietly_when_stdout_closes() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.contains("Broken pipe") || message.contains("BrokenPipe") {
            stdout_closed();
        }
        default(info);
    }));
}

/// Ends the process by SIGPIPE: whoever read our output has gone.
pub fn stdout_closed() -> ! {
    // SAFETY: restoring the signal's default action and raising it on this
    // thread; nothing runs after it.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::raise(libc::SIGPIPE);
    }
    std::process::exit(141)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
    Yaml,
}

impl Output {
    /// JSON or YAML: the command prints its object, not prose.
    pub fn structured(self) -> bool {
        self != Output::Text
    }

    /// Prints `value` as pretty JSON or as YAML on stdout.
    pub fn print<T: Serialize>(self, value: &T) {
        match self.render(value) {
            Ok(text) => println!("{text}"),
            Err(err) => eprintln!("error: cannot encode output: {err}"),
        }
    }

    /// One document of a stream (`watch`): a JSON line, or a YAML document.
    pub fn print_streamed<T: Serialize>(self, value: &T) {
        let text = match self {
            Output::Yaml => self.render(value).map(|doc| format!("---\n{doc}")),
            _ => serde_json::to_string(value),
        };
        match text {
            Ok(text) => println!("{text}"),
            Err(err) => eprintln!("error: cannot encode output: {err}"),
        }
    }

    fn render<T: Serialize>(self, value: &T) -> serde_json::Result<String> {
        match self {
            Output::Yaml => Ok(to_yaml(&serde_json::to_value(value)?)),
            _ => serde_json::to_string_pretty(value),
        }
    }
}

/// `value` as block-style YAML (no trailing newline).
pub fn to_yaml(value: &Value) -> String {
    let mut out = String::new();
    write_yaml(value, 0, &mut out);
    out.trim_end_matches('\n').to_string()
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => plain(s).unwrap_or_else(|| Value::String(s.clone()).to_string()),
        Value::Array(a) if a.is_empty() => "[]".into(),
        Value::Object(o) if o.is_empty() => "{}".into(),
        other => other.to_string(),
    }
}

/// A string YAML reads back as the same string without quotes, if any.
fn plain(s: &str) -> Option<String> {
    let reserved = ["true", "false", "null", "yes", "no", "on", "off", "~", "y", "n"];
    let safe = !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | '@'))
        && !s.starts_with(['-', '.'])
        && !reserved.contains(&s.to_ascii_lowercase().as_str())
        && s.parse::<f64>().is_err();
    safe.then(|| s.to_string())
}

fn nested(value: &Value) -> bool {
    matches!(value, Value::Array(a) if !a.is_empty()) || matches!(value, Value::Object(o) if !o.is_empty())
}

fn write_yaml(value: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, item) in map {
                let key = plain(key).unwrap_or_else(|| Value::String(key.clone()).to_string());
                if nested(item) {
                    out.push_str(&format!("{pad}{key}:\n"));
                    write_yaml(item, indent + 2, out);
                } else {
                    out.push_str(&format!("{pad}{key}: {}\n", scalar(item)));
                }
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for item in items {
                if nested(item) {
                    // The item's first line goes after the dash.
                    let mut inner = String::new();
                    write_yaml(item, indent + 2, &mut inner);
                    let body = inner.get(indent + 2..).unwrap_or_default();
                    out.push_str(&format!("{pad}- {body}"));
                } else {
                    out.push_str(&format!("{pad}- {}\n", scalar(item)));
                }
            }
        }
        other => out.push_str(&format!("{pad}{}\n", scalar(other))),
    }
}

/// Unix milliseconds as an RFC 3339 UTC time (seconds precision).
pub fn format_ms(ms: u64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| t.replace_nanosecond(0).ok())
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_is_block_style_and_quotes_what_would_read_differently() {
        // Keys in sorted order: serde_json's map may or may not keep insertion order.
        let value = serde_json::json!({
            "empty": [],
            "note": "a: b",
            "ok": true,
            "phase": "watching",
            "rolloutId": "ro-1-2",
            "steps": [{"name": "canary", "nodeIds": ["node-1"]}, {"name": "wave-1", "nodeIds": []}],
            "ticks": 61,
            "version": "1.0",
            "yes": "yes",
        });
        let yaml = to_yaml(&value);
        let want = r#"empty: []
note: "a: b"
ok: true
phase: watching
rolloutId: ro-1-2
steps:
  - name: canary
    nodeIds:
      - node-1
  - name: wave-1
    nodeIds: []
ticks: 61
version: "1.0"
"yes": "yes""#;
        assert_eq!(yaml, want);
    }
}
