//! `hotfleet nodes list`, `nodes remove`, `freeze`, `unfreeze`, `audit`, `leader`.

use hotfleet_proto::v1::{
    FreezeRequest, ListAuditRequest, ListNodesRequest, NodeInfo, NodesSummary, RemoveNodeRequest, StackDrift,
    UnfreezeRequest,
};

use hotfleet_coordinator::selector::Selector;

use crate::{
    client::{failure, Target},
    exit::{CliResult, Failure},
    output::{format_ms, Output},
    views,
};

/// Checks a `--selector` with the coordinator's own parser, before anything is sent.
pub fn check_selector(text: &str) -> Result<Selector, Failure> {
    Selector::parse(text).map_err(|e| Failure::refused(anyhow::anyhow!(e)))
}

/// Nodes per `ListNodes` page (the coordinator also ends a page before ~2 MiB).
const PAGE_SIZE: u32 = 2000;

/// The nodes `selector` matches, page by page, and their summary; with
/// `summary_only` one page of one node (the summary counts every match).
async fn list_nodes(
    target: &Target,
    selector: &str,
    summary_only: bool,
) -> Result<(Vec<NodeInfo>, NodesSummary), Failure> {
    let mut client = target.connect().await?;
    let mut nodes = Vec::new();
    let mut token = String::new();
    loop {
        let page_size = if summary_only { 1 } else { PAGE_SIZE };
        let request = ListNodesRequest { selector: selector.to_string(), page_size, page_token: token };
        let page = client
            .list_nodes(target.request(request))
            .await
            .map_err(|s| failure("listing nodes failed", s))?
            .into_inner();
        nodes.extend(page.nodes);
        token = page.next_page_token;
        if token.is_empty() || summary_only {
            return Ok((nodes, page.summary.unwrap_or_default()));
        }
    }
}

/// Every registered node's id (for prefixes and suggestions).
async fn registered_ids(target: &Target) -> Result<Vec<String>, Failure> {
    let (nodes, _) = list_nodes(target, "", false).await?;
    Ok(nodes.into_iter().filter_map(|n| n.status.map(|s| s.node_id)).collect())
}

/// The fleet's summary (every node, counted by the coordinator).
pub async fn fleet_summary(target: &Target) -> Result<NodesSummary, Failure> {
    Ok(list_nodes(target, "", true).await?.1)
}

pub async fn nodes_list(target: &Target, selector: String, summary_only: bool, output: Output) -> CliResult {
    let parsed = check_selector(&selector)?;
    let (nodes, summary) = list_nodes(target, &selector, summary_only).await?;
    if summary_only {
        match output {
            Output::Text => println!("{}", summary_text(&summary)),
            _ => output.print(&views::doc("NodesSummary", views::Summary::from(&summary))),
        }
        return Ok(());
    }
    if output.structured() {
        output.print(&views::list("NodeList", nodes.iter().map(views::Node::from).collect()));
        return Ok(());
    }
    if nodes.is_empty() && parsed.is_all() {
        println!("no nodes registered (start hotfleet-agent with --coordinator pointing here)");
    } else if nodes.is_empty() {
        // How many there are at all tells a typo from an empty fleet.
        let registered = fleet_summary(target).await?.total;
        println!("no node matches {parsed} ({registered} nodes registered)");
    }
    for node in &nodes {
        let Some(status) = &node.status else { continue };
        let mut labels: Vec<String> = status.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        println!(
            "{:<16} {:<6} {:<22} {}{}",
            status.node_id,
            node.liveness,
            status.advertise_addr,
            labels.join(","),
            if node.active_rollout_id.is_empty() {
                String::new()
            } else {
                format!("  rollout {}", node.active_rollout_id)
            }
        );
        for p in &status.processes {
            let health = p.health.clone().unwrap_or_default();
            let drift = node.drift.iter().find(|d| d.process_id == p.process_id);
            println!(
                "    pid {:<7} build {:<12} ticks {:<8} p99 {:>7.2} ms  exceptions {:<3} game {:<4} stack [{}]  {}",
                p.pid,
                p.build,
                health.ticks,
                health.tick_p99_ms,
                health.exceptions_since,
                if health.game_ok { "ok" } else { "FAIL" },
                short_ids(p.patch_stack.iter()),
                drift_text(drift)
            );
        }
    }
    if !nodes.is_empty() {
        println!("{}", summary_text(&summary));
    }
    Ok(())
}

/// `7 nodes: 6 alive, 1 lost; builds: zone-1.4.2 7`.
fn summary_text(summary: &NodesSummary) -> String {
    let counts = |m: &std::collections::HashMap<String, u32>| {
        let mut v: Vec<String> = m.iter().map(|(k, n)| format!("{n} {k}")).collect();
        v.sort();
        v.join(", ")
    };
    let mut builds: Vec<String> = summary.by_build.iter().map(|(k, n)| format!("{k} {n}")).collect();
    builds.sort();
    format!("{} nodes: {}; builds: {}", summary.total, counts(&summary.by_liveness), builds.join(", "))
}

/// Patch ids as `nodes list` prints them: the first 12 hex digits, space-separated.
fn short_ids<'a>(ids: impl Iterator<Item = &'a String>) -> String {
    ids.map(|id| id.get(..12).unwrap_or(id)).collect::<Vec<_>>().join(" ")
}

