//! `hotfleet demo`: a whole fleet on this machine, patched live.
//!
//! Starts a coordinator on a temporary embedded store, N agents each serving a
//! real Python zone server from `examples/`, players connected to every
//! server; then (1) rolls out the damage-formula hotfix with a canary and
//! waves and proves players stayed connected, PIDs unchanged and state kept
//! while the formula changed; (2) rolls out a patch whose migration hook fails
//! on one wave-2 node and shows the automatic fleet-wide rollback; (3) prints
//! a summary. Every process it started is killed on the way out.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context};
use hotfleet_localfleet::{build_patch_with, Fleet, FleetNode, Layout, PatchBuild, Proc, TempDir};
use hotfleet_proto::{
    tls::TlsArgs,
    v1::{ListNodesRequest, RolloutSpec, StartRolloutRequest},
};
use serde_json::Value;

use crate::{client::Target, exit::CliResult, output::Output, rollout_cmd};

const BUILD: &str = "zone-1.0";

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Number of nodes (agents), each with one zone server.
    #[arg(long, default_value_t = 6)]
    nodes: usize,
    /// Simulated players per zone server (besides the demo's own probe player).
    #[arg(long, default_value_t = 3)]
    players: usize,
    /// Health window after each rollout step.
    #[arg(long, default_value = "2s", value_parser = hotfleet_proto::duration::parse_duration)]
    health_window: Duration,
    /// Python interpreter for the zone servers.
    #[arg(long, env = "HOTFLEET_PYTHON")]
    python: Option<String>,
    /// The hotfleet repository (default: found from the current directory).
    #[arg(long)]
    repo: Option<PathBuf>,
    /// Keep the work directory (logs, store, keys) instead of deleting it.
    #[arg(long)]
    keep: bool,
}

/// What a probe player saw of one zone before a rollout.
struct Before {
    pid: Value,
    damage: i64,
    player: Value,
}

pub async fn run(args: DemoArgs, output: Output) -> CliResult {
    if output.structured() {
        return Err(anyhow!("the demo prints a narrated run; -o json|yaml is not supported for it").into());
    }
    if args.nodes < 4 {
        return Err(
            anyhow!("the demo needs at least 4 nodes (a canary and three waves); got --nodes {}", args.nodes).into()
        );
    }
    let started = Instant::now();
    let layout = Layout::beside_current_exe(args.repo.clone(), args.python.clone()).map_err(anyhow::Error::from)?;
    let dir = tempfile::Builder::new().prefix("hotfleet-demo-").tempdir().context("creating a work directory")?;
    let result = demo(&args, &layout, &dir, started).await.map_err(crate::exit::Failure::from);
    if args.keep {
        let kept = dir.keep();
        println!("work directory kept: {} (logs, store, keys)", kept.display());
    } else if result.is_err() {
        let kept = dir.keep();
        eprintln!("logs of the failed demo: {}", kept.display());
    }
    result
}

