//! An agent obeys only its coordinator's rollouts, even driven directly on
//! its gRPC port (issue 10's findings, on a real fleet). The client here
//! holds the coordinator's own certificate, the worst case: without it the
//! agent's gate refuses every command before these checks (tests/security.rs):
//!
//! - a command with epoch `u64::MAX` is refused as unknown and leaves the
//!   agent's epoch file alone, so the coordinator is not locked out: its next
//!   rollout completes;
//! - a patch the coordinator rolled back cannot be replayed (Prepare +
//!   Commit of its rollout) onto the agent: the zone server keeps running
//!   what the store says;
//! - a patch whose manifest parent is not the top of the build's stack is
//!   refused at `rollout start` by the coordinator, and at prepare by each
//!   agent, naming both.
//!
//! Ends with the consistency check of `common`.

#[macro_use]
mod common;

use common::*;
use hotfleet_proto::v1::{CommandHeader, CommitRequest, PrepareRequest, StatusRequest};

fn header(rollout: &str, patch: &str, epoch: u64) -> Option<CommandHeader> {
    Some(CommandHeader { rollout_id: rollout.into(), patch_id: patch.into(), epoch, ..Default::default() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_epoch_a_replayed_rolled_back_patch_and_a_patch_off_its_parent_change_nothing() {
    let mut s = Scenario::start_game(Backend::Embedded, Game::ZoneServer, 2, BUILD);
    let hotfix = s.push("hotfix-damage");
    let node = &s.fleet.nodes[0];
    let mut agent = agent_client(&s.fleet.keys, &node.agent).await;
    let epoch_file = node.agent.data_dir.join("epoch");
    let learned = std::fs::read(&epoch_file).expect("the epoch learned at registration");

    // 1. u64::MAX straight to the agent: refused as unknown, nothing written.
    let forged = agent
        .prepare(PrepareRequest { header: header("r-forged", &hotfix, u64::MAX), ttl_seconds: 0, ..Default::default() })
        .await;
    let err = forged.expect_err("an epoch the coordinator never announced");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("unknown epoch"), "{}", err.message());
    assert_eq!(std::fs::read(&epoch_file).expect("epoch file"), learned, "the epoch file is unchanged");
    let status = agent.status(StatusRequest {}).await.expect("status").into_inner().node.expect("node");
    assert!(status.prepared.is_empty(), "nothing prepared: {:?}", status.prepared);
    assert!(status.highest_epoch < u64::MAX);

    // 2. The coordinator is not locked out: its next rollout completes.
    let (code, done) = s.watch(&s.start_rollout(&hotfix, "1500ms"));
    assert_eq!(code, 0, "{done}");

    // 3. A bad patch on top of it, rolled back by the health gate.
    let bad = s.push_on("raising-tick", Some(&hotfix));
    let bad_rollout = s.start_rollout(&bad, "1500ms");
    let (code, rolled_back) = s.watch(&bad_rollout);
    assert_eq!(code, 3, "{rolled_back}");
    let epoch = epoch_of(&rolled_back);

    // 4. Its rollout replayed straight to every agent, at the current epoch: refused.
    for node in &s.fleet.nodes {
        let mut agent = agent_client(&s.fleet.keys, &node.agent).await;
        let prepare =
            PrepareRequest { header: header(&bad_rollout, &bad, epoch), ttl_seconds: 0, ..Default::default() };
        let err = agent.prepare(prepare).await.expect_err("a rolled-back patch replayed");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{}: {err:?}", node.agent.node_id);
        assert!(err.message().contains("aborted or rolled back"), "{}", err.message());
        let err = agent.commit(CommitRequest { header: header(&bad_rollout, &bad, epoch) }).await.expect_err("commit");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{}: {err:?}", node.agent.node_id);
    }

    // 5. A patch built as a build's first (no parent) does not go on top of the hotfix: the
    //    coordinator refuses its rollout naming the top, and each agent refuses it too.
    let orphan = s.push("slow-tick");
    let out = s.fleet.cli(&["rollout", "start", &orphan]).expect("rollout start");
    assert!(!out.status.success(), "a patch off the top is refused at start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("parent none") && err.contains(&hotfix), "names the top to build on: {err}");
    for node in &s.fleet.nodes {
        let mut agent = agent_client(&s.fleet.keys, &node.agent).await;
        let prepare =
            PrepareRequest { header: header("r-orphan", &orphan, epoch), ttl_seconds: 0, ..Default::default() };
        let vote = agent.prepare(prepare).await.expect("a vote").into_inner();
        let why: Vec<&str> = vote.processes.iter().map(|p| p.error.as_str()).collect();
        assert!(!vote.vote_yes && vote.reason.contains("parent is not the top"), "{}: {vote:?}", node.agent.node_id);
        assert!(
            !why.is_empty() && why.iter().all(|e| e.contains("parent none") && e.contains(&hotfix[..12])),
            "{why:?}"
        );
    }

    // Every zone server still runs the hotfix alone, as the store says.
    assert_eq!(s.assert_consistent(&[]).await, vec![hotfix]);
}
