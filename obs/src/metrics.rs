//! A small Prometheus registry: counters, gauges and histograms with labels,
//! written out in the text exposition format (version 0.0.4). Hand-written
//! because it is a few dozen lines, where a metrics crate would bring its own
//! HTTP stack and global state rules.
//!
//! A metric is declared once as a [`Def`] (name, help, kind, label names);
//! code records against it with label values. Values that are cheaper to read
//! than to track (nodes by state, heartbeat age, leadership) are filled in by
//! collectors that run just before each scrape.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{Arc, Mutex, MutexGuard, OnceLock},
    time::Duration,
};

/// What a metric counts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Set to the current value.
    Gauge,
    /// Observations counted into these upper bounds (seconds or bytes).
    Histogram(&'static [f64]),
}

/// Latency buckets, in seconds: 1 ms to 60 s.
pub const LATENCY: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Short pause buckets, in seconds: 10 µs to 100 ms (a runtime's commit pause).
pub const PAUSE: &[f64] = &[0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1];
/// Size buckets, in bytes: 64 B to 16 MiB.
pub const BYTES: &[f64] = &[64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0];
/// Step duration buckets, in seconds: 10 ms to 1 h.
pub const STEP: &[f64] = &[0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];

/// One metric's declaration.
#[derive(Debug)]
pub struct Def {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
}

#[derive(Debug, Clone)]
enum Value {
    Number(f64),
    Histogram { buckets: Vec<u64>, sum: f64, count: u64 },
}

#[derive(Debug)]
struct Family {
    def: &'static Def,
    series: BTreeMap<Vec<String>, Value>,
}

type Collector = Arc<dyn Fn(&Registry) + Send + Sync>;

/// The metrics of one process (see [`metrics`]); a test makes its own.
#[derive(Default)]
pub struct Registry {
    families: Mutex<BTreeMap<&'static str, Family>>,
    collectors: Mutex<Vec<Collector>>,
}

/// The process's registry, which `/metrics` serves.
pub fn metrics() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::default)
}

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the metrics down with it.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Registry {
    /// Adds one to a counter.
    pub fn inc(&self, def: &'static Def, labels: &[&str]) {
        self.add(def, labels, 1.0);
    }

    /// Adds `by` to a counter (or a gauge).
    pub fn add(&self, def: &'static Def, labels: &[&str], by: f64) {
        self.update(def, labels, |v| {
            if let Value::Number(n) = v {
                *n += by;
            }
        });
    }

    /// Sets a gauge.
    pub fn set(&self, def: &'static Def, labels: &[&str], to: f64) {
        self.update(def, labels, |v| {
            if let Value::Number(n) = v {
                *n = to;
            }
        });
    }

    /// Records one observation of a histogram.
    pub fn observe(&self, def: &'static Def, labels: &[&str], value: f64) {
        let Kind::Histogram(bounds) = def.kind else { return };
        self.update(def, labels, |v| {
            if let Value::Histogram { buckets, sum, count } = v {
                if let Some(i) = bounds.iter().position(|b| value <= *b) {
                    buckets[i] += 1;
                }
                *sum += value;
                *count += 1;
            }
        });
    }

    /// Records a duration, in seconds.
    pub fn observe_duration(&self, def: &'static Def, labels: &[&str], took: Duration) {
        self.observe(def, labels, took.as_secs_f64());
    }

    /// Forgets every series of `def` (a collector about to set them afresh,
    /// so a state no node is in any more reads 0 rather than its old count).
    pub fn clear(&self, def: &'static Def) {
        if let Some(family) = guard(&self.families).get_mut(def.name) {
            family.series.clear();
        }
    }

    /// Runs `collect` before every scrape.
    pub fn on_scrape(&self, collect: impl Fn(&Registry) + Send + Sync + 'static) {
        guard(&self.collectors).push(Arc::new(collect));
    }

    /// The current value of a counter or gauge series (tests, and collectors).
    pub fn value(&self, def: &'static Def, labels: &[&str]) -> Option<f64> {
        let families = guard(&self.families);
        let key: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        match families.get(def.name)?.series.get(&key)? {
            Value::Number(n) => Some(*n),
            Value::Histogram { count, .. } => Some(*count as f64),
        }
    }

    fn update(&self, def: &'static Def, labels: &[&str], apply: impl FnOnce(&mut Value)) {
        debug_assert_eq!(labels.len(), def.labels.len(), "{}: label values do not match the names", def.name);
        let mut families = guard(&self.families);
        let family = families.entry(def.name).or_insert_with(|| Family { def, series: BTreeMap::new() });
        let key: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        let value = family.series.entry(key).or_insert_with(|| match def.kind {
            Kind::Histogram(bounds) => Value::Histogram { buckets: vec![0; bounds.len()], sum: 0.0, count: 0 },
            _ => Value::Number(0.0),
        });
        apply(value);
    }

    /// Runs the collectors, then writes every metric in the text format.
    pub fn render(&self) -> String {
        let collectors: Vec<Collector> = guard(&self.collectors).clone();
        for collect in collectors {
            collect(self);
        }
        let families = guard(&self.families);
        let mut out = String::new();
        for family in families.values() {
            write_family(&mut out, family);
        }
        out
    }
}

