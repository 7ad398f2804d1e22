//! `hotfleet patch stack --build B`: a build's patch stack, the fleet's
//! desired state, oldest first, with who rolled each patch out and when.

use hotfleet_proto::v1::ListStackRequest;

use crate::{
    client::{failure, Target},
    exit::CliResult,
    output::{format_ms, Output},
};

pub async fn stack(target: &Target, build: String, output: Output) -> CliResult {
    let mut client = target.connect().await?;
    let patches = client
        .list_stack(target.request(ListStackRequest { target_build: build.clone() }))
        .await
        .map_err(|s| failure(&format!("listing the patch stack of build {build} failed"), s))?
        .into_inner()
        .patches;
    if output.structured() {
        output.print(&patches);
        return Ok(());
    }
    if patches.is_empty() {
        println!("build {build}: no patch on the stack (processes run the build as shipped)");
        return Ok(());
    }
    println!("build {build}: {} patch(es), oldest first", patches.len());
    for (i, p) in patches.iter().enumerate() {
        let who = if p.rolled_out_by.is_empty() { "(unknown)" } else { &p.rolled_out_by };
        println!(
            "{:>3}. {}  by {who} via {}  committed {}  {}",
            i + 1,
            p.patch_id.get(..12).unwrap_or(&p.patch_id),
            p.rollout_id,
            format_ms(p.committed_at_ms),
            p.description
        );
        if !p.modules.is_empty() {
            println!("     modules {}", p.modules.join(", "));
        }
    }
    Ok(())
}
