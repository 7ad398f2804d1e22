//! Shared by the process-level tests (`rollout.rs`, `ha.rs`): a local fleet of
//! real processes on either store backend, driven through the `hotfleet` CLI
//! the way an SRE's runbook does, and the consistency check every test ends
//! with: each process's actual code (the digests its runtime reports per
//! module) is what the store says the fleet runs, every process kept its
//! PID, and every player is still connected.
#![allow(dead_code)]

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    time::{Duration, Instant},
};

pub use hotfleet_localfleet::*;
use hotfleet_proto::{
    tls::{OwnCert, TlsArgs, DEFAULT_COORDINATOR_IDENTITY},
    v1::{
        agent_client::AgentClient, agent_gateway_client::AgentGatewayClient, coordinator_client::CoordinatorClient,
        GetPatchStackRequest, NodeStatus, StatusRequest,
    },
};
use serde_json::Value;
use tonic::transport::Channel;

/// A channel to `url` over mutual TLS as `who`, expecting the server's
/// certificate to name `server` (an `Err` when the handshake fails).
pub async fn tls_channel(who: &TlsFiles, url: &str, server: &str) -> Result<Channel, String> {
    let args = TlsArgs {
        tls_ca: Some(who.ca.clone()),
        tls_cert: Some(who.cert.clone()),
        tls_key: Some(who.key.clone()),
        insecure: false,
    };
    let endpoint = args.transport(OwnCert::Required).map_err(|e| e.to_string())?.endpoint(url, server)?;
    endpoint.connect_timeout(Duration::from_secs(3)).connect().await.map_err(|e| format!("{e:?}"))
}

/// An agent client holding the coordinator's certificate (the only one an
/// agent obeys), verifying the agent as its node id.
pub async fn agent_client(keys: &Keys, agent: &AgentProc) -> AgentClient<Channel> {
    let channel = tls_channel(&keys.tls.coordinator(), &agent.url(), &agent.node_id).await.expect("agent channel");
    AgentClient::new(channel)
}

/// A coordinator client as operator `name` (see [`OPERATORS`]).
pub async fn coordinator_client_as(keys: &Keys, name: &str, url: &str) -> CoordinatorClient<Channel> {
    let channel = tls_channel(&keys.tls.operator(name), url, DEFAULT_COORDINATOR_IDENTITY).await.expect("channel");
    CoordinatorClient::new(channel)
}

/// A coordinator client as the fleet's admin `sre`.
pub async fn coordinator_client(keys: &Keys, url: &str) -> CoordinatorClient<Channel> {
    coordinator_client_as(keys, "sre", url).await
}

/// Both variants of every scenario: `embedded::name` and `etcd::name` (one
/// coordinator on a real etcd). Each `name(backend)` is an async fn of the test file.
#[allow(unused_macros)] // not every test binary runs scenarios on both stores
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Embedded).await
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Etcd { coordinators: 1 }).await
                }
            )*
        }
    };
}

pub const BUILD: &str = "zone-1.0";
pub const NODES: usize = 6;
/// The leader lease of every etcd-backed test fleet: short, so fail-overs
/// (and the suite) stay quick.
pub const LEASE: Duration = Duration::from_secs(3);

pub struct Scenario {
    pub dir: TempDir,
    pub fleet: Fleet,
    /// patch id -> module -> sha256, for every patch built here.
    pub patch_digests: HashMap<String, BTreeMap<String, String>>,
    /// zone server pid at start, per node.
    pub pids: Vec<u32>,
}

impl Scenario {
    /// A fleet on `backend`: the embedded store, or a real etcd on loopback
    /// shared by N coordinators.
    pub fn start(backend: Backend) -> Scenario {
        Self::start_with(backend, |_| Vec::new())
    }

    pub fn start_with(backend: Backend, zone_env: impl Fn(usize) -> Vec<(String, String)>) -> Scenario {
        Self::launch(backend, Game::ZoneServer, NODES, BUILD, zone_env)
    }

    /// `nodes` zone-server nodes on the embedded store, the coordinator
    /// started with `coordinator_flags` (besides listen, store and keys).
    pub fn start_small(nodes: usize, coordinator_flags: Vec<String>) -> Scenario {
        Self::start_small_on(Backend::Embedded, nodes, coordinator_flags)
    }

