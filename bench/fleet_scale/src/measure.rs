//! What the benchmark reads about the coordinator process and its store:
//! peak and current RSS, CPU seconds, bytes written (Linux `/proc`), the
//! embedded store's file size, etcd's revision and database size (its
//! JSON gateway, with `curl`), and the coordinator's own count of store
//! batches and bytes (its Prometheus metrics, with `curl`). A reading that is not available is `None`,
//! never a made-up zero.

use std::{path::Path, process::Command};

/// One reading of a process.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ProcStats {
    pub peak_rss_kb: Option<u64>,
    pub rss_kb: Option<u64>,
    pub cpu_seconds: Option<f64>,
    /// Bytes the process caused to be written to storage.
    pub write_bytes: Option<u64>,
    /// write-like syscalls (a proxy for store writes on the embedded store).
    pub write_calls: Option<u64>,
}

/// `VmHWM`/`VmRSS` from `status`, `utime+stime` from `stat`, `write_bytes`/`syscw` from `io`.
pub fn proc_stats(pid: u32) -> ProcStats {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    let io_field = |key: &str| {
        io.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim_start_matches(':').trim().parse().ok())
    };
    ProcStats {
        peak_rss_kb: kb("VmHWM:"),
        rss_kb: kb("VmRSS:"),
        cpu_seconds: cpu_seconds(pid),
        write_bytes: io_field("write_bytes"),
        write_calls: io_field("syscw"),
    }
}

/// Starts the process's `VmHWM` over from its current RSS (Linux 4.0+), so the
/// next reading's peak is that of what ran since. False if the kernel refused.
pub fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after ") ".
    let rest = stat.rsplit_once(") ")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let hz = 100.0; // USER_HZ is 100 on every Linux the project supports.
    Some(ticks as f64 / hz)
}

/// Total size of the files under `dir` (the embedded store's redb file).
pub fn dir_bytes(dir: &Path) -> Option<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).ok()? {
        let entry = entry.ok()?;
        let meta = entry.metadata().ok()?;
        total += if meta.is_dir() { dir_bytes(&entry.path()).unwrap_or(0) } else { meta.len() };
    }
    Some(total)
}

/// etcd's revision and database size, from `/v3/maintenance/status`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EtcdStats {
    pub revision: Option<u64>,
    pub db_bytes: Option<u64>,
}

pub fn etcd_stats(url: &str) -> EtcdStats {
    let out = Command::new("curl")
        .args(["-s", "-m", "5", "-X", "POST", &format!("{url}/v3/maintenance/status"), "-d", "{}"])
        .output();
    let Ok(out) = out else { return EtcdStats::default() };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else { return EtcdStats::default() };
    // The gateway prints 64-bit integers as strings.
    let num = |v: &serde_json::Value| v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok()));
    EtcdStats { revision: num(&v["header"]["revision"]), db_bytes: num(&v["dbSize"]) }
}

/// The coordinator's store counters, from its `/metrics`: fenced batches
/// written (every result), bytes of records it encoded for the store, and
/// the node records and rollout node states in the batches it took.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct StoreCounters {
    pub batches: Option<f64>,
    pub bytes: Option<f64>,
    pub node_records: Option<f64>,
    pub node_states: Option<f64>,
}

pub fn store_counters(metrics_addr: &str) -> StoreCounters {
    let out = Command::new("curl").args(["-s", "-m", "5", &format!("http://{metrics_addr}/metrics")]).output();
    let Ok(out) = out else { return StoreCounters::default() };
    parse_store_counters(&String::from_utf8_lossy(&out.stdout))
}

/// Sums the samples of `hotfleet_store_write_duration_seconds_count`,
/// `hotfleet_store_written_bytes_total` and, by its `record` label,
/// `hotfleet_store_records_written_total` over their other labels.
fn parse_store_counters(text: &str) -> StoreCounters {
    let sum = |name: &str, label: &str| {
        let values: Vec<f64> = text
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    };
    const RECORDS: &str = "hotfleet_store_records_written_total";
    StoreCounters {
        batches: sum("hotfleet_store_write_duration_seconds_count", ""),
        bytes: sum("hotfleet_store_written_bytes_total", ""),
        node_records: sum(RECORDS, "record=\"node\""),
        node_states: sum(RECORDS, "record=\"node_state\""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_counters_sum_over_labels() {
        let text = "# TYPE x counter\n\
            hotfleet_store_write_duration_seconds_count{backend=\"etcd\",result=\"ok\"} 40\n\
            hotfleet_store_write_duration_seconds_count{backend=\"etcd\",result=\"error\"} 2\n\
            hotfleet_store_write_duration_seconds_sum{backend=\"etcd\",result=\"ok\"} 0.5\n\
            hotfleet_store_written_bytes_total{backend=\"etcd\"} 123456\n\
            hotfleet_store_records_written_total{backend=\"etcd\",record=\"node\"} 20\n\
            hotfleet_store_records_written_total{backend=\"etcd\",record=\"node_state\"} 700\n\
            hotfleet_store_records_written_total{backend=\"etcd\",record=\"node_removal\"} 3\n";
        assert_eq!(
            parse_store_counters(text),
            StoreCounters {
                batches: Some(42.0),
                bytes: Some(123_456.0),
                node_records: Some(20.0),
                node_states: Some(700.0)
            }
        );
        assert_eq!(parse_store_counters(""), StoreCounters::default());
    }
}
