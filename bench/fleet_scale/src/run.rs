//! One benchmark run: a fresh coordinator (and etcd), the simulated fleet,
//! two signed patches pushed with the real CLI, a rollout that completes and
//! one that rolls back after a failure injected into the last wave's last
//! node, and what the coordinator cost meanwhile.

use std::{path::PathBuf, time::Duration};

use anyhow::{anyhow, bail, Context, Result};
use hotfleet_localfleet::{
    build_patch_with, free_port, CoordinatorProc, EtcdProc, Keys, Layout, PatchBuild, RelayProc, StoreSpec, TempDir,
};
use serde_json::Value;
use tokio::time::Instant;

use crate::{
    measure::{dir_bytes, etcd_stats, proc_stats, reset_peak_rss, store_counters, EtcdStats, ProcStats, StoreCounters},
    sim::{Attach, Calls, DigestProtocol, Faults, Fleet},
    timeline::{self, Timeline},
};

/// The build every simulated process runs.
const BUILD: &str = "sim-1";

/// What one run is asked to do.
#[derive(Debug, Clone)]
pub struct Plan {
    pub nodes: usize,
    pub etcd: bool,
    pub bin_dir: PathBuf,
    pub repo: PathBuf,
    pub heartbeat: Duration,
    pub heartbeat_conns: usize,
    /// Real relays the agents call through (0: none).
    pub relays: usize,
    /// How the agents get their commands (behind relays, `Relayed` is each
    /// agent's own stream to its relay, which carries it on).
    pub attach: Attach,
    /// How the simulated agents send their module digests.
    pub digests: DigestProtocol,
    /// Completing rollouts after the two measured ones, each a new patch on
    /// top: whether the coordinator's memory keeps growing rollout after rollout.
    pub more_rollouts: u32,
    pub modules: usize,
    pub health_window: String,
    pub waves: String,
    pub keep: bool,
}

/// One rollout as the operator saw it.
#[derive(Debug, Clone, Default)]
pub struct RolloutRun {
    /// `rollout start` to `rollout watch` returning.
    pub wall_ms: u64,
    pub timeline: Timeline,
    /// Agent calls the fleet answered meanwhile.
    pub calls: Calls,
    /// Nodes the rollout found lost (skipped at start or lost during it).
    pub lost: usize,
}

/// Everything one run measured.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// Simulated fleet start to every node registered and heard.
    pub register_ms: u64,
    /// The fleet's calls until then (registrations, pushbacks).
    pub register_calls: Calls,
    /// `hotfleet nodes list --output json` with the fleet registered: its
    /// time and the nodes it printed, or why it failed.
    pub nodes_list: Result<(u64, usize), String>,
    pub rollout: RolloutRun,
    pub rollback: RolloutRun,
    /// The coordinator before any node registered.
    pub base: ProcStats,
    /// With the fleet registered, before any rollout.
    pub idle: ProcStats,
    /// After both rollouts; its peak is theirs alone when `peak_reset`.
    pub end: ProcStats,
    /// Whether the peak was started over between `idle` and the rollouts.
    pub peak_reset: bool,
    pub store_bytes: Option<u64>,
    pub etcd_idle: EtcdStats,
    pub etcd_end: EtcdStats,
    /// The coordinator's store counters with the fleet registered and after both rollouts.
    pub counters_idle: StoreCounters,
    pub counters_end: StoreCounters,
    /// After each of `Plan::more_rollouts`: how it went, and the coordinator then.
    pub more: Vec<(RolloutRun, ProcStats)>,
    /// The relays' RSS summed, with the fleet registered and at the end (with their peaks).
    pub relays_idle: Vec<ProcStats>,
    pub relays_end: Vec<ProcStats>,
}

