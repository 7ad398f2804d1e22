//! `hotfleet`: the operator's CLI. Patch tooling works offline; every other
//! command talks gRPC to the coordinator (`--coordinator` or
//! `HOTFLEET_COORDINATOR`).
//!
//! Exit codes a runbook can branch on are in [`exit`].

mod exit;
mod output;
mod patch_cmd;

use clap::{Parser, Subcommand};

use crate::output::Output;

#[derive(Debug, Parser)]
#[command(name = "hotfleet", version, about = "Hot-patch a live game server fleet", propagate_version = true)]
struct Cli {
    /// Output format of read commands.
    #[arg(long, global = true, value_enum, default_value = "text")]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create an ed25519 signing key pair (hotfleet.key, hotfleet.pub) in a directory.
    Keygen {
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Build, sign, verify and inspect patch bundles.
    #[command(subcommand)]
    Patch(patch_cmd::PatchCommand),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Keygen { out } => patch_cmd::keygen(&out, cli.output),
        Command::Patch(cmd) => patch_cmd::run(cmd, cli.output),
    };
    if let Err(failure) = result {
        std::process::exit(failure.report());
    }
}
