//! A coordinator stopped cleanly (SIGTERM) in the middle of a health window,
//! on both stores: it stops driving at once, judges nothing it sees while it
//! stops (no "node lost" for a healthy fleet), exits on its own, and the
//! restarted coordinator resumes the rollout and completes it. A `rollout
//! watch` started before the SIGTERM follows it across the restart and exits
//! with the real outcome (0), not "unreachable" nor "rolled back".
//!
//! With three coordinators on etcd, SIGTERM to the leader hands leadership
//! over at once (its lease is revoked, not left to expire) and the new leader
//! completes the rollout.
//!
//! Ends with the consistency check of `common`.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::*;

on_both_stores!(sigterm_mid_health_window_resumes_after_the_restart_and_completes);

async fn sigterm_mid_health_window_resumes_after_the_restart_and_completes(backend: Backend) {
    let mut s = Scenario::start(backend);
    let before = s.damages();
    let patch = s.push("hotfix-damage");
    let id = s.start_rollout(&patch, "3s");
    // A runbook's watch, started before the SIGTERM, in the background.
    let (layout, urls, watched) = (s.fleet.layout.clone(), s.fleet.coordinator_urls(), id.clone());
    let watcher = std::thread::spawn(move || {
        layout.cli_raw(&["--coordinator", &urls, "--output", "json", "rollout", "watch", &watched]).expect("watch")
    });
    let at_term = s.wait_until(&id, "wave-1 health window", |r| step_name(r) == "wave-1" && phase(r) == "watching");

    let log_before = s.fleet.coordinator().proc.log_text().len();
    s.fleet.coordinators[0].proc.signal("TERM").expect("SIGTERM");
    let termed = Instant::now();
    let status = loop {
        if let Ok(Some(status)) = s.fleet.coordinators[0].proc.child.try_wait() {
            break status;
        }
        assert!(termed.elapsed() < Duration::from_secs(15), "the coordinator did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    let stopped_in = termed.elapsed();
    assert!(status.success(), "a clean stop exits 0: {status}");
    let log = s.fleet.coordinator().proc.log_text();
    let shutdown_log = &log[log_before..];
    assert!(!shutdown_log.contains("node lost"), "nothing judged lost while stopping:\n{shutdown_log}");
    assert!(!shutdown_log.contains("rolling-back"), "no rollback while stopping:\n{shutdown_log}");
    assert!(shutdown_log.contains("drained"), "the term drained:\n{shutdown_log}");

    s.fleet.restart_coordinator(s.dir.path()).expect("restart the coordinator");
    let out = watcher.join().expect("watch thread");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rollout: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("watch printed no snapshot: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
    eprintln!(
        "SIGTERM during wave-1's window: stopped in {} ms; rollout ended {}",
        stopped_in.as_millis(),
        phase(&rollout)
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "the watch follows the restart and exits with the real outcome: {rollout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(phase(&rollout), "completed");
    assert!(epoch_of(&rollout) > epoch_of(&at_term), "finished by the restarted coordinator: {}", rollout["epoch"]);
    let events = rollout["events"].to_string();
    assert!(!events.contains("lost"), "no node was blamed: {events}");
    let after = s.damages();
    assert!(after.iter().zip(&before).all(|(a, b)| a < b), "the hotfix runs everywhere: {before:?} -> {after:?}");
    assert_eq!(s.assert_consistent(&[]).await, vec![patch]);
}

/// `hotfleet leader` asked of `urls`: the leader's address and epoch, if one leads.
fn leader_via(s: &Scenario, urls: &str) -> Option<(String, u64)> {
    let out = s.fleet.cli_via(urls, &["--output", "json", "leader"]).ok()?;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let addr = status["leaderAddr"].as_str().filter(|a| !a.is_empty())?.to_string();
    Some((addr, epoch_of(&status)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_leader_of_three_hands_over_at_once_and_the_rollout_completes() {
    let mut s = Scenario::start(Backend::Etcd { coordinators: 3 });
    let before = s.damages();
    let patch = s.push("hotfix-damage");
    let id = s.start_rollout(&patch, "3s");
    let (layout, urls, watched) = (s.fleet.layout.clone(), s.fleet.coordinator_urls(), id.clone());
    let watcher = std::thread::spawn(move || {
        layout.cli_raw(&["--coordinator", &urls, "--output", "json", "rollout", "watch", &watched]).expect("watch")
    });
    s.wait_until(&id, "wave-1 health window", |r| step_name(r) == "wave-1" && phase(r) == "watching");
    let (leader_addr, old_epoch) = leader_via(&s, &s.fleet.coordinator_urls()).expect("a leader");
    let old = s.fleet.coordinators.iter().position(|c| c.url() == leader_addr).expect("the leader is one of ours");
    let survivors: Vec<String> =
        s.fleet.coordinators.iter().enumerate().filter(|(i, _)| *i != old).map(|(_, c)| c.url()).collect();
    let survivors = survivors.join(",");

    s.fleet.coordinators[old].proc.signal("TERM").expect("SIGTERM");
    let termed = Instant::now();
    let status = loop {
        if let Ok(Some(status)) = s.fleet.coordinators[old].proc.child.try_wait() {
            break status;
        }
        assert!(termed.elapsed() < Duration::from_secs(15), "the leader did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "a clean stop exits 0: {status}");
    let exited = termed.elapsed();
    let (new_addr, new_epoch) = loop {
        if let Some((addr, epoch)) = leader_via(&s, &survivors).filter(|(a, _)| *a != leader_addr) {
            break (addr, epoch);
        }
        assert!(termed.elapsed() < LEASE * 3, "no follower took over");
        std::thread::sleep(Duration::from_millis(25));
    };
    let took_over = termed.elapsed();
    eprintln!(
        "SIGTERM to the leader: it exited after {} ms; {new_addr} leads (epoch {old_epoch} -> {new_epoch}) {} ms after the signal (lease {} ms)",
        exited.as_millis(),
        took_over.as_millis(),
        LEASE.as_millis()
    );
    assert!(new_epoch > old_epoch);
    assert!(took_over - exited < LEASE, "handed over, not left to expire: {:?} after the exit", took_over - exited);

    let out = watcher.join().expect("watch thread");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rollout: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("watch printed no snapshot: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
    // What the watch said on the way (its reconnections), for a failure to explain itself.
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "the watch exits with the real outcome: {rollout}\nits stderr: {said}");
    assert_eq!(phase(&rollout), "completed");
    assert_eq!(epoch_of(&rollout), new_epoch, "finished by the new leader");
    assert!(!rollout["events"].to_string().contains("lost"), "no node was blamed: {}", rollout["events"]);
    let after = s.damages();
    assert!(after.iter().zip(&before).all(|(a, b)| a < b), "the hotfix runs everywhere: {before:?} -> {after:?}");
    assert_eq!(s.assert_consistent_via(&survivors, &[]).await, vec![patch]);
}
