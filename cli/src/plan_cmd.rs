//! `hotfleet patch plan PATCH --node N [--process P]`: what the patch would
//! do inside a live game process (the runtime's plan), asked of one node by
//! the coordinator, which aborts the prepare again: nothing is committed.

use anyhow::anyhow;
use hotfleet_proto::v1::{PlanPatchRequest, PlanPatchResponse};
use serde_json::{json, Value};

use crate::{
    client::{failure, Target},
    exit::{CliResult, Failure},
    output::Output,
};

/// Headings of a module plan, in the runtime's order (`hotfleet/plan.py`).
const SECTIONS: [&str; 10] = [
    "functions_replaced",
    "closures_updated",
    "classes_updated",
    "added",
    "removed",
    "statements_rerun",
    "data_updated",
    "data_kept",
    "hooks",
    "notes",
];

pub async fn plan(
    target: &Target,
    patch_id: String,
    node: String,
    process: Option<String>,
    output: Output,
) -> CliResult {
    let mut client = target.connect().await?;
    let request =
        PlanPatchRequest { patch_id: patch_id.clone(), node_id: node.clone(), process_id: process.unwrap_or_default() };
    let answer = client
        .plan_patch(target.request(request))
        .await
        .map_err(|s| failure(&format!("no plan of patch {patch_id} on node {node}"), s))?
        .into_inner();
    if output.structured() {
        output.print(&as_json(&answer));
    } else {
        print_text(&answer);
    }
    if answer.ok {
        Ok(())
    } else {
        Err(Failure::refused(anyhow!("the runtime refused the patch: {}", answer.reason)))
    }
}

/// The answer with each plan as JSON, not as a string of it.
pub fn as_json(answer: &PlanPatchResponse) -> Value {
    let processes: Vec<Value> = answer
        .processes
        .iter()
        .map(|p| {
            json!({
                "processId": p.process_id,
                "pid": p.pid,
                "ok": p.ok,
                "error": p.error,
                "plan": serde_json::from_str::<Value>(&p.plan_json).unwrap_or(Value::Null),
            })
        })
        .collect();
    json!({
        "patchId": answer.patch_id,
        "nodeId": answer.node_id,
        "ok": answer.ok,
        "reason": answer.reason,
        "aborted": answer.aborted,
        "committed": false,
        "processes": processes,
    })
}

fn item_line(item: &Value) -> String {
    let line = item["lineno"].as_u64().map(|n| format!("line {n}: ")).unwrap_or_default();
    let count = item["count"].as_u64().map(|n| format!(" (x{n})")).unwrap_or_default();
    let detail = item["detail"].as_str().map(|d| format!(" - {d}")).unwrap_or_default();
    format!("{line}{}{count}{detail}", item["obj"].as_str().unwrap_or("-"))
}

fn refusal_line(r: &Value) -> String {
    let line = r["lineno"].as_u64().map(|n| format!("line {n}: ")).unwrap_or_default();
    let hint = r["hint"].as_str().filter(|h| !h.is_empty()).map(|h| format!(" ({h})")).unwrap_or_default();
    let module = r["module"].as_str().unwrap_or("-");
    format!("{module} {line}{}: {}{hint}", r["obj"].as_str().unwrap_or("-"), r["message"].as_str().unwrap_or(""))
}

pub fn print_text(answer: &PlanPatchResponse) {
    println!("plan of patch {} on node {} (nothing committed)", answer.patch_id, answer.node_id);
    for p in &answer.processes {
        println!("process {} (pid {}): {}", p.process_id, p.pid, if p.ok { "would apply" } else { "REFUSED" });
        if !p.error.is_empty() {
            println!("  {}", p.error);
        }
        let plan: Value = serde_json::from_str(&p.plan_json).unwrap_or(Value::Null);
        for module in plan["modules"].as_array().into_iter().flatten() {
            let mut head = format!("  module {}", module["module"].as_str().unwrap_or("-"));
            if module["new_module"].as_bool() == Some(true) {
                head.push_str(" (new module)");
            }
            println!("{head}");
            for section in SECTIONS {
                let items = module[section].as_array().map(Vec::as_slice).unwrap_or_default();
                if !items.is_empty() {
                    println!("    {}:", section.replace('_', " "));
                    items.iter().for_each(|i| println!("      {}", item_line(i)));
                }
            }
        }
        // A refused prepare answers the error's own form: its refusals, or one error.
        let refusals = plan["refusals"].as_array().or_else(|| plan["details"]["refusals"].as_array());
        for r in refusals.into_iter().flatten() {
            println!("  refused: {}", refusal_line(r));
        }
    }
    if !answer.reason.is_empty() {
        println!("reason: {}", answer.reason);
    }
    if !answer.aborted {
        println!("note: the abort went unanswered; the agent drops the prepare at its TTL (30s)");
    }
}