async fn demo(args: &DemoArgs, layout: &Layout, dir: &TempDir, started: Instant) -> anyhow::Result<()> {
    let work = dir.path();
    step("1/5", &format!("starting a local fleet of {} nodes in {}", args.nodes, work.display()));
    let mut fleet = Fleet::start(layout, work, args.nodes, BUILD, &["--heartbeat-interval", "500ms"], |_| Vec::new())?;
    let demo = fleet.keys.tls.operator("demo");
    let tls = TlsArgs { tls_ca: Some(demo.ca), tls_cert: Some(demo.cert), tls_key: Some(demo.key), insecure: false };
    let target = Target::new(fleet.coordinator().url(), tls);
    println!(
        "  coordinator  {}  (embedded store {})",
        fleet.coordinator().url(),
        fleet.coordinator().data_dir.display()
    );
    println!(
        "  mutual TLS on: every process holds a certificate of a development CA ({})",
        fleet.keys.tls.dir.display()
    );
    for node in &fleet.nodes {
        println!(
            "  {}  agent {}  zone server {} pid {} on 127.0.0.1:{}",
            node.agent.node_id,
            node.agent.grpc,
            node.zone.name,
            node.zone.proc.pid(),
            node.zone.port
        );
    }
    fleet.wait_registered()?;
    println!("  all {} nodes registered, each serving one zone server with players connected", args.nodes);
    let keys = fleet.keys.clone();
    let nodes = &mut fleet.nodes;

    // ---- 2: the hotfix --------------------------------------------------------------------
    step("2/5", "rolling out the damage-formula hotfix: canary 1, then waves 25%, 50%, 100%");
    let before = observe(nodes)?;
    println!(
        "  before: a level-1 hero hits the training dummy (armor 4) for {} — the bug adds armor instead of absorbing it",
        before[0].damage
    );
    let hotfix_src = layout.repo.join("examples/patches/hotfix-damage");
    let (hotfix_path, hotfix_id) = {
        let out = work.join("hotfix.hfpatch");
        build_patch_with(layout, &PatchBuild::zone(&hotfix_src, &out, BUILD, "armor absorbs damage", Some(&keys)))?
    };
    crate::patch_cmd::push_file(&target, &hotfix_path, Output::Text, true).await.map_err(|f| f.error)?;
    let spec = rollout_spec(&hotfix_id, args.health_window);
    let bots = start_bots(layout, work, nodes, args.players, bot_seconds(&spec, args.health_window))?;
    let hotfix = start_rollout(&target, spec.clone()).await?;
    let outcome = rollout_cmd::watch(&target, hotfix.clone(), Output::Text).await;
    outcome.map_err(|f| anyhow!("the hotfix rollout did not complete: {:#}", f.error))?;
    let after = observe(nodes)?;
    let bot_report = finish_bots(bots)?;
    prove_hotfix_landed(&before, &after)?;
    println!(
        "\n  after:  the same heroes, on the same connections, hit for {} (was {}); {} zone servers kept their PIDs",
        after[0].damage,
        before[0].damage,
        nodes.len()
    );
    println!("  players' state (level, xp, hp, inventory, position) unchanged by the patch on every server");
    println!("  {bot_report}");

    // ---- 3: the bad patch -----------------------------------------------------------------
    let plan = plan(&target, &spec).await?;
    let wave2 = plan.get(2).and_then(|s| s.first()).cloned().ok_or_else(|| anyhow!("the plan has no wave-2 node"))?;
    let fail_zone = nodes
        .iter()
        .find(|n| n.agent.node_id == wave2)
        .map(|n| n.zone.name.clone())
        .ok_or_else(|| anyhow!("wave-2 node {wave2} is not in this demo"))?;
    step(
        "3/5",
        &format!("rolling out a patch whose __reload_instance__ hook fails on {wave2} ({fail_zone}), in wave 2"),
    );
    let bad_src = bad_patch_source(layout, work, &fail_zone)?;
    // It goes on top of the hotfix: agents refuse a patch whose parent is not the top of the stack.
    let bad_build = PatchBuild {
        package: "zone",
        source_root: &bad_src,
        out: &work.join("bad-hook.hfpatch"),
        target_build: BUILD,
        description: "titles for everyone",
        keys: Some(&keys),
        parent: Some(&hotfix_id),
    };
    let (bad_path, bad_id) = build_patch_with(layout, &bad_build)?;
    crate::patch_cmd::push_file(&target, &bad_path, Output::Text, true).await.map_err(|f| f.error)?;
    let before_bad = observe(nodes)?;
    let bad_spec = rollout_spec(&bad_id, args.health_window);
    let bots = start_bots(layout, work, nodes, args.players, bot_seconds(&bad_spec, args.health_window))?;
    let bad = start_rollout(&target, bad_spec).await?;
    let bad_outcome = rollout_cmd::watch(&target, bad.clone(), Output::Text).await;
    let after_bad = observe(nodes)?;
    let bot_report_bad = finish_bots(bots)?;
    match bad_outcome {
        Err(failure) if failure.code == crate::exit::ROLLED_BACK => {}
        Err(failure) => bail!("the bad rollout ended unexpectedly: {:#}", failure.error),
        Ok(()) => bail!("the bad patch completed: its hook was supposed to fail on {wave2}"),
    }

    // ---- 4: consistency -----------------------------------------------------------------
    step("4/5", "checking every process runs exactly what the store says");
    for (i, node) in nodes.iter_mut().enumerate() {
        let (b, a) = (&before_bad[i], &after_bad[i]);
        if a.pid != b.pid || a.damage != b.damage || a.player.get("title").is_some() {
            bail!(
                "{} is not back to the hotfix after the rollback: before {:?}, after {:?}",
                node.zone.name,
                b.pid,
                a.pid
            );
        }
        if !node.probe.connected() {
            bail!("the probe player on {} lost its connection", node.zone.name);
        }
    }
    for node in nodes.iter() {
        // A class whose migration hook was undone must still make new instances.
        let mut newcomer = hotfleet_localfleet::Player::connect(node.zone.port, "newcomer")?;
        if newcomer.hit_dummy()? != after[0].damage {
            bail!("a player logging in to {} after the rollback does not see the hotfix", node.zone.name);
        }
    }
    println!("  new players can log in on every server after the rollback, and see the hotfix");
    let stacks = fleet_stacks(&target).await?;
    for (node, stack) in &stacks {
        if stack != &vec![hotfix_id.clone()] {
            bail!("{node} runs patch stack {stack:?}, expected only the hotfix {hotfix_id}");
        }
    }
    println!("  {} nodes: patch stack = [hotfix {}], no trace of the bad patch", stacks.len(), short(&hotfix_id));
    println!("  {bot_report_bad}");

    // ---- 5: summary -----------------------------------------------------------------------
    step("5/5", "summary");
    println!(
        "  hotfix    {}  COMPLETED    damage {} -> {} on {} live servers, 0 restarts, 0 disconnects",
        short(&hotfix_id),
        before[0].damage,
        after[0].damage,
        nodes.len()
    );
    println!(
        "  bad patch {}  ROLLED BACK  hook failed on {wave2}; canary and wave 1 reverted automatically",
        short(&bad_id)
    );
    println!("  rollouts  {hotfix} and {bad}: `hotfleet rollout status ID` shows every step");
    println!("  took {:.1} s; stopping every process the demo started", started.elapsed().as_secs_f64());
    drop(fleet);
    Ok(())
}

