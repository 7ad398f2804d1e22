//! A child process killed when its handle drops, polling until something is
//! ready, and free loopback ports.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{io, FleetError, Result};

/// Polls `check` until it yields a value or `timeout` passes.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    log: Option<&Path>,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(FleetError::Timeout {
                what: what.to_string(),
                after: timeout,
                log: log.map(Path::to_path_buf),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for the ready file `ready` that `proc` writes once listening, and
/// returns the gRPC address it names (agents and relays write one).
pub fn ready_grpc_addr(proc: &Proc, ready: &Path, what: &str) -> Result<std::net::SocketAddr> {
    let info: serde_json::Value = wait_for(what, Duration::from_secs(20), Some(&proc.log), || {
        std::fs::read_to_string(ready).ok().and_then(|t| serde_json::from_str(&t).ok())
    })?;
    info["grpc"].as_str().and_then(|a| a.parse().ok()).ok_or_else(|| FleetError::Io {
        what: format!("reading {}", ready.display()),
        source: std::io::Error::other("no grpc address"),
    })
}

/// A child process, killed (SIGKILL) when dropped; its output goes to a log file.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Result<Proc> {
        let log = log_dir.join(format!("{name}.log"));
        // Appended: a restarted process keeps its earlier incarnations' lines.
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io(format!("creating {}", log.display())))?;
        let err = file.try_clone().map_err(io("duplicating a log file handle"))?;
        cmd.stdout(file).stderr(err).stdin(Stdio::null());
        let child = cmd.spawn().map_err(|source| FleetError::Spawn { what: name.to_string(), source })?;
        Ok(Proc { name: name.to_string(), child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (up to 5 s) until every thread of the process has stopped:
    /// `kill` returns once the signal is queued, and on a busy machine a
    /// thread may still answer a request before it is scheduled to stop.
    fn wait_stopped(&self) {
        let tasks = format!("/proc/{}/task", self.pid());
        let all_stopped = || {
            let Ok(entries) = std::fs::read_dir(&tasks) else { return true };
            entries.flatten().all(|task| {
                let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
                // The state follows the parenthesised command name.
                stat.rsplit_once(") ").is_none_or(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !all_stopped() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Sends a signal by name ("STOP", "CONT", "TERM", ...).
    pub fn signal(&self, sig: &str) -> Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .map_err(io(format!("kill -{sig}")))?;
        if status.success() {
            if sig == "STOP" {
                self.wait_stopped();
            }
            Ok(())
        } else {
            Err(FleetError::Io {
                what: format!("kill -{sig} {}", self.pid()),
                source: std::io::Error::other("kill failed"),
            })
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- last lines of {} ({}) ----", self.name, self.log.display());
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            for line in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{line}");
            }
        }
    }
}

/// Where [`free_port`] picks from: below Linux's ephemeral range (32768–60999
/// by default).
const PICK_FROM: u16 = 20_000;
const PICK_SPAN: u64 = 12_000;

/// A free loopback port (bound, then released). Picked at random below the
/// ephemeral range: a port the kernel chose (`:0`) is free only until the
/// next outgoing connection takes it as its local port, and tests running
/// side by side open many, so an etcd could find its port taken before it
/// bound it. Falls back to a kernel-chosen port.
pub fn free_port() -> Result<u16> {
    use std::hash::{BuildHasher, RandomState};
    let seed = RandomState::new();
    for attempt in 0..64u32 {
        let n = seed.hash_one((std::process::id(), attempt, Instant::now()));
        let port = PICK_FROM + (n % PICK_SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io("finding a free port"))
}
