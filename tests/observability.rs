//! Observability of real processes: a coordinator and two agents run a real
//! rollout while the test scrapes both binaries' `/metrics` (the values must
//! move) and reads their log files (the coordinator's JSON lines parse and
//! name the rollout; the agents' text lines, written to a file, carry no
//! ANSI colour codes and name the rollout and node).

#[macro_use]
mod common;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use common::*;
use serde_json::Value;

/// `GET /metrics` over a plain socket: the endpoint is HTTP/1.1 with
/// `Connection: close`, so the answer ends when the socket does.
fn scrape(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect to /metrics");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").expect("request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("Content-Type: text/plain; version=0.0.4"), "{answer}");
    answer.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default()
}

/// The value of one series (`name{labels}` exactly as exposed), 0 if absent.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .find_map(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The sum of every series of `name` whose labels include all of `labels`.
fn total(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn agent_metrics_addr(agent: &AgentProc) -> SocketAddr {
    let ready = std::fs::read_to_string(agent.node_dir.join("agent.ready")).expect("ready file");
    let ready: Value = serde_json::from_str(&ready).expect("ready json");
    ready["metrics"].as_str().expect("the ready file names the metrics address").parse().expect("metrics address")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_moves_both_binaries_metrics_and_their_logs_name_it() {
    // Agents take the flag from the environment (localfleet starts them);
    // this test binary holds this one test, so nothing else sees it.
    std::env::set_var("HOTFLEET_METRICS_LISTEN", "127.0.0.1:0");
    let metrics_port = free_port().expect("port");
    let coordinator_metrics: SocketAddr = format!("127.0.0.1:{metrics_port}").parse().expect("addr");
    let coordinator_flags = ["--heartbeat-interval", "500ms", "--log-format", "json", "--metrics-listen"]
        .iter()
        .map(|s| s.to_string())
        .chain([coordinator_metrics.to_string()])
        .collect();
    let mut s = Scenario::start_small(2, coordinator_flags);
    let agent_metrics: Vec<SocketAddr> = s.fleet.nodes.iter().map(|n| agent_metrics_addr(&n.agent)).collect();

    let before = scrape(coordinator_metrics);
    assert_eq!(value(&before, "hotfleet_leader"), 1.0, "{before}");
    assert!(value(&before, "hotfleet_leader_epoch") >= 1.0, "{before}");
    assert_eq!(value(&before, "hotfleet_nodes{state=\"alive\"}"), 2.0, "{before}");
    // Each agent attaches on a stream of its own once registered.
    let attached = wait_for("both agents attached", Duration::from_secs(15), None, || {
        let text = scrape(coordinator_metrics);
        (value(&text, "hotfleet_attached_agents{via=\"own\"}") == 2.0).then_some(text)
    })
    .expect("both agents attached on their own streams");
    assert_eq!(value(&attached, "hotfleet_attached_agents{via=\"relay\"}"), 0.0, "{attached}");
    assert!(
        total(&before, "hotfleet_grpc_server_requests_total", &["AgentGateway", "code=\"OK\""]) > 0.0,
        "agents' registrations and heartbeats are counted: {before}"
    );
    let agent_before = scrape(agent_metrics[0]);
    assert!(value(&agent_before, "hotfleet_node_heartbeat_age_seconds") < 5.0, "{agent_before}");

    let patch = s.push("hotfix-damage");
    let id = s.start_rollout(&patch, "1500ms");
    // Mid-rollout: the canary has committed and its window is open.
    s.wait_until(&id, "the canary's health window", |st| phase(st) == "watching");
    let during = scrape(coordinator_metrics);
    assert!(total(&during, "hotfleet_rollout_step_duration_seconds_count", &["step=\"prepare\""]) >= 1.0, "{during}");
    assert_eq!(total(&during, "hotfleet_rollouts_total", &[]), 0.0, "nothing finished yet: {during}");
    let (code, rollout) = s.watch(&id);
    assert_eq!(code, 0, "{rollout}");
    let after = scrape(coordinator_metrics);

    // The coordinator: outcome, steps, commands per kind, store, gRPC client.
    assert_eq!(value(&after, "hotfleet_rollouts_total{outcome=\"completed\"}"), 1.0, "{after}");
    for step in ["prepare", "baseline", "commit", "watch"] {
        assert!(
            total(&after, "hotfleet_rollout_step_duration_seconds_count", &[&format!("step=\"{step}\"")]) >= 1.0,
            "step {step}: {after}"
        );
    }
    for kind in ["prepare", "commit"] {
        let sent = total(
            &after,
            "hotfleet_agent_command_duration_seconds_count",
            &[&format!("kind=\"{kind}\""), "result=\"ok\""],
        );
        assert_eq!(sent, 2.0, "one {kind} per node: {after}");
    }
    let client_calls = |t: &str| total(t, "hotfleet_grpc_client_requests_total", &["hotfleet.v1.Agent/"]);
    assert!(client_calls(&after) > client_calls(&before), "{after}");
    let written = |t: &str| total(t, "hotfleet_store_written_bytes_total", &["backend=\"embedded\""]);
    assert!(written(&after) > written(&before), "{after}");
    assert!(total(&after, "hotfleet_store_write_duration_seconds_count", &["result=\"ok\""]) > 0.0, "{after}");
    let served = |t: &str| total(t, "hotfleet_grpc_server_requests_total", &[]);
    assert!(served(&after) > served(&before), "{after}");

    // Each agent: the commands it handled, its runtime's timings, gRPC served.
    for addr in &agent_metrics {
        let text = scrape(*addr);
        for kind in ["prepare", "commit"] {
            let handled = total(
                &text,
                "hotfleet_node_command_duration_seconds_count",
                &[&format!("kind=\"{kind}\""), "result=\"ok\""],
            );
            assert_eq!(handled, 1.0, "{kind}: {text}");
        }
        assert_eq!(value(&text, "hotfleet_runtime_prepare_seconds_count"), 1.0, "{text}");
        assert_eq!(value(&text, "hotfleet_runtime_commit_pause_seconds_count{step=\"commit\"}"), 1.0, "{text}");
        assert!(
            total(&text, "hotfleet_grpc_server_requests_total", &["hotfleet.v1.Agent/", "code=\"OK\""]) >= 2.0,
            "{text}"
        );
        assert!(total(&text, "hotfleet_grpc_client_requests_total", &["AgentGateway"]) >= 1.0, "{text}");
    }

    // Logs: the coordinator's are JSON lines, those of its driver name the rollout.
    let coordinator_log = s.fleet.coordinator().proc.log_text();
    let mut naming_rollout = 0;
    for line in coordinator_log.lines().filter(|l| !l.trim().is_empty()) {
        let entry: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(entry["level"].is_string() && entry["fields"].is_object(), "{line}");
        if entry["span"]["rollout"] == id.as_str() {
            naming_rollout += 1;
        }
    }
    assert!(naming_rollout > 0, "the driver's lines carry the rollout id: {coordinator_log}");
    // The agents' text logs, written to a file: no colour, rollout and node named.
    for (i, node) in s.fleet.nodes.iter().enumerate() {
        let log = node.agent.proc.log_text();
        assert!(!log.contains('\u{1b}'), "ANSI codes in a log file: {log}");
        let command_line = format!("rollout={id} node=node-{}", i + 1);
        assert!(log.contains(&command_line), "no line names {command_line}: {log}");
    }
    // Every metric either binary exposes is documented, and the dashboard
    // charts only metrics that exist.
    let exposed: std::collections::BTreeSet<String> = [after.clone(), scrape(agent_metrics[0])]
        .iter()
        .flat_map(|t| t.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next().map(str::to_string)))
        .collect();
    let doc = std::fs::read_to_string(s.fleet.layout.repo.join("docs/metrics.md")).expect("docs/metrics.md");
    for name in &exposed {
        assert!(doc.contains(&format!("`{name}`")), "{name} is not in docs/metrics.md");
    }
    let dashboard = std::fs::read_to_string(s.fleet.layout.repo.join("docs/grafana/hotfleet.json")).expect("dashboard");
    let dashboard: Value = serde_json::from_str(&dashboard).expect("dashboard json");
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for word in
                expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("hotfleet_"))
            {
                let base =
                    ["_bucket", "_count", "_sum"].iter().fold(word, |w, suffix| w.strip_suffix(suffix).unwrap_or(w));
                assert!(exposed.contains(base), "the dashboard charts {word}, which nothing exposes");
            }
        }
    }
    assert_eq!(s.assert_consistent(&[]).await, vec![patch]);
}