    /// `nodes` zone-server nodes on `backend`, the coordinator started with
    /// `coordinator_flags` (besides listen, store and keys).
    pub fn start_small_on(backend: Backend, nodes: usize, coordinator_flags: Vec<String>) -> Scenario {
        let layout = Layout::for_workspace();
        let dir = tempfile::tempdir().expect("tmp");
        let options = FleetOptions {
            nodes,
            build: BUILD.into(),
            backend,
            coordinator_flags,
            game: Game::ZoneServer,
            relay: false,
        };
        let fleet = Fleet::start_with(&layout, dir.path(), &options, |_| Vec::new()).expect("start fleet");
        fleet.wait_registered().expect("fleet registered");
        let pids = fleet.nodes.iter().map(|n| n.zone.proc.pid()).collect();
        Scenario { dir, fleet, patch_digests: HashMap::new(), pids }
    }

    /// `nodes` nodes serving `game` of `build`.
    pub fn start_game(backend: Backend, game: Game, nodes: usize, build: &str) -> Scenario {
        Self::launch(backend, game, nodes, build, |_| Vec::new())
    }

    /// [`NODES`] zone-server nodes on `backend` whose agents all call through
    /// one `hotfleet-relay` (the coordinators trust it with `--relay`).
    pub fn start_relayed(backend: Backend) -> Scenario {
        Self::launch_with(backend, Game::ZoneServer, NODES, BUILD, true, |_| Vec::new())
    }

    fn launch(
        backend: Backend,
        game: Game,
        nodes: usize,
        build: &str,
        zone_env: impl Fn(usize) -> Vec<(String, String)>,
    ) -> Scenario {
        Self::launch_with(backend, game, nodes, build, false, zone_env)
    }

    fn launch_with(
        backend: Backend,
        game: Game,
        nodes: usize,
        build: &str,
        relay: bool,
        zone_env: impl Fn(usize) -> Vec<(String, String)>,
    ) -> Scenario {
        let layout = Layout::for_workspace();
        let dir = tempfile::tempdir().expect("tmp");
        let mut coordinator_flags = vec!["--heartbeat-interval".to_string(), "500ms".to_string()];
        if let Backend::Etcd { .. } = backend {
            coordinator_flags.extend(["--leader-lease".to_string(), format!("{}s", LEASE.as_secs())]);
        }
        let options = FleetOptions { nodes, build: build.into(), backend, coordinator_flags, game, relay };
        let fleet = Fleet::start_with(&layout, dir.path(), &options, zone_env).expect("start fleet");
        fleet.wait_registered().expect("fleet registered");
        let pids = fleet.nodes.iter().map(|n| n.zone.proc.pid()).collect();
        Scenario { dir, fleet, patch_digests: HashMap::new(), pids }
    }

    /// Builds a signed patch from a source tree holding `zone/`, pushes it with the CLI.
    pub fn push_tree(&mut self, root: &Path, name: &str) -> String {
        self.push_tree_on(root, name, None)
    }

