//! A whole local fleet: coordinator(s), optionally their etcd, and nodes of
//! agent + zone server + probe player, as `hotfleet demo` and the process
//! tests start it.

use std::{path::Path, process::Output, time::Duration};

use serde_json::Value;

use crate::{
    free_port, wait_for, AgentProc, CoordinatorProc, EtcdProc, Game, Keys, Layout, Player, RelayProc, Result,
    StoreSpec, ZoneProc,
};

/// The certificate name of a fleet's relay, which its coordinators trust (`--relay`).
pub const RELAY_NAME: &str = "relay-1";

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
    /// The game every node serves.
    pub game: Game,
    /// Agents call through one `hotfleet-relay` ([`RELAY_NAME`]) instead of
    /// each holding its own connection to the coordinators.
    pub relay: bool,
}

/// Coordinator(s) plus `n` nodes `node-1..node-n` (labels `region` eu/us
/// alternating and `zone`), each serving one zone server `zone-i` of `build`.
/// Every process runs with mutual TLS from the fleet's development CA.
pub struct Fleet {
    /// Its CLI runs as operator `sre` (admin) over TLS.
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
    pub game: Game,
    /// The relay every agent calls through, when [`FleetOptions::relay`].
    pub relay: Option<RelayProc>,
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
            game: Game::ZoneServer,
            relay: false,
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
        let layout = &layout.with_cli_flags(keys.tls.operator("sre").flags());
        let (etcd, store, count) = match options.backend {
            Backend::Embedded => (None, StoreSpec::Embedded, 1),
            Backend::Etcd { coordinators } => {
                let etcd = EtcdProc::start(dir)?;
                let store = StoreSpec::Etcd { endpoints: etcd.url(), prefix: "/hotfleet/".into() };
                (Some(etcd), store, coordinators.max(1))
            }
        };
        let mut coordinator_flags = options.coordinator_flags.clone();
        if options.relay {
            coordinator_flags.extend(["--relay".to_string(), RELAY_NAME.to_string()]);
        }
        let flags: Vec<&str> = coordinator_flags.iter().map(String::as_str).collect();
        let mut coordinators = Vec::with_capacity(count);
        for _ in 0..count {
            coordinators.push(CoordinatorProc::start_on(layout, dir, &keys, free_port()?, &store, &flags)?);
        }
        let urls = coordinators.iter().map(CoordinatorProc::url).collect::<Vec<_>>().join(",");
        let relay = match options.relay {
            true => Some(RelayProc::start(layout, dir, RELAY_NAME, ([127, 0, 0, 1], 0).into(), &urls, &keys)?),
            false => None,
        };
        let (target, agent_flags) = agent_target(&urls, relay.as_ref());
        let mut nodes = Vec::with_capacity(options.nodes);
        for i in 1..=options.nodes {
            let node_id = format!("node-{i}");
            let zone_name = format!("zone-{i}");
            let region = if i % 2 == 1 { "eu" } else { "us" };
            let agent = AgentProc::start_with_flags(
                layout,
                dir,
                &node_id,
                Some(&target),
                &keys,
                &[("region", region), ("zone", &zone_name)],
                &agent_flags,
            )?;
            let env = zone_env(i);
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let zone =
                ZoneProc::start_game(layout, dir, options.game, &zone_name, Some(&agent.socket), &options.build, &env)?;
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
            coordinator_flags,
            build: options.build.clone(),
            game: options.game,
            relay,
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

    /// What an agent of this fleet calls (the relay, or every coordinator),
    /// and the flags that go with it.
    pub fn agent_target(&self) -> (String, Vec<String>) {
        agent_target(&self.coordinator_urls(), self.relay.as_ref())
    }

    /// Waits until every node is registered, alive, with its one zone process.
    pub fn wait_registered(&self) -> Result<()> {
        let n = self.nodes.len();
        let urls = self.coordinator_urls();
        wait_for(&format!("{n} nodes registered with their zone servers"), Duration::from_secs(30), None, || {
            let out = self.layout.cli(&["--output", "json", "--coordinator", &urls, "nodes", "list"]).ok()?;
            let nodes: Value = serde_json::from_str(&out).ok()?;
            let ready = nodes["items"]
                .as_array()?
                .iter()
                .filter(|node| {
                    node["liveness"] == "alive" && node["processes"].as_array().is_some_and(|p| p.len() == 1)
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

    /// Kills node `i`'s game server (SIGKILL, 0-based) and starts it again
    /// in `dir` with `env`, as a supervisor would; a new probe player is the
    /// first to connect to it. Returns the new server's pid.
    pub fn restart_zone(&mut self, i: usize, dir: &Path, env: &[(&str, &str)]) -> Result<u32> {
        let node = &mut self.nodes[i];
        node.zone.proc.kill();
        let name = node.zone.name.clone();
        node.zone =
            ZoneProc::start_game(&self.layout, dir, self.game, &name, Some(&node.agent.socket), &self.build, env)?;
        node.probe = Player::connect(node.zone.port, &format!("probe_{}", i + 1))?;
        Ok(node.zone.proc.pid())
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

fn agent_target(coordinator_urls: &str, relay: Option<&RelayProc>) -> (String, Vec<String>) {
    match relay {
        Some(relay) => {
            // Behind a relay, agents are commanded down the streams they open
            // through it; an advertised address nobody answers proves it.
            let mut flags = relay.agent_flags();
            flags.extend(["--advertise-addr".to_string(), "127.0.0.1:9".to_string()]);
            (relay.url(), flags)
        }
        None => (coordinator_urls.to_string(), Vec::new()),
    }
}
