//! A local fleet of real processes: `hotfleet-coordinator`s (on the embedded
//! store, or several on an etcd this crate starts on loopback), `hotfleet-agent`s,
//! Python zone servers from `examples/`, and TCP player clients. `hotfleet demo`
//! and the process-level tests both stand their fleets up with it.
//!
//! Every process is killed when its handle is dropped, so nothing outlives a
//! demo or a test, even one that fails half-way.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

pub use tempfile::TempDir;

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{0} not found: build the workspace first (cargo build --workspace --bins)")]
    MissingBinary(PathBuf),
    #[error("cannot find the hotfleet repository (examples/zone_server): run from inside it")]
    NoRepository,
    #[error("cannot start {what}: {source}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out after {after:?} waiting for {what}{}", log.as_ref().map(|l| format!(" (see {})", l.display())).unwrap_or_default())]
    Timeout { what: String, after: Duration, log: Option<PathBuf> },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`hotfleet {args}` failed ({status}): {stderr}")]
    Cli { args: String, status: String, stderr: String },
    #[error("player {name}: {message}")]
    Player { name: String, message: String },
    #[error("etcd not found (looked at $HOTFLEET_ETCD and the PATH): install it, e.g. `apt-get install etcd-server` on Debian (scripts/test-all.sh does)")]
    MissingEtcd,
}

pub type Result<T, E = FleetError> = std::result::Result<T, E>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> FleetError {
    let what = what.into();
    move |source| FleetError::Io { what, source }
}

/// Where the binaries, the repository files and Python are.
#[derive(Debug, Clone)]
pub struct Layout {
    pub bin_dir: PathBuf,
    /// Repository root (holds `examples/` and `runtime/python/`).
    pub repo: PathBuf,
    pub python: String,
}

