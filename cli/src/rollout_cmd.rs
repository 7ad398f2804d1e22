//! `hotfleet rollout start|list|status|describe|watch|pause|resume|promote|abort|cancel`.

use std::{collections::BTreeMap, io::IsTerminal, path::Path, time::Duration};

use anyhow::anyhow;
use clap::{Args, Subcommand};
use hotfleet_proto::{
    duration::{format_duration_ms, parse_duration},
    v1::{
        GetFreezeRequest, GetRolloutRequest, ListRolloutsRequest, Rollout, RolloutActionRequest, RolloutKind,
        RolloutPhase, RolloutSpec, StartRolloutRequest, WatchRolloutRequest,
    },
};

use hotfleet_coordinator::rollout::MERGED_EVENT;

use crate::{
    client::{failure, transient, Target},
    exit::{CliResult, Failure, ROLLED_BACK},
    ids,
    output::{format_ms, Output},
    patch_cmd, tree, views,
};

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Start a rollout of a staged patch (an id, or a bundle file to push first).
    Start(Box<StartArgs>),
    /// Take a completed patch off every process of its build, as a rollout
    /// (the same canary, waves, health gates and automatic rollback): the top
    /// of the build's stack, or a deeper patch when the patches above it touch
    /// none of its modules. On completion the build's stack no longer holds it.
    /// Restores code, not data its hooks migrated.
    Revert(Box<StartArgs>),
    /// Rollouts, newest first.
    List {
        /// Only rollouts still running.
        #[arg(long)]
        active: bool,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// One rollout: phase and why it waits, steps, per-node state.
    Status { id: String },
    /// One rollout in full: spec, plan, each step, each node's desired and
    /// observed state, why it waits (with the window's countdown), and the
    /// event log of who did what.
    Describe { id: String },
    /// Follow a rollout live until it ends, across coordinator restarts and fail-overs
    /// (exit 0 completed, 3 rolled back, 5 no coordinator answered for 60 s).
    Watch { id: String },
    /// Hold before the next step.
    Pause(Action),
    /// Continue after a pause.
    Resume(Action),
    /// Open the manual gate the rollout waits at.
    Promote(Action),
    /// Roll everything back now.
    Abort(Action),
    /// Cancel a scheduled rollout before it starts (an abort: once running, it rolls back).
    Cancel(Action),
}

#[derive(Debug, Args)]
pub struct Action {
    id: String,
    #[arg(long, default_value = "")]
    reason: String,
}