fn write_family(out: &mut String, family: &Family) {
    let def = family.def;
    let kind = match def.kind {
        Kind::Counter => "counter",
        Kind::Gauge => "gauge",
        Kind::Histogram(_) => "histogram",
    };
    let _ = writeln!(out, "# HELP {} {}", def.name, def.help);
    let _ = writeln!(out, "# TYPE {} {kind}", def.name);
    for (values, value) in &family.series {
        let pairs: Vec<(&str, &str)> = def.labels.iter().copied().zip(values.iter().map(String::as_str)).collect();
        match value {
            Value::Number(n) => {
                let _ = writeln!(out, "{}{} {}", def.name, labels(&pairs, None), number(*n));
            }
            Value::Histogram { buckets, sum, count } => {
                let Kind::Histogram(bounds) = def.kind else { continue };
                let mut cumulative = 0;
                for (bound, n) in bounds.iter().zip(buckets) {
                    cumulative += n;
                    let le = number(*bound);
                    let _ = writeln!(out, "{}_bucket{} {cumulative}", def.name, labels(&pairs, Some(&le)));
                }
                let _ = writeln!(out, "{}_bucket{} {count}", def.name, labels(&pairs, Some("+Inf")));
                let _ = writeln!(out, "{}_sum{} {}", def.name, labels(&pairs, None), number(*sum));
                let _ = writeln!(out, "{}_count{} {count}", def.name, labels(&pairs, None));
            }
        }
    }
}

fn labels(pairs: &[(&str, &str)], le: Option<&str>) -> String {
    let mut parts: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

/// Label values may hold anything a caller sent (a method path, a reason):
/// backslash, quote and newline are escaped as the format requires.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn number(n: f64) -> String {
    if n.is_finite() && n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static REQUESTS: Def =
        Def { name: "t_requests_total", help: "Requests.", kind: Kind::Counter, labels: &["method", "code"] };
    static LEADER: Def = Def { name: "t_leader", help: "Leading.", kind: Kind::Gauge, labels: &[] };
    static LATENCY_S: Def =
        Def { name: "t_latency_seconds", help: "Latency.", kind: Kind::Histogram(&[0.1, 1.0]), labels: &["kind"] };

    #[test]
    fn counters_gauges_and_histograms_render_in_the_text_format() {
        let r = Registry::default();
        r.inc(&REQUESTS, &["/a.B/C", "OK"]);
        r.inc(&REQUESTS, &["/a.B/C", "OK"]);
        r.set(&LEADER, &[], 1.0);
        r.observe(&LATENCY_S, &["commit"], 0.05);
        r.observe(&LATENCY_S, &["commit"], 0.5);
        r.observe(&LATENCY_S, &["commit"], 5.0);
        let text = r.render();
        assert!(text.contains("# TYPE t_requests_total counter\n"), "{text}");
        assert!(text.contains("t_requests_total{method=\"/a.B/C\",code=\"OK\"} 2\n"), "{text}");
        assert!(text.contains("t_leader 1\n"), "{text}");
        assert!(text.contains("t_latency_seconds_bucket{kind=\"commit\",le=\"0.1\"} 1\n"), "{text}");
        assert!(text.contains("t_latency_seconds_bucket{kind=\"commit\",le=\"1\"} 2\n"), "{text}");
        assert!(text.contains("t_latency_seconds_bucket{kind=\"commit\",le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("t_latency_seconds_sum{kind=\"commit\"} 5.55\n"), "{text}");
        assert!(text.contains("t_latency_seconds_count{kind=\"commit\"} 3\n"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        let r = Registry::default();
        r.inc(&REQUESTS, &["a\"b\\c\nd", "OK"]);
        assert!(r.render().contains(r#"method="a\"b\\c\nd""#));
    }

    #[test]
    fn collectors_run_before_each_scrape_and_clear_drops_old_series() {
        let r = Registry::default();
        r.set(&LEADER, &[], 0.0);
        r.on_scrape(|r| {
            r.clear(&LEADER);
            r.set(&LEADER, &[], 1.0);
        });
        assert!(r.render().contains("t_leader 1\n"));
        assert_eq!(r.value(&LEADER, &[]), Some(1.0));
    }
}