    /// [`Self::push_tree`] of a patch that goes on top of `parent` (None: the build's first).
    pub fn push_tree_on(&mut self, root: &Path, name: &str, parent: Option<&str>) -> String {
        let out = self.dir.path().join(format!("{name}.hfpatch"));
        let fleet = &self.fleet;
        let build = PatchBuild {
            package: fleet.game.package(),
            source_root: root,
            out: &out,
            target_build: &fleet.build,
            description: name,
            keys: Some(&fleet.keys),
            parent,
        };
        let (path, id) = build_patch_with(&fleet.layout, &build).expect("build patch");
        let shown =
            self.fleet.layout.cli(&["--output", "json", "patch", "show", &path.display().to_string()]).expect("show");
        let shown: Value = serde_json::from_str(&shown).expect("json");
        let digests = shown["manifest"]["modules"]
            .as_array()
            .expect("modules")
            .iter()
            .map(|m| {
                (
                    m["name"].as_str().unwrap_or_default().to_string(),
                    m["sha256"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        self.patch_digests.insert(id.clone(), digests);
        ok(self.fleet.cli(&["patch", "push", &path.display().to_string()]).expect("push"));
        id
    }

    pub fn push(&mut self, name: &str) -> String {
        self.push_on(name, None)
    }

    /// [`Self::push`] of an example patch that goes on top of `parent`.
    pub fn push_on(&mut self, name: &str, parent: Option<&str>) -> String {
        let root = self.fleet.layout.repo.join("examples/patches").join(name);
        self.push_tree_on(&root, name, parent)
    }

    /// Starts a rollout (canary 1, waves 25%,50%,100%) and returns its id.
    pub fn start_rollout(&self, patch: &str, health_window: &str) -> String {
        // These scenarios test rollouts, not the tick-latency gate (unit
        // tests cover it): on a 2-core CI machine running tests side by
        // side, a zone's tick p99 can rise by 20 ms from load alone.
        self.start_rollout_with_p99_floor(patch, health_window, "250ms")
    }

    /// [`Self::start_rollout`] with the health gate's tick-p99 margin given.
    pub fn start_rollout_with_p99_floor(&self, patch: &str, health_window: &str, p99_floor: &str) -> String {
        let args = vec![
            "--output",
            "json",
            "rollout",
            "start",
            patch,
            "--canary",
            "1",
            "--waves",
            "25%,50%,100%",
            "--health-window",
            health_window,
            "--step-deadline",
            "20s",
            "--tick-p99-floor",
            p99_floor,
        ];
        let out = ok(self.fleet.cli(&args).expect("rollout start"));
        let rollout: Value = serde_json::from_str(&out).expect("rollout json");
        rollout["rolloutId"].as_str().expect("rollout id").to_string()
    }

    /// `rollout watch ID`: returns the exit code and the final snapshot.
    pub fn watch(&self, id: &str) -> (i32, Value) {
        self.watch_via(&self.fleet.coordinator_urls(), id)
    }

    /// `rollout watch ID` against the given coordinators.
    pub fn watch_via(&self, urls: &str, id: &str) -> (i32, Value) {
        let out = self.fleet.cli_via(urls, &["--output", "json", "rollout", "watch", id]).expect("watch");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last =
            stdout.lines().rev().find_map(|l| serde_json::from_str::<Value>(l).ok()).unwrap_or_else(|| {
                panic!("watch printed no snapshot: {stdout}\n{}", String::from_utf8_lossy(&out.stderr))
            });
        (out.status.code().unwrap_or(-1), last)
    }

    pub fn status(&self, id: &str) -> Value {
        self.status_via(&self.fleet.coordinator_urls(), id)
    }

    pub fn status_via(&self, urls: &str, id: &str) -> Value {
        let out = ok(self.fleet.cli_via(urls, &["--output", "json", "rollout", "status", id]).expect("status"));
        serde_json::from_str(&out).expect("status json")
    }

    /// Polls the rollout until `pred` holds on its status.
    pub fn wait_until(&self, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let status = self.status(id);
            if pred(&status) {
                return status;
            }
            assert!(status["terminal"] != true, "rollout ended before {what}: {status}");
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {status}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn damages(&mut self) -> Vec<i64> {
        self.fleet.nodes.iter_mut().map(|n| n.probe.hit_dummy().expect("probe attack")).collect()
    }

    /// Restarts node `i`'s agent (0-based) pointing at every coordinator
    /// (or the fleet's relay).
    pub fn restart_agent(&mut self, i: usize, keys: &Keys) {
        let node_id = format!("node-{}", i + 1);
        let zone = format!("zone-{}", i + 1);
        let region = if (i + 1) % 2 == 1 { "eu" } else { "us" };
        let (target, flags) = self.fleet.agent_target();
        self.fleet.nodes[i].agent.proc.kill();
        self.fleet.nodes[i].agent = AgentProc::start_with_flags(
            &self.fleet.layout,
            self.dir.path(),
            &node_id,
            Some(&target),
            keys,
            &[("region", region), ("zone", &zone)],
            &flags,
        )
        .expect("agent restart");
    }

    /// Each agent's status, in node order.
    pub async fn agent_statuses(&self) -> Vec<NodeStatus> {
        let mut out = Vec::new();
        for node in &self.fleet.nodes {
            let mut agent = agent_client(&self.fleet.keys, &node.agent).await;
            out.push(agent.status(StatusRequest {}).await.expect("agent status").into_inner().node.expect("node"));
        }
        out
    }

    /// The fleet's patch stack as the store records it (asked of the first
    /// coordinator of `urls` that answers: every coordinator serves it).
    pub async fn stored_stack(&self, urls: &str) -> Vec<String> {
        for url in urls.split(',') {
            let operator = self.fleet.keys.tls.operator("sre");
            let Ok(channel) = tls_channel(&operator, url, DEFAULT_COORDINATOR_IDENTITY).await else { continue };
            let mut gateway = AgentGatewayClient::new(channel);
            let mut request = tonic::Request::new(GetPatchStackRequest { target_build: self.fleet.build.clone() });
            request.set_timeout(Duration::from_secs(3));
            if let Ok(stack) = gateway.get_patch_stack(request).await {
                return stack.into_inner().patches.into_iter().map(|p| p.patch_id).collect();
            }
        }
        panic!("no coordinator of {urls} answered GetPatchStack");
    }

    /// Each live process runs exactly the fleet patch stack the store records,
    /// module by module; PIDs unchanged; players connected.
    pub async fn assert_consistent(&mut self, skip_nodes: &[usize]) -> Vec<String> {
        let urls = self.fleet.coordinator_urls();
        self.assert_consistent_via(&urls, skip_nodes).await
    }

    pub async fn assert_consistent_via(&mut self, urls: &str, skip_nodes: &[usize]) -> Vec<String> {
        let stack = self.stored_stack(urls).await;
        let game = self.fleet.game;
        let mut expected = base_digests(&self.fleet.layout.repo.join(game.dir()), game.package());
        for id in &stack {
            expected.extend(self.patch_digests.get(id).cloned().unwrap_or_default());
        }
        for (i, node) in self.fleet.nodes.iter_mut().enumerate() {
            if skip_nodes.contains(&i) {
                continue;
            }
            let mut agent = agent_client(&self.fleet.keys, &node.agent).await;
            // A status answers from the agent's cache for a process that is slow to
            // answer; right after a rollback the process's digests are left out until
            // it answers at its new stack: ask again (a few refreshes) before judging.
            let mut status = None;
            for attempt in 0..10 {
                let now = agent.status(StatusRequest {}).await.expect("agent status").into_inner().node.expect("node");
                let settled = now.processes.len() == 1
                    && now.processes[0].patch_stack == stack
                    && expected.iter().all(|(m, d)| now.processes[0].live_digests.get(m) == Some(d));
                status = Some(now);
                if settled || attempt == 9 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let status = status.expect("asked at least once");
            assert_eq!(status.processes.len(), 1, "{}: one zone process", node.agent.node_id);
            let process = &status.processes[0];
            assert_eq!(process.pid, self.pids[i], "{}: the zone server was restarted", node.agent.node_id);
            assert_eq!(process.patch_stack, stack, "{}: process stack differs from the store", node.agent.node_id);
            for (module, digest) in &expected {
                assert_eq!(
                    process.live_digests.get(module),
                    Some(digest),
                    "{}: module {module} does not run the code the store records",
                    node.agent.node_id
                );
            }
            assert!(node.probe.connected(), "player on {} lost its connection", node.zone.name);
        }
        stack
    }
}

pub fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "hotfleet failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// sha256 of every module of a game's package as shipped (no patch applied).
pub fn base_digests(root: &Path, package: &str) -> BTreeMap<String, String> {
    hotfleet_patch::source_tree::scan(root, &[package.to_string()])
        .expect("game package")
        .into_iter()
        .map(|(module, source)| (module, hotfleet_patch::sha256_hex(source.as_bytes())))
        .collect()
}

pub fn node_states(rollout: &Value) -> Vec<(String, String, String)> {
    rollout["nodes"]
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .map(|n| {
                    let s = |k: &str| n[k].as_str().unwrap_or_default().to_string();
                    (s("nodeId"), s("desired"), s("observed"))
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn phase(rollout: &Value) -> String {
    rollout["phase"].as_str().unwrap_or_default().to_string()
}

pub fn step_name(rollout: &Value) -> String {
    let i = rollout["currentStep"].as_u64().unwrap_or(0) as usize;
    rollout["steps"][i]["name"].as_str().unwrap_or_default().to_string()
}

/// The epoch a rollout or leader document names.
pub fn epoch_of(doc: &Value) -> u64 {
    doc["epoch"].as_u64().unwrap_or(0)
}
