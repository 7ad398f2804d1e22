//! What the benchmark reads about the coordinator process and its store:
//! peak and current RSS, CPU seconds, bytes written (Linux `/proc`), the
//! embedded store's file size, and etcd's revision and database size (its
//! JSON gateway, with `curl`). A reading that is not available is `None`,
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