impl Layout {
    /// The workspace this crate was built in, with its debug binaries (tests).
    pub fn for_workspace() -> Layout {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default();
        let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo.join("target"));
        Layout { bin_dir: target.join("debug"), repo, python: default_python() }
    }

    /// Binaries beside the running executable; the repository found from the
    /// current directory upwards (or `repo` if given).
    pub fn beside_current_exe(repo: Option<PathBuf>, python: Option<String>) -> Result<Layout> {
        let exe = std::env::current_exe().map_err(io("locating the hotfleet executable"))?;
        let bin_dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
        let repo = match repo {
            Some(repo) => repo,
            None => find_repo().ok_or(FleetError::NoRepository)?,
        };
        if !repo.join("examples/zone_server/server.py").is_file() {
            return Err(FleetError::NoRepository);
        }
        Ok(Layout { bin_dir, repo, python: python.unwrap_or_else(default_python) })
    }

    pub fn bin(&self, name: &str) -> Result<PathBuf> {
        let path = self.bin_dir.join(name);
        if path.is_file() {
            Ok(path)
        } else {
            Err(FleetError::MissingBinary(path))
        }
    }

    /// Runs the `hotfleet` CLI; a non-zero exit is an error carrying its stderr.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = self.cli_raw(args)?;
        if !out.status.success() {
            return Err(FleetError::Cli {
                args: args.join(" "),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs the `hotfleet` CLI and returns its raw output, whatever the exit code.
    pub fn cli_raw(&self, args: &[&str]) -> Result<Output> {
        Command::new(self.bin("hotfleet")?).args(args).output().map_err(io("running the hotfleet CLI"))
    }
}

fn default_python() -> String {
    std::env::var("HOTFLEET_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn find_repo() -> Option<PathBuf> {
    let mut dir = std::env::current_dir().ok()?;
    loop {
        if dir.join("examples/zone_server/server.py").is_file() {
            return Some(dir);
        }
        if !dir.pop() {
            let built_in = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
            return built_in.join("examples/zone_server/server.py").is_file().then(|| built_in.to_path_buf());
        }
    }
}

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

    /// Sends a signal by name ("STOP", "CONT", "TERM", ...).
    pub fn signal(&self, sig: &str) -> Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .map_err(io(format!("kill -{sig}")))?;
        if status.success() {
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

/// A free loopback port (bound, then released: a tiny race, fine locally).
pub fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io("finding a free port"))
}

/// A signing key pair made by `hotfleet keygen`.
#[derive(Debug, Clone)]
pub struct Keys {
    pub secret: PathBuf,
    pub public: PathBuf,
}

impl Keys {
    pub fn generate(layout: &Layout, dir: &Path) -> Result<Keys> {
        let keys = dir.join("keys");
        layout.cli(&["keygen", "--out", &keys.display().to_string()])?;
        Ok(Keys { secret: keys.join("hotfleet.key"), public: keys.join("hotfleet.pub") })
    }
}

/// Builds a patch with `hotfleet patch build` from a source tree holding a
/// `zone` package, shipping every module in it. Returns (bundle path, patch id).
pub fn build_patch(
    layout: &Layout,
    source_root: &Path,
    out: &Path,
    target_build: &str,
    description: &str,
    keys: Option<&Keys>,
) -> Result<(PathBuf, String)> {
    let mut args = vec![
        "--output".to_string(),
        "json".into(),
        "patch".into(),
        "build".into(),
        "--root".into(),
        source_root.display().to_string(),
        "--package".into(),
        "zone".into(),
        "--target-build".into(),
        target_build.into(),
        "--out".into(),
        out.display().to_string(),
        "--description".into(),
        description.into(),
    ];
    // The same module discovery `patch build --base` uses.
    let modules = hotfleet_patch::source_tree::scan(source_root, &["zone".to_string()]).map_err(|e| {
        FleetError::Io { what: format!("reading {}", source_root.display()), source: std::io::Error::other(e) }
    })?;
    for module in modules.into_keys() {
        args.push("--module".into());
        args.push(module);
    }
    if let Some(keys) = keys {
        args.push("--key".into());
        args.push(keys.secret.display().to_string());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let built: Value = serde_json::from_str(&layout.cli(&refs)?)
        .map_err(|e| FleetError::Io { what: "reading patch build output".into(), source: std::io::Error::other(e) })?;
    let id = built["id"].as_str().unwrap_or_default().to_string();
    Ok((out.to_path_buf(), id))
}

/// Where a coordinator keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// Its own redb file under the fleet directory.
    Embedded,
    /// A shared etcd: `--store etcd --etcd-endpoints ENDPOINTS --etcd-prefix PREFIX`.
    Etcd { endpoints: String, prefix: String },
}

/// A running `hotfleet-coordinator`.
pub struct CoordinatorProc {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
}

impl CoordinatorProc {
    /// Starts a coordinator on `port` with its embedded store in
    /// `dir/coordinator-data` (the same call on the same `dir` restarts it on
    /// the same store).
    pub fn start(layout: &Layout, dir: &Path, keys: &Keys, port: u16, extra: &[&str]) -> Result<Self> {
        Self::start_on(layout, dir, keys, port, &StoreSpec::Embedded, extra)
    }

    /// Starts a coordinator on `port` with the given store.
    pub fn start_on(
        layout: &Layout,
        dir: &Path,
        keys: &Keys,
        port: u16,
        store: &StoreSpec,
        extra: &[&str],
    ) -> Result<Self> {
        let data_dir = match store {
            StoreSpec::Embedded => dir.join("coordinator-data"),
            // Unused by the etcd store; distinct so nothing could ever share it.
            StoreSpec::Etcd { .. } => dir.join(format!("coordinator-{port}-data")),
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut cmd = Command::new(layout.bin("hotfleet-coordinator")?);
        cmd.args(["--listen", &addr.to_string()])
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--trusted-key")
            .arg(&keys.public)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
        if let StoreSpec::Etcd { endpoints, prefix } = store {
            cmd.args(["--store", "etcd", "--etcd-endpoints", endpoints, "--etcd-prefix", prefix]);
        }
        cmd.args(extra);
        let proc = Proc::spawn(&format!("coordinator-{port}"), cmd, dir)?;
        wait_for("the coordinator to listen", Duration::from_secs(20), Some(&proc.log), || {
            TcpStream::connect(addr).ok()
        })?;
        Ok(CoordinatorProc { proc, addr, data_dir })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A single-member etcd on loopback with its own data directory, started
/// from the `etcd` binary on the PATH (or `$HOTFLEET_ETCD`).
pub struct EtcdProc {
    pub proc: Proc,
    pub client_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
    binary: PathBuf,
    dir: PathBuf,
}

fn find_etcd() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("HOTFLEET_ETCD").map(PathBuf::from) {
        return if path.is_file() { Ok(path) } else { Err(FleetError::MissingEtcd) };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join("etcd"))
        .find(|candidate| candidate.is_file())
        .ok_or(FleetError::MissingEtcd)
}

/// `GET /health` on etcd's client port: `{"health":"true"}` once it serves.
fn etcd_healthy(port: u16) -> bool {
    use std::io::Read;
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"")
}

fn launch_etcd(binary: &Path, dir: &Path, data_dir: &Path, client_port: u16, peer_port: u16) -> Result<Proc> {
    let client = format!("http://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let mut cmd = Command::new(binary);
    cmd.args(["--name", "hotfleet-test", "--logger=zap", "--log-outputs=stderr"])
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
        .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", &format!("hotfleet-test={peer}"), "--initial-cluster-state", "new"]);
    let proc = Proc::spawn("etcd", cmd, dir)?;
    wait_for("etcd to be healthy", Duration::from_secs(30), Some(&proc.log), || {
        etcd_healthy(client_port).then_some(())
    })?;
    Ok(proc)
}

impl EtcdProc {
    /// Starts etcd with its data in `dir/etcd-data` on two free loopback ports.
    pub fn start(dir: &Path) -> Result<EtcdProc> {
        let binary = find_etcd()?;
        let (client_port, peer_port) = (free_port()?, free_port()?);
        let data_dir = dir.join("etcd-data");
        let proc = launch_etcd(&binary, dir, &data_dir, client_port, peer_port)?;
        Ok(EtcdProc { proc, client_port, peer_port, data_dir, binary, dir: dir.to_path_buf() })
    }

    fn launch(&self) -> Result<Proc> {
        launch_etcd(&self.binary, &self.dir, &self.data_dir, self.client_port, self.peer_port)
    }

    /// The client URL (`--etcd-endpoints`).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Kills etcd (SIGKILL) and starts it again on the same ports and data.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.kill();
        self.proc = self.launch()?;
        Ok(())
    }

    /// Kills etcd (SIGKILL); [`EtcdProc::start_again`] brings it back on the same data.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts a killed etcd again on the same ports and data.
    pub fn start_again(&mut self) -> Result<()> {
        self.proc = self.launch()?;
        Ok(())
    }
}

/// A running `hotfleet-agent`.
pub struct AgentProc {
    pub proc: Proc,
    pub node_id: String,
    pub grpc: SocketAddr,
    pub socket: PathBuf,
    pub node_dir: PathBuf,
    pub data_dir: PathBuf,
}

impl AgentProc {
    /// Starts (or restarts) an agent on 127.0.0.1:0 whose files live in `dir/<node_id>`.
    pub fn start(
        layout: &Layout,
        dir: &Path,
        node_id: &str,
        coordinator: Option<&str>,
        keys: &Keys,
        labels: &[(&str, &str)],
    ) -> Result<Self> {
        let node_dir = dir.join(node_id);
        std::fs::create_dir_all(&node_dir).map_err(io(format!("creating {}", node_dir.display())))?;
        let socket = node_dir.join("agent.sock");
        let ready = node_dir.join("agent.ready");
        let _ = std::fs::remove_file(&ready);
        let data_dir = node_dir.join("data");
        let mut cmd = Command::new(layout.bin("hotfleet-agent")?);
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
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
        if let Some(addr) = coordinator {
            cmd.args(["--coordinator", addr]);
        }
        for (k, v) in labels {
            cmd.args(["--label", &format!("{k}={v}")]);
        }
        let proc = Proc::spawn(&format!("agent-{node_id}"), cmd, &node_dir)?;
        let info: Value = wait_for("the agent's ready file", Duration::from_secs(20), Some(&proc.log), || {
            std::fs::read_to_string(&ready).ok().and_then(|t| serde_json::from_str(&t).ok())
        })?;
        let grpc = info["grpc"].as_str().and_then(|a| a.parse().ok()).ok_or_else(|| FleetError::Io {
            what: format!("reading {}", ready.display()),
            source: std::io::Error::other("no grpc address"),
        })?;
        Ok(AgentProc { proc, node_id: node_id.to_string(), grpc, socket, node_dir, data_dir })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }
}

/// A running example zone server (`examples/zone_server/server.py`).
pub struct ZoneProc {
    pub proc: Proc,
    pub name: String,
    pub port: u16,
}

impl ZoneProc {
    /// Starts a zone server, connected to the agent at `agent_socket` if given.
    pub fn start(
        layout: &Layout,
        dir: &Path,
        name: &str,
        agent_socket: Option<&Path>,
        build: &str,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let port_file = dir.join(format!("{name}.port"));
        let _ = std::fs::remove_file(&port_file);
        let repo = &layout.repo;
        let mut cmd = Command::new(&layout.python);
        cmd.arg(repo.join("examples/zone_server/server.py"))
            .args(["--zone", name, "--port", "0"])
            .arg("--port-file")
            .arg(&port_file)
            .env(
                "PYTHONPATH",
                format!("{}:{}", repo.join("runtime/python").display(), repo.join("examples/zone_server").display()),
            )
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("HOTFLEET_BUILD", build)
            .env_remove("HOTFLEET_AGENT_SOCKET")
            .envs(env.iter().copied());
        if let Some(socket) = agent_socket {
            cmd.env("HOTFLEET_AGENT_SOCKET", socket);
        }
        let proc = Proc::spawn(&format!("zone-{name}"), cmd, dir)?;
        let port = wait_for(&format!("zone {name} to listen"), Duration::from_secs(30), Some(&proc.log), || {
            std::fs::read_to_string(&port_file).ok().and_then(|t| t.trim().parse().ok())
        })?;
        Ok(ZoneProc { proc, name: name.to_string(), port })
    }
}

/// A player connected to a zone server over TCP (newline-delimited JSON).
pub struct Player {
    pub name: String,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    seq: u64,
}

impl Player {
    /// Connects and logs in.
    pub fn connect(port: u16, name: &str) -> Result<Self> {
        let fail = |message: String| FleetError::Player { name: name.to_string(), message };
        let stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| fail(format!("cannot connect: {e}")))?;
        stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| fail(e.to_string()))?;
        let writer = stream.try_clone().map_err(|e| fail(e.to_string()))?;
        let mut player = Player { name: name.to_string(), reader: BufReader::new(stream), writer, seq: 0 };
        let reply = player.request(json!({"type": "login", "name": name}))?;
        if reply["ok"] != true {
            return Err(fail(format!("login refused: {reply}")));
        }
        Ok(player)
    }

    /// Sends one request and returns its reply; a dropped connection is an error.
    pub fn request(&mut self, mut msg: Value) -> Result<Value> {
        let fail = |message: String| FleetError::Player { name: self.name.clone(), message };
        self.seq += 1;
        msg["seq"] = json!(self.seq);
        self.writer.write_all(format!("{msg}\n").as_bytes()).map_err(|e| fail(format!("connection lost: {e}")))?;
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).map_err(|e| fail(format!("connection lost: {e}")))?;
            if n == 0 {
                return Err(fail("connection closed by the server".into()));
            }
            let reply: Value = serde_json::from_str(&line).map_err(|e| fail(format!("bad reply {line:?}: {e}")))?;
            if reply.get("seq") == Some(&json!(self.seq)) {
                return Ok(reply);
            }
        }
    }

    /// Whether the connection still answers a ping.
    pub fn connected(&mut self) -> bool {
        self.request(json!({"type": "ping"})).is_ok_and(|r| r["ok"] == true)
    }

    /// The player's full state and the serving process's pid.
    pub fn stats(&mut self) -> Result<Value> {
        self.request(json!({"type": "stats"}))
    }

    /// Hits the training dummy once; returns the damage dealt.
    pub fn hit_dummy(&mut self) -> Result<i64> {
        let reply = self.request(json!({"type": "attack", "target": "dummy"}))?;
        reply["damage"].as_i64().ok_or_else(|| FleetError::Player {
            name: self.name.clone(),
            message: format!("attack reply without damage: {reply}"),
        })
    }
}

