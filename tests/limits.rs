//! Limits on what callers can make a real coordinator hold: a flood of idle
//! connections does not lock a real client out, a dripped handshake is
//! closed at the handshake deadline, and an oversized rollout spec is refused
//! before anything of it reaches the store (on both stores).

#[macro_use]
mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use common::*;
use hotfleet_proto::v1::{RolloutSpec, StartRolloutRequest};

on_both_stores!(a_four_megabyte_selector_is_refused_before_it_reaches_the_store);

const HANDSHAKE: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_leave_room_for_a_real_client_and_drips_are_closed() {
    // The test opens 2,000 sockets itself.
    hotfleet_proto::listener::raise_nofile_limit().expect("open-files limit");
    let layout = Layout::for_workspace();
    let dir = tempfile::tempdir().expect("tmp");
    let keys = Keys::generate(&layout, dir.path()).expect("keys");
    let port = free_port().expect("port");
    let handshake = format!("{}ms", HANDSHAKE.as_millis());
    let coordinator = CoordinatorProc::start(
        &layout,
        dir.path(),
        &keys,
        port,
        &["--handshake-timeout", &handshake, "--max-connections", "1000"],
    )
    .expect("coordinator");

    let mut idle = Vec::new();
    for _ in 0..2000 {
        idle.push(TcpStream::connect(coordinator.addr).expect("connect"));
    }
    let asked = Instant::now();
    let operator = layout.with_cli_flags(keys.tls.operator("sre").flags());
    let out =
        operator.cli_raw(&["--coordinator", &coordinator.url(), "--output", "json", "nodes", "list"]).expect("cli");
    assert!(out.status.success(), "the CLI is answered: {}", String::from_utf8_lossy(&out.stderr));
    assert!(asked.elapsed() < Duration::from_secs(5), "answered in {:?}", asked.elapsed());

    // A client dripping the start of a TLS ClientHello a byte every 200 ms (24 bytes: 4.8 s)
    // is closed at the handshake deadline, long before its first 24 bytes are in.
    let mut drip = TcpStream::connect(coordinator.addr).expect("connect");
    drip.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
    let started = Instant::now();
    // A handshake record of 512 bytes, a ClientHello of 508, TLS 1.2 legacy version, then the
    // random: well formed as far as it goes.
    let mut hello = vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];
    hello.resize(64, 0x2a);
    let mut next = hello.iter().cycle();
    let closed = loop {
        if started.elapsed() > HANDSHAKE * 3 {
            break false;
        }
        // Well-formed bytes, so only the deadline (not a protocol error) can end it.
        if drip.write_all(&[*next.next().unwrap_or(&b'P')]).is_err() {
            break true;
        }
        let mut buf = [0u8; 16];
        match drip.read(&mut buf) {
            Ok(0) => break true,
            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut => {
                break true
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(150)); // + the 50 ms read: 200 ms a byte
    };
    assert!(closed, "a dripped handshake is closed");
    let took = started.elapsed();
    assert!(took >= HANDSHAKE - Duration::from_millis(300) && took < HANDSHAKE * 2, "closed after {took:?}");
    drop(idle);
}

async fn a_four_megabyte_selector_is_refused_before_it_reaches_the_store(backend: Backend) {
    let mut s = Scenario::start_game(backend, Game::ZoneServer, 1, BUILD);
    let patch = s.push("hotfix-damage");
    let redb = s.fleet.coordinator().data_dir.join("coordinator.redb");
    let embedded = matches!(s.fleet.store, StoreSpec::Embedded);
    let size = || std::fs::metadata(&redb).map(|m| m.len()).unwrap_or(0);
    let before = size();
    let mut client = coordinator_client(&s.fleet.keys, &s.fleet.coordinator().url()).await;
    for _ in 0..5 {
        let spec = RolloutSpec {
            patch_id: patch.clone(),
            selector: format!("zone={}", "z".repeat(4 << 20)),
            ..Default::default()
        };
        let err = client
            .start_rollout(StartRolloutRequest {
                spec: Some(spec),
                dry_run: false,
                target_build: String::new(),
                plan_canary: false,
            })
            .await
            .expect_err("refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{}", err.message());
        assert!(err.message().starts_with("selector is 4194309 bytes long"), "{}", err.message());
        assert!(err.message().len() < 200, "the refusal quotes a short prefix: {} bytes", err.message().len());
    }
    let spec = RolloutSpec { patch_id: patch.clone(), health_window_ms: u64::MAX, ..Default::default() };
    let err = client
        .start_rollout(StartRolloutRequest {
            spec: Some(spec),
            dry_run: false,
            target_build: String::new(),
            plan_canary: false,
        })
        .await
        .expect_err("refused");
    assert!(err.message().contains("health_window_ms 18446744073709551615 ms is out of range"), "{}", err.message());

    let audit = ok(s.fleet.cli(&["--output", "json", "audit", "--limit", "10"]).expect("audit"));
    let records: serde_json::Value = serde_json::from_str(&audit).expect("json");
    let refusals: Vec<&serde_json::Value> =
        records["items"].as_array().expect("records").iter().filter(|r| r["action"] == "rollout.start").collect();
    assert_eq!(refusals.len(), 6, "every refusal is audited: {audit}");
    assert!(audit.len() < 8 * 1024, "audit lines stay short: {} bytes", audit.len());
    if embedded {
        let grown = size().saturating_sub(before);
        assert!(grown < 1 << 20, "the store grew by {grown} bytes for 20 MB of refused selectors");
    }
}