/// A flag left out is left out of the request too: the coordinator applies
/// its defaults (one place for them), stated here only for the help text.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// Patch id, or a path to a .hfpatch bundle (`start` pushes it first; `revert` only reads its id).
    patch: String,
    /// Canary size: a count or a percent of the targets [default: 1].
    #[arg(long)]
    canary: Option<String>,
    /// Waves after the canary: counts or cumulative percents, e.g. 25%,50%,100% [default: 100%].
    #[arg(long, value_delimiter = ',')]
    waves: Vec<String>,
    /// Health window after each step [default: 10s].
    #[arg(long, value_parser = parse_duration)]
    health_window: Option<Duration>,
    /// Deadline of each step's prepare or commit [default: 60s].
    #[arg(long, value_parser = parse_duration)]
    step_deadline: Option<Duration>,
    /// How long agents keep this rollout's prepared patch after they last
    /// heard of the rollout from the leading coordinator (its heartbeat
    /// answers renew it), before they presume abort; whole seconds, rounded
    /// up; at least 3 of the coordinator's heartbeat intervals [default: the
    /// agents' --prepare-ttl, 120s]. Not the rollout's duration: gates and
    /// windows may last hours.
    #[arg(long, value_parser = parse_ttl)]
    prepare_ttl: Option<u32>,
    /// Target nodes: "all", or kubectl-style requirements joined by commas:
    /// k=v, k!=v, "k in (a,b)", "k notin (a,b)", k, !k [default: all].
    #[arg(long, short = 'l')]
    selector: Option<String>,
    /// Pause before these steps until `rollout promote`, e.g. wave-2. Repeatable.
    #[arg(long = "pause-before", value_delimiter = ',')]
    pause_before: Vec<String>,
    /// Unhealthy or lost nodes tolerated before rolling back [default: 0].
    #[arg(long)]
    max_unhealthy: Option<u32>,
    /// Fail the health gate when tick p99 exceeds this multiple of the baseline [default: 3].
    #[arg(long)]
    tick_p99_factor: Option<f64>,
    /// ... and exceeds the baseline by at least this much, so scheduler noise on a busy
    /// host is not a regression [default: 20ms].
    #[arg(long, value_parser = parse_duration)]
    tick_p99_floor: Option<Duration>,
    #[arg(long, default_value = "")]
    description: String,
    /// Start at this time (RFC 3339, e.g. 2026-12-24T03:00:00Z) instead of now: the
    /// rollout is stored as SCHEDULED (listed, cancellable with `rollout cancel`)
    /// and starts within a second of it, on whichever coordinator leads then.
    #[arg(long, value_parser = parse_at)]
    at: Option<u64>,
    /// Allowed window HH:MM-HH:MM (seconds optional), repeatable: no step starts
    /// outside the windows; one closing mid-rollout pauses it until the next.
    #[arg(long = "window")]
    windows: Vec<String>,
    /// IANA time zone of --window, e.g. Europe/Berlin [default: UTC].
    #[arg(long, requires = "windows")]
    window_tz: Option<String>,
    /// Days the --window(s) open on, e.g. mon-fri or sat,sun [default: every day].
    #[arg(long, requires = "windows")]
    window_days: Option<String>,
    /// Show the plan without starting anything (a bundle file is read and verified here, not pushed).
    #[arg(long)]
    dry_run: bool,
    /// With --dry-run: also show what the patch would do inside the canary's
    /// game process (the runtime's plan, as `patch plan`; nothing committed).
    #[arg(long, requires = "dry_run")]
    plan_canary: bool,
    /// Follow the rollout until it ends, like `rollout watch`.
    #[arg(long)]
    watch: bool,
    /// (start only) The patch was built on an ancestor of the top of its
    /// build's stack, not the top: accepted when the patches above that
    /// ancestor touch none of its modules (refused otherwise, naming them).
    #[arg(long)]
    rebase: bool,
}

/// `--at`: an RFC 3339 time as Unix ms (whether it lies ahead is the coordinator's call).
fn parse_at(text: &str) -> Result<u64, String> {
    let at = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("{text:?} is not an RFC 3339 time like 2026-12-24T03:00:00Z: {e}"))?;
    u64::try_from(at.unix_timestamp_nanos() / 1_000_000).map_err(|_| format!("{text:?} is before 1970"))
}

/// `--prepare-ttl`: a duration in whole seconds (rounded up), not zero.
fn parse_ttl(text: &str) -> Result<u32, String> {
    let ttl = parse_duration(text)?;
    if ttl.is_zero() {
        return Err("the prepare TTL must be longer than 0s (leave the flag out for the agents' default)".into());
    }
    let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    u32::try_from(seconds).map_err(|_| format!("{text:?} is too long for a prepare TTL"))
}

pub async fn run(target: &Target, cmd: RolloutCommand, output: Output) -> CliResult {
    match cmd {
        RolloutCommand::Start(args) => {
            let kind = if args.rebase { RolloutKind::Rebase } else { RolloutKind::Apply };
            start(target, *args, kind, output).await
        }
        RolloutCommand::Revert(args) if args.rebase => {
            Err(Failure::refused(anyhow!("--rebase is for `rollout start`; a revert takes a patch off the stack")))
        }
        RolloutCommand::Revert(args) => start(target, *args, RolloutKind::Revert, output).await,
        RolloutCommand::List { active, limit } => list(target, active, limit, output).await,
        RolloutCommand::Status { id } => status(target, id, output, false).await,
        RolloutCommand::Describe { id } => status(target, id, output, true).await,
        RolloutCommand::Watch { id } => watch(target, id, output).await,
        RolloutCommand::Pause(a) => action(target, "pause", a, output).await,
        RolloutCommand::Resume(a) => action(target, "resume", a, output).await,
        RolloutCommand::Promote(a) => action(target, "promote", a, output).await,
        RolloutCommand::Abort(a) => action(target, "abort", a, output).await,
        RolloutCommand::Cancel(a) => action(target, "cancel", a, output).await,
    }
}

