//! Health from every integration: a fleet rollout over an asyncio game
//! written from the runtime README's lines only (`examples/asyncio_arena`,
//! `asyncio_safe_point` instead of `with rt.tick()`) completes; before the
//! loop helpers counted ticks it rolled back for "no health data".

#[macro_use]
mod common;

use common::*;

on_both_stores!(rollout_over_an_asyncio_game_completes);

const ARENA_BUILD: &str = "arena-1.0";

async fn rollout_over_an_asyncio_game_completes(backend: Backend) {
    let mut s = Scenario::start_game(backend, Game::AsyncioArena, 3, ARENA_BUILD);
    let before = s.damages();
    assert!(before.iter().all(|d| *d == 16), "the arena's armor bug: {before:?}");
    let patch = s.push("arena-hotfix");
    let id = s.start_rollout(&patch, "1500ms");
    let (code, rollout) = s.watch(&id);
    assert_eq!(code, 0, "the health gate gets ticks from asyncio_safe_point: {rollout}");
    assert_eq!(phase(&rollout), "completed");
    assert_eq!(rollout["spec"]["tickP99FloorMs"], 250.0, "--tick-p99-floor reaches the spec: {rollout}");
    assert_eq!(s.damages(), vec![8; 3], "the hotfix landed everywhere");
    for status in s.agent_statuses().await {
        let health = status.processes[0].health.clone().unwrap_or_default();
        assert!(health.ticks > 0, "{}: the asyncio game reports ticks", status.node_id);
    }
    assert_eq!(s.assert_consistent(&[]).await, vec![patch]);
}