fn step(n: &str, what: &str) {
    println!("\n== [{n}] {what}");
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

fn rollout_spec(patch_id: &str, window: Duration) -> RolloutSpec {
    RolloutSpec {
        patch_id: patch_id.to_string(),
        selector: "all".into(),
        canary: "1".into(),
        waves: vec!["25%".into(), "50%".into(), "100%".into()],
        health_window_ms: window.as_millis() as u64,
        step_deadline_ms: 30_000,
        description: "hotfleet demo".into(),
        ..Default::default()
    }
}

/// How long the simulated players play: long enough to span a whole rollout.
fn bot_seconds(spec: &RolloutSpec, window: Duration) -> f64 {
    let steps = 1 + spec.waves.len();
    (steps as f64) * (window.as_secs_f64() + 1.5) + 4.0
}

async fn start_rollout(target: &Target, spec: RolloutSpec) -> anyhow::Result<String> {
    let mut client = target.connect().await.map_err(|f| f.error)?;
    let rollout = client
        .start_rollout(target.request(StartRolloutRequest {
            spec: Some(spec),
            dry_run: false,
            target_build: String::new(),
            plan_canary: false,
        }))
        .await
        .map_err(|s| anyhow!("the coordinator refused the rollout: {}", s.message()))?
        .into_inner()
        .rollout
        .ok_or_else(|| anyhow!("no rollout in the answer"))?;
    println!("  rollout {} started:", rollout.rollout_id);
    for step in &rollout.steps {
        println!("    {:<8} {}", step.name, step.node_ids.join(" "));
    }
    Ok(rollout.rollout_id)
}

/// The node ids of each step the coordinator would plan for `spec` (dry run).
async fn plan(target: &Target, spec: &RolloutSpec) -> anyhow::Result<Vec<Vec<String>>> {
    let mut client = target.connect().await.map_err(|f| f.error)?;
    let rollout = client
        .start_rollout(target.request(StartRolloutRequest {
            spec: Some(spec.clone()),
            dry_run: true,
            target_build: String::new(),
            plan_canary: false,
        }))
        .await
        .map_err(|s| anyhow!("planning failed: {}", s.message()))?
        .into_inner()
        .rollout
        .ok_or_else(|| anyhow!("no plan in the answer"))?;
    Ok(rollout.steps.into_iter().map(|s| s.node_ids).collect())
}

async fn fleet_stacks(target: &Target) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let mut client = target.connect().await.map_err(|f| f.error)?;
    // Heartbeats carry what each process reports; give them a beat to catch up.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let nodes =
        client.list_nodes(ListNodesRequest { selector: String::new(), ..Default::default() }).await?.into_inner().nodes;
    let mut stacks = BTreeMap::new();
    for node in nodes {
        let status = node.status.unwrap_or_default();
        for process in status.processes {
            stacks.insert(format!("{} pid {}", status.node_id, process.pid), process.patch_stack);
        }
    }
    Ok(stacks)
}