async fn start(target: &Target, args: StartArgs, kind: RolloutKind, output: Output) -> CliResult {
    if let Some(selector) = &args.selector {
        crate::fleet_cmd::check_selector(selector)?;
    }
    // A dry run of a local bundle pushes nothing: the bundle is read and
    // verified here, and the coordinator plans it with the build it names.
    let mut target_build = String::new();
    let patch_id = if Path::new(&args.patch).is_file() && kind == RolloutKind::Revert {
        // A revert names a patch the coordinator holds: its bundle only says which.
        patch_cmd::read_bundle(Path::new(&args.patch))?.id()
    } else if Path::new(&args.patch).is_file() && args.dry_run {
        let bundle = patch_cmd::read_bundle(Path::new(&args.patch))?;
        target_build = bundle.manifest.target_build.clone();
        bundle.id()
    } else if Path::new(&args.patch).is_file() {
        patch_cmd::push_file(target, Path::new(&args.patch), Output::Text, output == Output::Text).await?
    } else if hotfleet_patch::is_patch_id(&args.patch) {
        args.patch.clone()
    } else if !args.patch.is_empty() && args.patch.chars().all(|c| c.is_ascii_hexdigit()) {
        // A prefix, as `nodes list` and `patch list` print ids.
        ids::resolve("patch", &args.patch, &patch_cmd::known_patches(target).await?)?
    } else {
        return Err(Failure::refused(anyhow!(
            "{:?} is neither a patch id (or its prefix) nor a bundle file",
            args.patch
        )));
    };
    // Absent stays absent (proto3: empty or zero); the coordinator fills in its defaults.
    let millis = |d: Option<Duration>| d.map(|d| d.as_millis() as u64).unwrap_or_default();
    let spec = RolloutSpec {
        patch_id,
        selector: args.selector.unwrap_or_default(),
        canary: args.canary.unwrap_or_default(),
        waves: args.waves,
        health_window_ms: millis(args.health_window),
        step_deadline_ms: millis(args.step_deadline),
        max_unhealthy: args.max_unhealthy.unwrap_or_default(),
        pause_before: args.pause_before,
        tick_p99_factor: args.tick_p99_factor.unwrap_or_default(),
        tick_p99_floor_ms: args.tick_p99_floor.map(|d| d.as_secs_f64() * 1000.0).unwrap_or_default(),
        prepare_ttl_seconds: args.prepare_ttl.unwrap_or_default(),
        description: args.description,
        start_at_ms: args.at.unwrap_or_default(),
        windows: match &args.window_days {
            Some(days) => args.windows.iter().map(|w| format!("{w} {days}")).collect(),
            None => args.windows,
        },
        window_tz: args.window_tz.unwrap_or_default(),
        kind: kind.into(),
    };
    let mut client = target.connect().await?;
    let request =
        StartRolloutRequest { spec: Some(spec), dry_run: args.dry_run, target_build, plan_canary: args.plan_canary };
    let answer = client
        .start_rollout(target.request(request))
        .await
        .map_err(|s| failure("the coordinator refused the rollout", s))?
        .into_inner();
    let rollout = answer.rollout.ok_or_else(|| anyhow!("coordinator answered without a rollout"))?;
    if let Some(plan) = answer.canary_plan {
        if output.structured() {
            output.print(&serde_json::json!({
                "rollout": views::rollout(&rollout),
                "canaryPlan": crate::plan_cmd::as_json(&plan),
            }));
        } else {
            println!("plan (dry run: nothing started, nothing pushed)");
            print_plan(&rollout);
            crate::plan_cmd::print_text(&plan);
        }
        return Ok(());
    }
    if args.watch && !args.dry_run {
        if output == Output::Text {
            println!("{}rollout {} started", kind_label(&rollout), rollout.rollout_id);
            print_plan(&rollout);
        }
        return watch(target, rollout.rollout_id, output).await;
    }
    if output.structured() {
        output.print(&views::rollout(&rollout));
    } else {
        if args.dry_run {
            println!("plan (dry run: nothing started, nothing pushed)");
        } else {
            println!("started {}rollout {}", kind_label(&rollout), rollout.rollout_id);
        }
        print_plan(&rollout);
        if !args.dry_run {
            println!("follow it: hotfleet rollout watch {}", rollout.rollout_id);
        }
    }
    Ok(())
}