/// One node of a local fleet: its agent, its zone server, and a probe player
/// connected to that server.
pub struct FleetNode {
    pub agent: AgentProc,
    pub zone: ZoneProc,
    pub probe: Player,
}

/// How a [`Fleet`] keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// One coordinator on its embedded store.
    Embedded,
    /// An etcd on loopback and the given number of coordinators sharing it.
    Etcd { coordinators: usize },
}

/// What to start.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    pub nodes: usize,
    pub build: String,
    pub backend: Backend,
    /// Flags for every coordinator (besides listen, store and keys).
    pub coordinator_flags: Vec<String>,
}

/// Coordinator(s) plus `n` nodes `node-1..node-n` (labels `region` eu/us
/// alternating and `zone`), each serving one zone server `zone-i` of `build`.
pub struct Fleet {
    pub layout: Layout,
    pub keys: Keys,
    /// One on the embedded store; several (one leading) on etcd.
    pub coordinators: Vec<CoordinatorProc>,
    pub etcd: Option<EtcdProc>,
    pub store: StoreSpec,
    pub nodes: Vec<FleetNode>,
    /// Flags the coordinators were started with (reused on restarts).
    pub coordinator_flags: Vec<String>,
    pub build: String,
}

impl Fleet {
    /// Starts a fleet on the embedded store in `dir`. `zone_env(i)` adds
    /// environment to zone server `i` (1-based).
    pub fn start(
        layout: &Layout,
        dir: &Path,
        n: usize,
        build: &str,
        coordinator_flags: &[&str],
        zone_env: impl Fn(usize) -> Vec<(String, String)>,
    ) -> Result<Fleet> {
        let options = FleetOptions {
            nodes: n,
            build: build.to_string(),
            backend: Backend::Embedded,
            coordinator_flags: coordinator_flags.iter().map(|s| s.to_string()).collect(),
        };
        Self::start_with(layout, dir, &options, zone_env)
    }

