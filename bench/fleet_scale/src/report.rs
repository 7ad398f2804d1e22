//! Medians of several runs, printed as the markdown rows `docs/performance.md`
//! holds, plus the detail a reader needs to trust them.

use crate::{run::RunResult, sim::Calls};

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 { values[mid] } else { (values[mid - 1] + values[mid]) / 2.0 })
}

fn med(runs: &[RunResult], f: impl Fn(&RunResult) -> Option<f64>) -> Option<f64> {
    median(runs.iter().filter_map(f).collect())
}

fn secs(ms: Option<f64>) -> String {
    ms.map_or("n/a".into(), |ms| format!("{:.2} s", ms / 1000.0))
}

fn calls_line(c: &Calls) -> String {
    format!(
        "prepare {} commit {} abort {} rollback {} health {} status {} heartbeat {} register {} fetch {} heartbeat-errors {} pushbacks {} detached {} digests-asked {}",
        c.prepare,
        c.commit,
        c.abort,
        c.rollback,
        c.health,
        c.status,
        c.heartbeat,
        c.register,
        c.fetch,
        c.heartbeat_errors,
        c.pushbacks,
        c.detached,
        c.digests_asked
    )
}

/// Prints the summary row and the per-run detail to stdout.
pub fn print(nodes: usize, store: &str, runs: &[RunResult]) {
    let n = nodes as f64;
    let rollout = med(runs, |r| Some(r.rollout.wall_ms as f64));
    let prepare = med(runs, |r| r.rollout.timeline.prepare_ms.map(|v| v as f64));
    let rollback = med(runs, |r| r.rollback.timeline.rollback_ms.map(|v| v as f64));
    let register = med(runs, |r| Some(r.register_ms as f64));
    // Where the kernel could not start the peak over, the rollouts' column
    // is the whole run's and says so.
    let peak_registering = med(runs, |r| r.idle.peak_rss_kb.map(|v| v as f64));
    let peak = med(runs, |r| r.end.peak_rss_kb.map(|v| v as f64));
    let rollouts_alone = runs.iter().all(|r| r.peak_reset);
    let idle = med(runs, |r| r.idle.rss_kb.map(|v| v as f64));
    // Per node: above the coordinator's footprint with no node at all.
    let per_node = |v: Option<f64>| {
        let base = med(runs, |r| r.base.rss_kb.map(|v| v as f64)).unwrap_or(0.0);
        v.map_or("n/a".into(), |v| format!("{:.0} MB ({:.1} KB/node)", v / 1024.0, (v - base).max(0.0) / n))
    };
    let cpu = med(runs, |r| Some(r.end.cpu_seconds? - r.idle.cpu_seconds?));
    let writes = med(runs, |r| Some((r.end.write_bytes? - r.idle.write_bytes?) as f64));
    let revisions = med(runs, |r| Some((r.etcd_end.revision? - r.etcd_idle.revision?) as f64));
    let store_bytes = med(runs, |r| r.store_bytes.map(|v| v as f64));
    let batches = med(runs, |r| Some(r.counters_end.batches? - r.counters_idle.batches?));
    let encoded = med(runs, |r| Some(r.counters_end.bytes? - r.counters_idle.bytes?));
    // Per node and per rollout: the second rollout writes its node states too.
    let per_node_rollout = |v: f64| v / n / 2.0;
    // No rollout before them: the counter has no sample yet when idle.
    let node_states = med(runs, |r| Some(r.counters_end.node_states? - r.counters_idle.node_states.unwrap_or(0.0)));
    let node_records = med(runs, |r| Some(r.counters_end.node_records? - r.counters_idle.node_records?));
    let lost = runs.iter().map(|r| r.rollout.lost + r.rollback.lost).max().unwrap_or(0);
    println!();
    println!("| nodes | store | runs | register | prepare | rollout | rollback | peak RSS registering | peak RSS rollouts | RSS idle | CPU s (2 rollouts) | written (2 rollouts) | etcd revisions | store size | lost |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {nodes} | {store} | {} | {} | {} | {} | {} | {} | {}{} | {} | {} | {} | {} | {} | {lost} |",
        runs.len(),
        secs(register),
        secs(prepare),
        secs(rollout),
        secs(rollback),
        per_node(peak_registering),
        per_node(peak),
        if rollouts_alone { "" } else { " (whole run)" },
        per_node(idle),
        cpu.map_or("n/a".into(), |v| format!("{v:.1}")),
        writes.map_or("n/a".into(), |v| format!("{:.1} MB", v / 1e6)),
        revisions.map_or("n/a".into(), |v| format!("{v:.0}")),
        store_bytes.map_or("n/a".into(), |v| format!("{:.1} MB", v / 1e6)),
    );
    println!(
        "store, over the two rollouts (medians, the coordinator's metrics): {} batches, {} of records written; \
         node states {} ({} per node per rollout), node records {}",
        batches.map_or("n/a".into(), |v| format!("{v:.0}")),
        encoded.map_or("n/a".into(), |v| format!("{:.2} MB", v / 1e6)),
        node_states.map_or("n/a".into(), |v| format!("{v:.0}")),
        node_states.map_or("n/a".into(), |v| format!("{:.2}", per_node_rollout(v))),
        node_records.map_or("n/a".into(), |v| format!("{v:.0}")),
    );
    for (i, r) in runs.iter().enumerate() {
        match &r.nodes_list {
            Ok((ms, listed)) => println!("run {}: nodes list: {listed} nodes in {ms} ms", i + 1),
            Err(why) => println!("run {}: nodes list FAILED: {why}", i + 1),
        }
        println!(
            "run {}: registration: {} ms, {} registrations sent, {} told to come back later",
            i + 1,
            r.register_ms,
            r.register_calls.register,
            r.register_calls.pushbacks
        );
        let steps: Vec<String> = r.rollout.timeline.steps.iter().map(|(s, ms)| format!("{s} {ms}")).collect();
        println!(
            "run {}: rollout {} ms (prepare {} ms; steps ms: {}); rollback rollout {} ms, rollback {} ms",
            i + 1,
            r.rollout.wall_ms,
            r.rollout.timeline.prepare_ms.unwrap_or(0),
            steps.join(", "),
            r.rollback.wall_ms,
            r.rollback.timeline.rollback_ms.unwrap_or(0),
        );
        let kb = |v: Option<u64>| v.map_or("n/a".into(), |v| format!("{:.1} MB", v as f64 / 1024.0));
        println!(
            "  coordinator RSS: {} before the fleet, peak {} registering and listing, {} idle, peak {} in the rollouts{}",
            kb(r.base.rss_kb),
            kb(r.idle.peak_rss_kb),
            kb(r.idle.rss_kb),
            kb(r.end.peak_rss_kb),
            if r.peak_reset { "" } else { " (could not start the peak over: the whole run's)" },
        );
        for (k, (run, stats)) in r.more.iter().enumerate() {
            let per_node = |v: Option<u64>| {
                v.zip(r.base.rss_kb).map_or("n/a".into(), |(v, base)| {
                    format!("{:.1} MB ({:.1} KB/node)", v as f64 / 1024.0, v.saturating_sub(base) as f64 / nodes as f64)
                })
            };
            println!(
                "  rollout {}: {} ms; coordinator RSS then {}, peak so far {}",
                k + 3,
                run.wall_ms,
                per_node(stats.rss_kb),
                per_node(stats.peak_rss_kb)
            );
        }
        if !r.relays_end.is_empty() {
            let sum = |stats: &[crate::measure::ProcStats], f: fn(&crate::measure::ProcStats) -> Option<u64>| {
                stats.iter().filter_map(f).sum::<u64>()
            };
            let cpu = |stats: &[crate::measure::ProcStats]| stats.iter().filter_map(|s| s.cpu_seconds).sum::<f64>();
            println!(
                "  relays ({}): CPU {:.1} s over the rollouts; RSS {:.1} MB idle, {:.1} MB at the end, peaks summed {:.1} MB ({:.1} KB per node)",
                r.relays_end.len(),
                cpu(&r.relays_end) - cpu(&r.relays_idle),
                sum(&r.relays_idle, |s| s.rss_kb) as f64 / 1024.0,
                sum(&r.relays_end, |s| s.rss_kb) as f64 / 1024.0,
                sum(&r.relays_end, |s| s.peak_rss_kb) as f64 / 1024.0,
                sum(&r.relays_end, |s| s.peak_rss_kb) as f64 / nodes as f64,
            );
        }
        println!("  calls in the rollout: {}", calls_line(&r.rollout.calls));
        println!("  calls in the rollback: {}", calls_line(&r.rollback.calls));
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }
}