async fn cli(layout: &Layout, url: &str, args: &[&str]) -> Result<(bool, String, String)> {
    let out = tokio::process::Command::new(layout.bin("hotfleet")?)
        .arg("--insecure")
        .arg("--coordinator")
        .arg(url)
        .args(args)
        .output()
        .await
        .context("running the hotfleet CLI")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

async fn cli_ok(layout: &Layout, url: &str, args: &[&str]) -> Result<String> {
    let (ok, stdout, stderr) = cli(layout, url, args).await?;
    if !ok {
        bail!("hotfleet {} failed: {}", args.join(" "), stderr.trim());
    }
    Ok(stdout)
}

/// Writes the source tree of patch `n` (one module, `simgame.logic`) and builds it.
fn build_patch(
    layout: &Layout,
    dir: &std::path::Path,
    keys: &Keys,
    n: u32,
    parent: Option<&str>,
) -> Result<(PathBuf, String)> {
    let root = dir.join(format!("src{n}"));
    let package = root.join("simgame");
    std::fs::create_dir_all(&package)?;
    std::fs::write(package.join("__init__.py"), "")?;
    std::fs::write(package.join("logic.py"), format!("VALUE = {n}\n\ndef value():\n    return VALUE\n"))?;
    let out = dir.join(format!("patch{n}.hfpatch"));
    let build = PatchBuild {
        package: "simgame",
        source_root: &root,
        out: &out,
        target_build: BUILD,
        description: &format!("fleet-scale patch {n}"),
        keys: Some(keys),
        parent,
    };
    Ok(build_patch_with(layout, &build)?)
}

/// Starts a rollout of `patch` and follows it to its end with the CLI.
async fn rollout(plan: &Plan, layout: &Layout, url: &str, fleet: &Fleet, patch: &str) -> Result<RolloutRun> {
    let before = fleet.calls();
    let started = Instant::now();
    let args = [
        "--output",
        "json",
        "rollout",
        "start",
        patch,
        "--canary",
        "1",
        "--waves",
        &plan.waves,
        "--health-window",
        &plan.health_window,
    ];
    let out = cli_ok(layout, url, &args).await?;
    let started_json: Value = serde_json::from_str(&out).context("rollout start output")?;
    let id = started_json["rolloutId"].as_str().ok_or_else(|| anyhow!("no rollout id in {out}"))?.to_string();
    // Exit code: 0 completed, non-zero rolled back; the status says which.
    cli(layout, url, &["--output", "json", "rollout", "watch", &id]).await?;
    let wall_ms = started.elapsed().as_millis() as u64;
    let calls = fleet.calls().since(&before);
    let status: Value =
        serde_json::from_str(&cli_ok(layout, url, &["--output", "json", "rollout", "status", &id]).await?)
            .context("rollout status output")?;
    let lost_now = status["nodes"].as_array().map_or(0, |a| a.iter().filter(|n| n["observed"] == "lost").count());
    let skipped_lost = status["skipped"]
        .as_array()
        .map_or(0, |a| a.iter().filter(|s| s["reason"].as_str().unwrap_or_default().contains("lost")).count());
    Ok(RolloutRun { wall_ms, timeline: timeline::from_status(&status), calls, lost: lost_now + skipped_lost })
}

/// Times `hotfleet nodes list --output json`; a refusal is a result, not an error.
async fn list_nodes(layout: &Layout, url: &str) -> Result<Result<(u64, usize), String>> {
    let started = Instant::now();
    let (ok, stdout, stderr) = cli(layout, url, &["--output", "json", "nodes", "list"]).await?;
    let ms = started.elapsed().as_millis() as u64;
    if !ok {
        return Ok(Err(stderr.lines().next().unwrap_or_default().to_string()));
    }
    let listed =
        serde_json::from_str::<Value>(&stdout).ok().and_then(|v| v["items"].as_array().map(Vec::len)).unwrap_or(0);
    Ok(Ok((ms, listed)))
}

/// Accept queue of the fleet's one listener (the kernel caps it at `net.core.somaxconn`).
const FLEET_BACKLOG: u32 = 8192;

/// A failed rollout's last events, each cut short (a gate failure lists every node).
fn events(timeline: &crate::timeline::Timeline) -> String {
    let cut = |m: &String| {
        if m.chars().count() > 300 {
            format!("{}...", m.chars().take(300).collect::<String>())
        } else {
            m.clone()
        }
    };
    timeline.last_events.iter().map(cut).collect::<Vec<_>>().join(" / ")
}

/// Runs the whole scenario once.
pub async fn run_once(plan: &Plan) -> Result<RunResult> {
    let temp = TempDir::new().context("creating a temp dir")?;
    // Kept from the start with --keep, so a failed run leaves its logs too.
    let (dir, _temp) = if plan.keep {
        let kept = temp.keep();
        eprintln!("keeping {}", kept.display());
        (kept, None)
    } else {
        (temp.path().to_path_buf(), Some(temp))
    };
    let layout = Layout {
        bin_dir: plan.bin_dir.clone(),
        repo: plan.repo.clone(),
        python: "python3".into(),
        cli_flags: Vec::new(),
    };
    let keys = Keys::generate(&layout, dir.as_path())?;
    let etcd = if plan.etcd { Some(EtcdProc::start(dir.as_path())?) } else { None };
    let store = match &etcd {
        Some(e) => StoreSpec::Etcd { endpoints: e.url(), prefix: "/hotfleet-bench/".into() },
        None => StoreSpec::Embedded,
    };
    let interval = format!("{}s", plan.heartbeat.as_secs().max(1));
    let metrics_addr = format!("127.0.0.1:{}", free_port()?);
    // Plaintext: see bench/README.md (the simulated agents share one
    // listener, so they cannot each show a node's certificate).
    let coordinator = CoordinatorProc::start_insecure_on(
        &layout,
        dir.as_path(),
        &keys,
        free_port()?,
        &store,
        &["--heartbeat-interval", &interval, "--metrics-listen", &metrics_addr],
    )?;
    let url = coordinator.url();
    let (p1_path, p1) = build_patch(&layout, dir.as_path(), &keys, 1, None)?;
    let (p2_path, p2) = build_patch(&layout, dir.as_path(), &keys, 2, Some(&p1))?;
    for path in [&p1_path, &p2_path] {
        cli_ok(&layout, &url, &["patch", "push", &path.display().to_string()]).await?;
    }

    let pid = coordinator.proc.pid();
    let base = proc_stats(pid);
    // The fleet: one listener for every agent address, then each agent's
    // registration and heartbeats.
    // A deep accept queue: every simulated agent shares this one listener,
    // where a real fleet has one per agent, so a burst of the coordinator's
    // connects must not overflow tokio's default backlog (1,024) here.
    let socket = tokio::net::TcpSocket::new_v4().context("the fleet's socket")?;
    socket.bind(std::net::SocketAddr::from(([0, 0, 0, 0], 0))).context("binding the fleet's port")?;
    let listener = socket.listen(FLEET_BACKLOG).context("listening on the fleet's port")?;
    let port = listener.local_addr()?.port();
    let relays = start_relays(plan, &layout, dir.as_path(), &url)?;
    let (targets, conns) = match relays.is_empty() {
        true => (vec![url.clone()], plan.heartbeat_conns),
        // Behind relays, every agent holds a connection of its own, as a real one does.
        false => (relays.iter().map(RelayProc::url).collect(), plan.nodes),
    };
    // Behind real relays, or with a connection per agent (agents straight
    // to the coordinator), each agent attaches on its own stream as the real
    // one does; only shared connections stand for a relay's.
    let attach = match plan.attach {
        Attach::Relayed if !relays.is_empty() || conns >= plan.nodes => Attach::OwnStreams,
        attach => attach,
    };
    let fleet = Fleet::new(plan.nodes, port, BUILD, &targets, conns, attach, plan.modules)?;
    fleet.send_digests_as(plan.digests);
    let server = tokio::spawn(fleet.clone().serve(listener));
    let registering = Instant::now();
    let nodes: Vec<_> = (0..fleet.len()).map(|i| tokio::spawn(fleet.clone().run_node(i, plan.heartbeat))).collect();
    let deadline = Duration::from_secs(60 + plan.nodes as u64 / 20);
    while fleet.known() < plan.nodes {
        if registering.elapsed() > deadline {
            bail!("only {} of {} nodes registered within {deadline:?}", fleet.known(), plan.nodes);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let register_ms = registering.elapsed().as_millis() as u64;
    let register_calls = fleet.calls();
    // One more heartbeat round so the coordinator's view is settled.
    tokio::time::sleep(plan.heartbeat).await;
    let nodes_list = list_nodes(&layout, &url).await?;
    if let Ok((_, listed)) = nodes_list {
        if listed != plan.nodes {
            bail!("nodes list printed {listed} of {} nodes", plan.nodes);
        }
        let summary: Value =
            serde_json::from_str(&cli_ok(&layout, &url, &["--output", "json", "nodes", "list", "--summary"]).await?)
                .context("nodes list --summary output")?;
        if summary["total"].as_u64() != Some(plan.nodes as u64)
            || summary["byBuild"][BUILD].as_u64() != Some(plan.nodes as u64)
        {
            bail!("nodes list --summary does not count {} nodes on {BUILD}: {summary}", plan.nodes);
        }
    }
    let idle = proc_stats(pid);
    let relays_idle: Vec<ProcStats> = relays.iter().map(|r| proc_stats(r.proc.pid())).collect();
    let etcd_idle = etcd.as_ref().map(|e| etcd_stats(&e.url())).unwrap_or_default();
    let counters_idle = store_counters(&metrics_addr);
    // The peak of the registration storm and the listing is `idle`'s; from
    // here on it is the rollouts' own.
    let peak_reset = reset_peak_rss(pid);

    let first = rollout(plan, &layout, &url, &fleet, &p1).await?;
    if !first.timeline.completed || fleet.on_top(Some(&p1)) != plan.nodes {
        bail!(
            "the first rollout did not complete on every node ({} have it); its last events: {}",
            fleet.on_top(Some(&p1)),
            events(&first.timeline)
        );
    }
    fleet.set_faults(Faults { fail_health: Some((plan.nodes - 1, p2.clone())), ..Faults::default() });
    let second = rollout(plan, &layout, &url, &fleet, &p2).await?;
    if !second.timeline.rolled_back || fleet.on_top(Some(&p1)) != plan.nodes {
        bail!(
            "the second rollout did not roll back everywhere ({} of {} back on the first patch); its last events: {}",
            fleet.on_top(Some(&p1)),
            plan.nodes,
            events(&second.timeline)
        );
    }
    let end = proc_stats(pid);
    let relays_end: Vec<ProcStats> = relays.iter().map(|r| proc_stats(r.proc.pid())).collect();
    let etcd_end = etcd.as_ref().map(|e| etcd_stats(&e.url())).unwrap_or_default();
    let counters_end = store_counters(&metrics_addr);
    let store_bytes = match &etcd {
        Some(_) => etcd_end.db_bytes,
        None => dir_bytes(&coordinator.data_dir),
    };
    fleet.set_faults(Faults::default());
    let mut more = Vec::new();
    let mut top = p1.clone();
    for n in 3..3 + plan.more_rollouts {
        let (path, patch) = build_patch(&layout, dir.as_path(), &keys, n, Some(&top))?;
        cli_ok(&layout, &url, &["patch", "push", &path.display().to_string()]).await?;
        let run = rollout(plan, &layout, &url, &fleet, &patch).await?;
        if !run.timeline.completed || fleet.on_top(Some(&patch)) != plan.nodes {
            bail!("rollout {n} did not complete on every node; its last events: {}", events(&run.timeline));
        }
        more.push((run, proc_stats(pid)));
        top = patch;
    }
    for node in nodes {
        node.abort();
    }
    server.abort();
    drop(relays);
    drop(coordinator);
    drop(etcd);
    Ok(RunResult {
        register_ms,
        register_calls,
        nodes_list,
        rollout: first,
        rollback: second,
        base,
        idle,
        end,
        store_bytes,
        etcd_idle,
        etcd_end,
        counters_idle,
        counters_end,
        peak_reset,
        more,
        relays_idle,
        relays_end,
    })
}

/// The relays of `plan` in front of the coordinator at `url`, each with
/// enough upstream connections for its share of the fleet's attached streams.
fn start_relays(plan: &Plan, layout: &Layout, dir: &std::path::Path, url: &str) -> Result<Vec<RelayProc>> {
    if plan.relays == 0 {
        return Ok(Vec::new());
    }
    let per_relay = plan.nodes.div_ceil(plan.relays);
    let upstream = per_relay.div_ceil(128).max(1).to_string();
    let mut relays = Vec::with_capacity(plan.relays);
    for i in 0..plan.relays {
        let extra = ["--upstream-connections".to_string(), upstream.clone()];
        relays.push(RelayProc::start_insecure(layout, dir, &format!("relay-{i}"), url, &extra)?);
    }
    Ok(relays)
}