/// The process's stack against its build's: `in sync`, or `DRIFT` naming
/// what it lacks and what it runs beyond it (the coordinator repairs it).
fn drift_text(drift: Option<&StackDrift>) -> String {
    let Some(d) = drift else { return "drift ?".into() };
    match d.state.as_str() {
        "in-sync" => "in sync".into(),
        "drift" => {
            let mut parts = vec!["DRIFT".to_string()];
            if !d.missing.is_empty() {
                parts.push(format!("missing [{}]", short_ids(d.missing.iter())));
            }
            if !d.extra.is_empty() {
                parts.push(format!("extra [{}]", short_ids(d.extra.iter())));
            }
            parts.join(" ")
        }
        "in-rollout" => "in rollout".into(),
        other => format!("drift {other}"),
    }
}

pub async fn freeze(target: &Target, reason: String, output: Output) -> CliResult {
    let mut client = target.connect().await?;
    let status = client
        .freeze(target.request(FreezeRequest { reason }))
        .await
        .map_err(|s| failure("freeze failed", s))?
        .into_inner();
    if output.structured() {
        output.print(&views::doc("Freeze", views::Freeze::from(&status)));
    } else {
        println!("fleet frozen: no rollout starts a new step until `hotfleet unfreeze` (rollbacks still run)");
    }
    Ok(())
}

pub async fn unfreeze(target: &Target, output: Output) -> CliResult {
    let mut client = target.connect().await?;
    let status = client
        .unfreeze(target.request(UnfreezeRequest {}))
        .await
        .map_err(|s| failure("unfreeze failed", s))?
        .into_inner();
    if output.structured() {
        output.print(&views::doc("Freeze", views::Freeze::from(&status)));
    } else {
        println!("fleet unfrozen");
    }
    Ok(())
}

pub async fn nodes_remove(target: &Target, node_id: String, reason: String, output: Output) -> CliResult {
    let node_id = crate::ids::resolve("node", &node_id, &registered_ids(target).await?)?;
    let mut client = target.connect().await?;
    let answer = client
        .remove_node(target.request(RemoveNodeRequest { node_id: node_id.clone(), reason }))
        .await
        .map_err(|s| failure("removing the node failed", s))?
        .into_inner();
    if output.structured() {
        output.print(&views::doc("NodeRemoval", views::NodeRemoval { node_id, was_alive: answer.was_alive }));
    } else if answer.was_alive {
        println!("node {node_id} removed; it was alive: its agent registers again unless it is stopped");
    } else {
        println!("node {node_id} removed");
    }
    Ok(())
}

pub async fn audit(target: &Target, limit: u32, before: Option<u64>, output: Output) -> CliResult {
    let mut client = target.connect().await?;
    let page = client
        .list_audit(target.request(ListAuditRequest { limit, before_seq: before.unwrap_or(0) }))
        .await
        .map_err(|s| failure("reading the audit log failed", s))?
        .into_inner();
    let records = page.records;
    if output.structured() {
        let items = records.iter().map(views::AuditRecord::from).collect();
        let next_before = (page.next_before_seq != 0).then_some(page.next_before_seq);
        output.print(&views::doc("AuditPage", views::AuditPage { items, next_before }));
        return Ok(());
    }
    for r in &records {
        println!(
            "{:>5} {} {:<12} {:<18} {:<5} {} {}",
            r.seq,
            format_ms(r.at_ms),
            r.actor,
            r.action,
            if r.ok { "ok" } else { "REFUSED" },
            r.target.get(..12).unwrap_or(&r.target),
            r.detail
        );
    }
    if page.next_before_seq != 0 {
        println!("older records: hotfleet audit --limit {limit} --before {}", page.next_before_seq);
    }
    Ok(())
}

/// `hotfleet leader`: who leads, as the first reachable coordinator sees it.
pub async fn leader(target: &Target, output: Output) -> CliResult {
    let status = target.leader_status().await?;
    if output.structured() {
        output.print(&views::doc("Leader", views::Leader::from(&status)));
        return Ok(());
    }
    if status.leader_addr.is_empty() {
        println!("leader   none right now (election in progress, or etcd unreachable)");
    } else {
        println!("leader   {}  (epoch {}, store {})", status.leader_addr, status.epoch, status.store);
    }
    let role = if status.is_leader { "the leader" } else { "a follower" };
    println!("asked    {} ({role})", status.self_addr);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drift(state: &str, missing: &[&str], extra: &[&str]) -> StackDrift {
        StackDrift {
            state: state.into(),
            missing: missing.iter().map(|s| s.to_string()).collect(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn drift_names_what_is_missing_and_extra() {
        let d = drift("drift", &["0123456789abcdef"], &["fedcba9876543210"]);
        assert_eq!(drift_text(Some(&d)), "DRIFT missing [0123456789ab] extra [fedcba987654]");
        assert_eq!(drift_text(Some(&drift("drift", &["a"], &[]))), "DRIFT missing [a]");
    }

    #[test]
    fn other_states_read_plainly() {
        assert_eq!(drift_text(Some(&drift("in-sync", &[], &[]))), "in sync");
        assert_eq!(drift_text(Some(&drift("in-rollout", &[], &[]))), "in rollout");
        assert_eq!(drift_text(Some(&drift("unknown", &[], &[]))), "drift unknown");
        assert_eq!(drift_text(None), "drift ?");
    }
}
