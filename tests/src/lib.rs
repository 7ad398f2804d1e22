//! Harness for hotfleet's process-level tests: starts the real binaries
//! (`hotfleet-coordinator`, `hotfleet-agent`, `hotfleet`) and real Python zone
//! servers from `examples/`, connects real TCP player clients, and kills every
//! process it started when a test ends, pass or fail.
//!
//! The binaries are taken from the workspace target directory; the test script
//! builds them first (`cargo build --workspace --bins`).

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

pub use tempfile::TempDir;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Path of a workspace binary (built by the test script before the tests run).
pub fn bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"));
    let path = target.join("debug").join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --workspace --bins` first", path.display());
    path
}

/// The Python interpreter zone servers run on (`HOTFLEET_PYTHON`, default `python3`).
pub fn python() -> String {
    std::env::var("HOTFLEET_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Waits until `check` yields a value, or panics naming `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed (SIGKILL) when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Proc {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("create log file");
        let err = file.try_clone().expect("clone log file");
        cmd.stdout(file).stderr(err).stdin(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { name: name.to_string(), child, log }
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

    /// Sends a signal (e.g. "STOP", "CONT", "TERM").
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{sig} {} failed", self.pid());
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

/// Runs the `hotfleet` CLI and returns its output.
pub fn cli(args: &[&str]) -> Output {
    Command::new(bin("hotfleet")).args(args).output().expect("run hotfleet CLI")
}

/// Runs the CLI, asserts success, returns stdout.
pub fn cli_ok(args: &[&str]) -> String {
    let out = cli(args);
    assert!(
        out.status.success(),
        "hotfleet {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A signing key pair made by `hotfleet keygen`.
pub struct Keys {
    pub secret: PathBuf,
    pub public: PathBuf,
}

pub fn keygen(dir: &Path) -> Keys {
    let keys = dir.join("keys");
    cli_ok(&["keygen", "--out", keys.to_str().expect("utf-8 path")]);
    Keys { secret: keys.join("hotfleet.key"), public: keys.join("hotfleet.pub") }
}

/// Builds (and signs, if `keys` is given) a patch from one of `examples/patches/NAME`,
/// shipping every module under it. Returns (bundle path, patch id).
pub fn build_patch(dir: &Path, name: &str, target_build: &str, keys: Option<&Keys>) -> (PathBuf, String) {
    let source = root().join("examples/patches").join(name);
    let out = dir.join(format!("{name}.hfpatch"));
    let mut args = vec![
        "--output".to_string(),
        "json".into(),
        "patch".into(),
        "build".into(),
        "--root".into(),
        source.display().to_string(),
        "--package".into(),
        "zone".into(),
        "--target-build".into(),
        target_build.into(),
        "--out".into(),
        out.display().to_string(),
        "--description".into(),
        format!("test patch {name}"),
    ];
    for module in modules_under(&source) {
        args.push("--module".into());
        args.push(module);
    }
    if let Some(keys) = keys {
        args.push("--key".into());
        args.push(keys.secret.display().to_string());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let built: Value = serde_json::from_str(&cli_ok(&refs)).expect("patch build --output json");
    let id = built["id"].as_str().expect("patch id").to_string();
    (out, id)
}

fn modules_under(source: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![(source.join("zone"), "zone".to_string())];
    while let Some((dir, dotted)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() && name != "__pycache__" {
                stack.push((path, format!("{dotted}.{name}")));
            } else if let Some(stem) = name.strip_suffix(".py") {
                out.push(if stem == "__init__" { dotted.clone() } else { format!("{dotted}.{stem}") });
            }
        }
    }
    out.sort();
    out
}

/// A running `hotfleet-agent`.
pub struct AgentProc {
    pub proc: Proc,
    pub node_id: String,
    pub grpc: SocketAddr,
    pub socket: PathBuf,
    pub data_dir: PathBuf,
}

impl AgentProc {
    /// Starts an agent on 127.0.0.1:0 with its own socket and data dir under `dir`.
    pub fn start(dir: &Path, node_id: &str, coordinator: Option<&str>, keys: &Keys, labels: &[(&str, &str)]) -> Self {
        let node_dir = dir.join(node_id);
        std::fs::create_dir_all(&node_dir).expect("node dir");
        Self::start_in(&node_dir, node_id, coordinator, keys, labels)
    }

    /// Starts (or restarts) an agent whose files live in `node_dir`.
    pub fn start_in(
        node_dir: &Path,
        node_id: &str,
        coordinator: Option<&str>,
        keys: &Keys,
        labels: &[(&str, &str)],
    ) -> Self {
        let socket = node_dir.join("agent.sock");
        let ready = node_dir.join("agent.ready");
        let _ = std::fs::remove_file(&ready);
        let data_dir = node_dir.join("data");
        let mut cmd = Command::new(bin("hotfleet-agent"));
        cmd.args(["--listen", "127.0.0.1:0", "--node-id", node_id])
            .arg("--runtime-socket")
            .arg(&socket)
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--trusted-key")
            .arg(&keys.public)
            .arg("--ready-file")
            .arg(&ready)
            .args(["--heartbeat-interval", "300ms", "--runtime-timeout", "10s"])
            .env("RUST_LOG", "info");
        if let Some(addr) = coordinator {
            cmd.args(["--coordinator", addr]);
        }
        for (k, v) in labels {
            cmd.args(["--label", &format!("{k}={v}")]);
        }
        let proc = Proc::spawn(&format!("agent-{node_id}"), cmd, node_dir);
        let info: Value = wait_for("agent ready file", Duration::from_secs(20), || {
            std::fs::read_to_string(&ready).ok().and_then(|t| serde_json::from_str(&t).ok())
        });
        let grpc = info["grpc"].as_str().and_then(|a| a.parse().ok()).expect("grpc address in ready file");
        AgentProc { proc, node_id: node_id.to_string(), grpc, socket, data_dir }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }
}

/// A running example zone server.
pub struct ZoneProc {
    pub proc: Proc,
    pub name: String,
    pub port: u16,
}

impl ZoneProc {
    /// Starts `examples/zone_server/server.py`, connected to `agent_socket` if given.
    pub fn start(dir: &Path, name: &str, agent_socket: Option<&Path>, build: &str) -> Self {
        let port_file = dir.join(format!("{name}.port"));
        let _ = std::fs::remove_file(&port_file);
        let root = root();
        let mut cmd = Command::new(python());
        cmd.arg(root.join("examples/zone_server/server.py"))
            .args(["--zone", name, "--port", "0"])
            .arg("--port-file")
            .arg(&port_file)
            .env(
                "PYTHONPATH",
                format!("{}:{}", root.join("runtime/python").display(), root.join("examples/zone_server").display()),
            )
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("HOTFLEET_BUILD", build)
            .env_remove("HOTFLEET_AGENT_SOCKET");
        if let Some(socket) = agent_socket {
            cmd.env("HOTFLEET_AGENT_SOCKET", socket);
        }
        let proc = Proc::spawn(&format!("zone-{name}"), cmd, dir);
        let port = wait_for(&format!("zone {name} port file"), Duration::from_secs(30), || {
            std::fs::read_to_string(&port_file).ok().and_then(|t| t.trim().parse().ok())
        });
        ZoneProc { proc, name: name.to_string(), port }
    }
}

/// A player connected to a zone server over TCP, speaking its JSON-lines protocol.
pub struct Player {
    pub name: String,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    seq: u64,
}

impl Player {
    pub fn connect(port: u16, name: &str) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to zone");
        stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let writer = stream.try_clone().expect("clone stream");
        let mut player = Player { name: name.to_string(), reader: BufReader::new(stream), writer, seq: 0 };
        let reply = player.request(json!({"type": "login", "name": name}));
        assert_eq!(reply["ok"], true, "login failed: {reply}");
        player
    }

    /// Sends one request and returns its reply (panics if the connection dropped).
    pub fn request(&mut self, mut msg: Value) -> Value {
        self.try_request(&mut msg).unwrap_or_else(|e| panic!("player {} lost its connection: {e}", self.name))
    }

    /// Like [`request`](Self::request) but reports a broken connection as an error.
    pub fn try_request(&mut self, msg: &mut Value) -> Result<Value, String> {
        self.seq += 1;
        msg["seq"] = json!(self.seq);
        let line = format!("{msg}\n");
        self.writer.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
        loop {
            let mut reply = String::new();
            let n = self.reader.read_line(&mut reply).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed by the server".into());
            }
            let value: Value = serde_json::from_str(&reply).map_err(|e| format!("bad reply {reply:?}: {e}"))?;
            if value.get("seq") == Some(&json!(self.seq)) {
                return Ok(value);
            }
        }
    }

    /// Whether the connection still answers.
    pub fn connected(&mut self) -> bool {
        self.try_request(&mut json!({"type": "ping"})).is_ok_and(|r| r["ok"] == true)
    }

    pub fn stats(&mut self) -> Value {
        let reply = self.request(json!({"type": "stats"}));
        assert_eq!(reply["ok"], true, "stats failed: {reply}");
        reply
    }

    /// Hits `target` once and returns the reply.
    pub fn attack(&mut self, target: &str) -> Value {
        self.request(json!({"type": "attack", "target": target}))
    }
}

/// A free loopback port (bound then released: tiny race, fine for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// A running `hotfleet-coordinator` on the embedded store.
pub struct CoordinatorProc {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
}

impl CoordinatorProc {
    pub fn start(dir: &Path, keys: &Keys, extra: &[&str]) -> Self {
        Self::start_at(dir, keys, free_port(), extra)
    }

    /// Starts a coordinator on `port` with its data in `dir/coordinator-data`
    /// (the same call restarts one on the same store).
    pub fn start_at(dir: &Path, keys: &Keys, port: u16, extra: &[&str]) -> Self {
        let data_dir = dir.join("coordinator-data");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let mut cmd = Command::new(bin("hotfleet-coordinator"));
        cmd.args(["--listen", &addr.to_string()])
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--trusted-key")
            .arg(&keys.public)
            .args(extra)
            .env("RUST_LOG", "info");
        let proc = Proc::spawn(&format!("coordinator-{port}"), cmd, dir);
        wait_for("coordinator to listen", Duration::from_secs(20), || TcpStream::connect(addr).ok());
        CoordinatorProc { proc, addr, data_dir }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}