async fn list(target: &Target, active_only: bool, limit: u32, output: Output) -> CliResult {
    let mut client = target.connect().await?;
    let rollouts = client
        .list_rollouts(target.request(ListRolloutsRequest { active_only, limit }))
        .await
        .map_err(|s| failure("listing rollouts failed", s))?
        .into_inner()
        .rollouts;
    if output.structured() {
        output.print(&views::list("RolloutList", rollouts.iter().map(views::Rollout::from).collect()));
        return Ok(());
    }
    if let Some(frozen) = frozen_line(target).await {
        println!("{frozen}");
    }
    for r in &rollouts {
        let patch =
            r.spec.as_ref().map(|s| s.patch_id.get(..12).unwrap_or(&s.patch_id).to_string()).unwrap_or_default();
        println!(
            "{:<28} {:<13} {:<6} patch {} nodes {:<4} {} {}",
            r.rollout_id,
            phase_name(r.phase),
            kind_name(r.spec.as_ref().map(|s| s.kind()).unwrap_or_default()),
            patch,
            node_count(r),
            format_ms(r.created_at_ms),
            scheduled_or_reason(r)
        );
    }
    Ok(())
}

async fn get(target: &Target, id: String) -> Result<Rollout, Failure> {
    let mut client = target.connect().await?;
    let mut answer = client.get_rollout(target.request(GetRolloutRequest { rollout_id: id.clone() })).await;
    if matches!(&answer, Err(s) if s.code() == tonic::Code::NotFound) {
        let full = ids::resolve("rollout", &id, &known_rollouts(target).await?)?;
        answer = client.get_rollout(target.request(GetRolloutRequest { rollout_id: full })).await;
    }
    answer
        .map_err(|s| failure(&format!("rollout {id}"), s))?
        .into_inner()
        .rollout
        .ok_or_else(|| anyhow!("coordinator answered without a rollout").into())
}

/// Every rollout id the coordinator keeps (newest first), for prefixes and suggestions.
async fn known_rollouts(target: &Target) -> Result<Vec<String>, Failure> {
    let mut client = target.connect().await?;
    let request = target.request(ListRolloutsRequest { active_only: false, limit: 1000 });
    let rollouts = client.list_rollouts(request).await.map_err(|s| failure("listing rollouts failed", s))?;
    Ok(rollouts.into_inner().rollouts.into_iter().map(|r| r.rollout_id).collect())
}

/// The full id `given` names: itself if the coordinator knows it, else the
/// one rollout it is a prefix of.
async fn resolve_rollout(target: &Target, given: String) -> Result<String, Failure> {
    Ok(get(target, given).await?.rollout_id)
}

async fn status(target: &Target, id: String, output: Output, full: bool) -> CliResult {
    let rollout = get(target, id).await?;
    if output.structured() {
        output.print(&views::rollout(&rollout));
        return Ok(());
    }
    if let Some(frozen) = frozen_line(target).await {
        println!("{frozen}");
    }
    if full {
        print_spec(&rollout);
    }
    print_summary(&rollout);
    if full {
        print_plan_notes(&rollout);
        println!("events:");
        for event in &rollout.events {
            println!("  {} {}", format_ms(event.at_ms), event.message);
        }
    }
    Ok(())
}

/// `fleet    FROZEN by X: reason`, when the fleet is frozen (asked separately:
/// a freeze is the fleet's, not the rollout's); nothing if unknown.
async fn frozen_line(target: &Target) -> Option<String> {
    let mut client = target.connect().await.ok()?;
    let status = client.get_freeze(target.request(GetFreezeRequest {})).await.ok()?.into_inner();
    status.frozen.then(|| {
        let why = if status.reason.is_empty() { String::new() } else { format!(": {}", status.reason) };
        format!("fleet    FROZEN by {}{why} (no rollout starts a new step; hotfleet unfreeze)", status.by)
    })
}