fn observe(nodes: &mut [FleetNode]) -> anyhow::Result<Vec<Before>> {
    nodes
        .iter_mut()
        .map(|node| {
            let damage = node.probe.hit_dummy()?;
            let stats = node.probe.stats()?;
            Ok(Before { pid: stats["pid"].clone(), damage, player: stats["player"].clone() })
        })
        .collect()
}

fn prove_hotfix_landed(before: &[Before], after: &[Before]) -> anyhow::Result<()> {
    for (i, (b, a)) in before.iter().zip(after).enumerate() {
        if a.pid != b.pid {
            bail!("zone {} restarted (pid {} -> {})", i + 1, b.pid, a.pid);
        }
        if a.damage >= b.damage {
            bail!("zone {}: damage {} -> {}: the hotfix did not take effect", i + 1, b.damage, a.damage);
        }
        for key in ["name", "level", "xp", "inventory", "x", "y"] {
            if a.player[key] != b.player[key] {
                bail!("zone {}: player {key} changed across the patch: {} -> {}", i + 1, b.player[key], a.player[key]);
            }
        }
    }
    Ok(())
}

/// Copies examples/patches/bad-hook and aims its failing hook at `zone`.
fn bad_patch_source(layout: &Layout, work: &Path, zone: &str) -> anyhow::Result<PathBuf> {
    let src = layout.repo.join("examples/patches/bad-hook/zone/players.py");
    let text = std::fs::read_to_string(&src).with_context(|| format!("reading {}", src.display()))?;
    if !text.contains("__HOTFLEET_FAIL_ZONE__") {
        bail!("{} lost its __HOTFLEET_FAIL_ZONE__ placeholder", src.display());
    }
    let root = work.join("bad-hook");
    std::fs::create_dir_all(root.join("zone")).context("creating the bad patch tree")?;
    std::fs::write(root.join("zone/players.py"), text.replace("__HOTFLEET_FAIL_ZONE__", zone))
        .context("writing the bad patch")?;
    Ok(root)
}

struct Bots(Vec<Proc>);

fn start_bots(
    layout: &Layout,
    work: &Path,
    nodes: &[FleetNode],
    per_zone: usize,
    seconds: f64,
) -> anyhow::Result<Bots> {
    let mut bots = Vec::new();
    if per_zone == 0 {
        return Ok(Bots(bots));
    }
    for node in nodes {
        let mut cmd = Command::new(&layout.python);
        cmd.arg(layout.repo.join("examples/zone_server/player_bot.py"))
            .args(["--port", &node.zone.port.to_string()])
            .args(["--name", &format!("bot_{}", node.zone.name.replace('-', "_"))])
            .args(["--count", &per_zone.to_string(), "--duration", &format!("{seconds:.1}"), "--interval", "0.25"])
            .stdin(Stdio::null());
        let name = format!("bots-{}-{}", node.zone.name, bots.len());
        bots.push(Proc::spawn(&name, cmd, work)?);
    }
    Ok(Bots(bots))
}

/// Waits for the simulated players to finish and checks none lost its connection.
fn finish_bots(mut bots: Bots) -> anyhow::Result<String> {
    let mut players = 0;
    let mut sent = 0;
    let mut damage_seen = Vec::new();
    for bot in &mut bots.0 {
        let status = bot.child.wait().context("waiting for simulated players")?;
        let text = bot.log_text();
        let summary: Value = text
            .lines()
            .rev()
            .find_map(|line| serde_json::from_str(line).ok())
            .ok_or_else(|| anyhow!("{} printed no summary (see {})", bot.name, bot.log.display()))?;
        if !status.success() || summary["connected_throughout"] != true {
            bail!("simulated players of {} lost their connection (see {})", bot.name, bot.log.display());
        }
        players += summary["bots"].as_u64().unwrap_or(0);
        sent += summary["sent"].as_u64().unwrap_or(0);
        if let Some(values) = summary["damage_values"].as_array() {
            let values: Vec<String> = values.iter().map(Value::to_string).collect();
            let seen = values.join("->");
            if !damage_seen.contains(&seen) {
                damage_seen.push(seen);
            }
        }
    }
    Ok(format!(
        "{players} simulated players sent {sent} requests during the rollout, none disconnected; damage they saw: {}",
        damage_seen.join(", ")
    ))
}