    /// Starts the fleet `options` describes in `dir`.
    pub fn start_with(
        layout: &Layout,
        dir: &Path,
        options: &FleetOptions,
        zone_env: impl Fn(usize) -> Vec<(String, String)>,
    ) -> Result<Fleet> {
        let keys = Keys::generate(layout, dir)?;
        let (etcd, store, count) = match options.backend {
            Backend::Embedded => (None, StoreSpec::Embedded, 1),
            Backend::Etcd { coordinators } => {
                let etcd = EtcdProc::start(dir)?;
                let store = StoreSpec::Etcd { endpoints: etcd.url(), prefix: "/hotfleet/".into() };
                (Some(etcd), store, coordinators.max(1))
            }
        };
        let flags: Vec<&str> = options.coordinator_flags.iter().map(String::as_str).collect();
        let mut coordinators = Vec::with_capacity(count);
        for _ in 0..count {
            coordinators.push(CoordinatorProc::start_on(layout, dir, &keys, free_port()?, &store, &flags)?);
        }
        let urls = coordinators.iter().map(CoordinatorProc::url).collect::<Vec<_>>().join(",");
        let mut nodes = Vec::with_capacity(options.nodes);
        for i in 1..=options.nodes {
            let node_id = format!("node-{i}");
            let zone_name = format!("zone-{i}");
            let region = if i % 2 == 1 { "eu" } else { "us" };
            let agent = AgentProc::start(
                layout,
                dir,
                &node_id,
                Some(&urls),
                &keys,
                &[("region", region), ("zone", &zone_name)],
            )?;
            let env = zone_env(i);
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let zone = ZoneProc::start(layout, dir, &zone_name, Some(&agent.socket), &options.build, &env)?;
            let probe = Player::connect(zone.port, &format!("probe_{i}"))?;
            nodes.push(FleetNode { agent, zone, probe });
        }
        Ok(Fleet {
            layout: layout.clone(),
            keys,
            coordinators,
            etcd,
            store,
            nodes,
            coordinator_flags: options.coordinator_flags.clone(),
            build: options.build.clone(),
        })
    }