/// The spec as the flags that would start it again.
fn print_spec(r: &Rollout) {
    let Some(spec) = &r.spec else { return };
    println!(
        "spec     canary {}  waves {}  selector {}",
        or(&spec.canary, "1"),
        spec.waves.join(","),
        or(&spec.selector, "all")
    );
    println!(
        "         health window {}  step deadline {}  max unhealthy {}  tick p99 factor {}  prepare TTL {}",
        format_duration_ms(spec.health_window_ms),
        format_duration_ms(spec.step_deadline_ms),
        spec.max_unhealthy,
        spec.tick_p99_factor,
        if spec.prepare_ttl_seconds == 0 {
            "agents' default".to_string()
        } else {
            format!("{}s", spec.prepare_ttl_seconds)
        }
    );
    println!("created  {} by {}", format_ms(r.created_at_ms), r.created_by);
    if !spec.description.is_empty() {
        println!("about    {}", spec.description);
    }
}

fn or<'a>(text: &'a str, default: &'a str) -> &'a str {
    if text.is_empty() {
        default
    } else {
        text
    }
}

/// What the rollout is doing right now, in words: why it waits, or how
/// long the running health window has left.
pub fn now_doing(r: &Rollout, now_ms: u64) -> Option<String> {
    if !r.waiting_reason.is_empty() {
        return Some(format!("waiting: {}", r.waiting_reason));
    }
    let watching = RolloutPhase::try_from(r.phase) == Ok(RolloutPhase::Watching);
    if watching && r.window_ends_at_ms > 0 {
        let window = r.spec.as_ref().map(|s| format_duration_ms(s.health_window_ms)).unwrap_or_default();
        let left = r.window_ends_at_ms.saturating_sub(now_ms);
        return Some(format!("health window {window}, {} left", format_duration_ms(left.div_ceil(1000) * 1000)));
    }
    None
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

async fn action(target: &Target, what: &str, action: Action, output: Output) -> CliResult {
    let id = resolve_rollout(target, action.id).await?;
    let mut client = target.connect().await?;
    let request = target.request(RolloutActionRequest { rollout_id: id.clone(), reason: action.reason });
    let result = match what {
        "cancel" => {
            // A cancel is an abort that says so in the audit log and the rollout's reason.
            let mut request = request;
            let reason = &mut request.get_mut().reason;
            *reason = if reason.is_empty() { "cancelled".into() } else { format!("cancelled: {reason}") };
            client.abort_rollout(request).await
        }
        "pause" => client.pause_rollout(request).await,
        "resume" => client.resume_rollout(request).await,
        "promote" => client.promote_rollout(request).await,
        _ => client.abort_rollout(request).await,
    };
    let rollout = result.map_err(|s| failure(&format!("{what} of rollout {id} refused"), s))?.into_inner().rollout;
    if output.structured() {
        if let Some(r) = &rollout {
            output.print(&views::rollout(r));
        }
    } else if let Some(r) = rollout {
        println!("rollout {}: {what} accepted; now {}", r.rollout_id, phase_name(r.phase));
    }
    Ok(())
}

/// How long a watch keeps trying to get back to a coordinator (a fail-over
/// takes about the leader lease; a restart a few seconds).
const RECONNECT_FOR: Duration = Duration::from_secs(60);

/// Follows a rollout until it is terminal; exit code from how it ended.
///
/// A coordinator going away mid-watch (killed, restarted, deposed) is not the
/// end of the rollout: the watch reconnects (to the new leader, or any
/// coordinator: they all serve it) and carries on where it was.
pub async fn watch(target: &Target, id: String, output: Output) -> CliResult {
    let id = resolve_rollout(target, id).await?;
    let mut printed_events = 0;
    let mut last_line = String::new();
    // On a terminal the tree is redrawn in place; piped, one line per change.
    let mut tree = (output == Output::Text && std::io::stdout().is_terminal()).then(tree::Redraw::default);
    let mut last: Option<Rollout> = None;
    let mut lost_since: Option<std::time::Instant> = None;
    'watching: loop {
        let opened = match target.connect().await {
            Ok(mut client) => client
                .watch_rollout(target.request(WatchRolloutRequest { rollout_id: id.clone() }))
                .await
                .map(|r| r.into_inner())
                .map_err(Some),
            Err(f) if f.code == crate::exit::UNREACHABLE && last.is_some() => Err(None),
            Err(f) => return Err(f),
        };
        // On a terminal the health-window countdown moves between snapshots:
        // the tree is redrawn from the last snapshot every second.
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let why = match opened {
            Ok(mut stream) => loop {
                let message = tokio::select! {
                    message = stream.message() => message,
                    _ = tick.tick(), if tree.is_some() => {
                        if let (Some(tree), Some(rollout)) = (&mut tree, &last) {
                            tree.show(&[], &tree::render(rollout, now_ms()));
                        }
                        continue;
                    }
                };
                match message {
                    Ok(Some(rollout)) => {
                        lost_since = None;
                        if output.structured() {
                            // One JSON document per line (easy to stream into jq), or a YAML document each.
                            output.print_streamed(&views::rollout(&rollout));
                        } else if let Some(tree) = &mut tree {
                            let events: Vec<String> = rollout
                                .events
                                .iter()
                                .skip(printed_events)
                                .map(|e| format!("  {} {}", format_ms(e.at_ms), e.message))
                                .collect();
                            printed_events = rollout.events.len();
                            tree.show(&events, &tree::render(&rollout, now_ms()));
                        } else {
                            for event in rollout.events.iter().skip(printed_events) {
                                println!("  {} {}", format_ms(event.at_ms), event.message);
                            }
                            printed_events = rollout.events.len();
                            let line = progress_line(&rollout);
                            if line != last_line {
                                println!("{line}");
                                last_line = line;
                            }
                        }
                        let terminal = rollout.terminal;
                        last = Some(rollout);
                        if terminal {
                            break 'watching;
                        }
                    }
                    // Ended without a final state: its coordinator shut down.
                    Ok(None) => break "the coordinator closed the watch".to_string(),
                    Err(s) if transient(&s) => break s.message().to_string(),
                    Err(s) => return Err(failure(&format!("watching rollout {id}"), s)),
                }
            },
            Err(Some(s)) if transient(&s) => s.message().to_string(),
            Err(Some(s)) => return Err(failure(&format!("watching rollout {id}"), s)),
            Err(None) => "no coordinator reachable".to_string(),
        };
        let since = *lost_since.get_or_insert_with(|| {
            eprintln!("watch: lost the coordinator ({why}); reconnecting to the leader...");
            std::time::Instant::now()
        });
        if since.elapsed() > RECONNECT_FOR {
            return Err(Failure {
                code: crate::exit::UNREACHABLE,
                error: anyhow!(
                    "watching rollout {id}: no coordinator answered for {} s ({why})",
                    RECONNECT_FOR.as_secs()
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let rollout = last.ok_or_else(|| anyhow!("the coordinator closed the watch without a snapshot"))?;
    if output == Output::Text {
        println!();
        print_summary(&rollout);
    }
    finished(&rollout)
}

/// Exit status of a finished (or abandoned) rollout.
pub fn finished(rollout: &Rollout) -> CliResult {
    match RolloutPhase::try_from(rollout.phase) {
        Ok(RolloutPhase::Completed) => Ok(()),
        Ok(RolloutPhase::RolledBack) => Err(Failure {
            code: ROLLED_BACK,
            error: anyhow!("rollout {} rolled back: {}", rollout.rollout_id, rollout.reason),
        }),
        _ => {
            Err(anyhow!("rollout {} did not finish (watch ended in {})", rollout.rollout_id, phase_name(rollout.phase))
                .into())
        }
    }
}

/// A scheduled rollout's start time, else why it rolled back (if it did).
fn scheduled_or_reason(r: &Rollout) -> String {
    match r.spec.as_ref().map(|s| s.start_at_ms) {
        Some(at) if at > 0 && r.phase == RolloutPhase::Scheduled as i32 => format!("starts {}", format_ms(at)),
        _ => r.reason.clone(),
    }
}

pub fn phase_name(phase: i32) -> &'static str {
    match RolloutPhase::try_from(phase) {
        Ok(RolloutPhase::Scheduled) => "scheduled",
        Ok(RolloutPhase::Staged) => "staged",
        Ok(RolloutPhase::Preparing) => "preparing",
        Ok(RolloutPhase::Committing) => "committing",
        Ok(RolloutPhase::Watching) => "watching",
        Ok(RolloutPhase::Waiting) => "waiting",
        Ok(RolloutPhase::Completed) => "completed",
        Ok(RolloutPhase::RollingBack) => "rolling-back",
        Ok(RolloutPhase::RolledBack) => "rolled-back",
        _ => "unknown",
    }
}

/// The rollout's nodes: a listing leaves out per-node detail, so count the plan's steps.
fn node_count(r: &Rollout) -> usize {
    if r.nodes.is_empty() {
        r.steps.iter().map(|s| s.node_ids.len()).sum()
    } else {
        r.nodes.len()
    }
}

fn progress_line(r: &Rollout) -> String {
    let step = r.steps.get(r.current_step as usize).map(|s| s.name.as_str()).unwrap_or("-");
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for node in &r.nodes {
        *counts.entry(node.observed.as_str()).or_default() += 1;
    }
    let counts: Vec<String> = counts.iter().map(|(state, n)| format!("{state} {n}")).collect();
    let mut line = format!("[{}] {:<8} {}", phase_name(r.phase), step, counts.join(", "));
    // The countdown is left out: it would make every snapshot a new line.
    if !r.waiting_reason.is_empty() {
        line.push_str(&format!("  (waiting: {})", r.waiting_reason));
    }
    line
}

fn print_plan(r: &Rollout) {
    for step in &r.steps {
        println!(
            "  {:<8} {}{}",
            step.name,
            step.node_ids.join(" "),
            if step.pause_before { "  [manual gate]" } else { "" }
        );
    }
    for skipped in &r.skipped {
        println!("  skipped  {}: {}", skipped.node_id, skipped.reason);
    }
    print_plan_notes(r);
}

/// How the plan merged the requested waves on this fleet, if it did.
fn print_plan_notes(r: &Rollout) {
    for merged in r.events.iter().filter_map(|e| e.message.strip_prefix(MERGED_EVENT)) {
        println!("  note     {merged}");
    }
}

/// The word a rollout's kind shows as (`rollout list`, `get`, `-o json`).
pub fn kind_name(kind: RolloutKind) -> &'static str {
    match kind {
        RolloutKind::Apply => "apply",
        RolloutKind::Revert => "revert",
        RolloutKind::Rebase => "rebase",
    }
}

/// "revert " / "rebase " before "rollout" in a start's first line; nothing for a plain one.
fn kind_label(r: &Rollout) -> &'static str {
    match r.spec.as_ref().map(|s| s.kind()).unwrap_or_default() {
        RolloutKind::Apply => "",
        RolloutKind::Revert => "revert ",
        RolloutKind::Rebase => "rebase ",
    }
}

fn print_summary(r: &Rollout) {
    let patch = r.spec.as_ref().map(|s| s.patch_id.clone()).unwrap_or_default();
    let doing = now_doing(r, now_ms()).map(|d| format!("  ({d})")).unwrap_or_default();
    println!("rollout  {}  {}{doing}", r.rollout_id, phase_name(r.phase).to_uppercase());
    let kind = r.spec.as_ref().map(|s| s.kind()).unwrap_or_default();
    println!("patch    {patch}  (build {})  kind {}", r.target_build, kind_name(kind));
    if r.phase == RolloutPhase::Scheduled as i32 {
        println!("starts   {}", scheduled_or_reason(r));
    }
    if !r.reason.is_empty() {
        println!("reason   {}", r.reason);
    }
    if !r.faulty_nodes.is_empty() {
        println!("at fault {}", r.faulty_nodes.join(", "));
    }
    for step in &r.steps {
        println!("  {:<8} {:<12} {}", step.name, step.state, step.node_ids.join(" "));
    }
    println!("  {:<16} {:<8} {:<10} {:<14} health / error", "node", "step", "desired", "observed");
    for n in &r.nodes {
        let detail = if n.error.is_empty() { n.health.as_str() } else { n.error.as_str() };
        println!("  {:<16} {:<8} {:<10} {:<14} {}", n.node_id, n.step, n.desired, n.observed, detail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepare_ttl_is_whole_seconds_rounded_up_and_never_zero() {
        assert_eq!(parse_ttl("2s"), Ok(2));
        assert_eq!(parse_ttl("1500ms"), Ok(2));
        assert_eq!(parse_ttl("2m"), Ok(120));
        assert!(parse_ttl("0s").is_err_and(|e| e.contains("longer than 0s")));
        assert!(parse_ttl("soon").is_err());
    }
}