    /// The first coordinator (the only one on the embedded store).
    pub fn coordinator(&self) -> &CoordinatorProc {
        &self.coordinators[0]
    }

    /// Every coordinator's URL, comma-separated (what agents and the CLI get).
    pub fn coordinator_urls(&self) -> String {
        self.coordinators.iter().map(CoordinatorProc::url).collect::<Vec<_>>().join(",")
    }

    /// Waits until every node is registered, alive, with its one zone process.
    pub fn wait_registered(&self) -> Result<()> {
        let n = self.nodes.len();
        let urls = self.coordinator_urls();
        wait_for(&format!("{n} nodes registered with their zone servers"), Duration::from_secs(30), None, || {
            let out = self.layout.cli(&["--output", "json", "--coordinator", &urls, "nodes", "list"]).ok()?;
            let nodes: Value = serde_json::from_str(&out).ok()?;
            let ready = nodes
                .as_array()?
                .iter()
                .filter(|node| {
                    node["liveness"] == "alive" && node["status"]["processes"].as_array().is_some_and(|p| p.len() == 1)
                })
                .count();
            (ready == n).then_some(())
        })
    }

    /// Kills the first coordinator (SIGKILL) and starts a new one on the same port and store.
    pub fn restart_coordinator(&mut self, dir: &Path) -> Result<()> {
        self.restart_coordinator_at(0, dir)
    }

    /// Kills coordinator `i` (SIGKILL) and starts a new one on the same port and store.
    pub fn restart_coordinator_at(&mut self, i: usize, dir: &Path) -> Result<()> {
        self.coordinators[i].proc.kill();
        let port = self.coordinators[i].addr.port();
        let flags: Vec<&str> = self.coordinator_flags.iter().map(String::as_str).collect();
        self.coordinators[i] = CoordinatorProc::start_on(&self.layout, dir, &self.keys, port, &self.store, &flags)?;
        Ok(())
    }

    /// `hotfleet --coordinator <every coordinator> ARGS...`, raw output.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        self.cli_via(&self.coordinator_urls(), args)
    }

    /// `hotfleet --coordinator URLS ARGS...`, raw output.
    pub fn cli_via(&self, urls: &str, args: &[&str]) -> Result<Output> {
        let mut full = vec!["--coordinator", urls];
        full.extend_from_slice(args);
        self.layout.cli_raw(&full)
    }
}
