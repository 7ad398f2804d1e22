//! `hotfleet`: the operator's CLI. Patch tooling works offline; every other
//! command talks gRPC to the coordinator (`--coordinator` or
//! `HOTFLEET_COORDINATOR`). Exit codes a runbook can branch on are in [`exit`].

mod auth_cmd;
mod certs_cmd;
mod client;
mod demo;
mod exit;
mod fleet_cmd;
mod ids;
mod output;
mod patch_cmd;
mod plan_cmd;
mod pycheck;
mod rollout_cmd;
mod stack_cmd;
mod tree;
mod views;

use clap::{CommandFactory, Parser, Subcommand};

use crate::{client::Target, exit::CliResult, output::Output};

#[derive(Debug, Parser)]
#[command(name = "hotfleet", version, about = "Hot-patch a live game server fleet", propagate_version = true)]
struct Cli {
    /// Output format: text for people, json or yaml for scripts (errors too, on stderr).
    #[arg(long, short = 'o', global = true, value_enum, default_value = "text")]
    output: Output,
    #[command(flatten)]
    target: Target,
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
    /// Build, sign, verify, inspect, push and list patch bundles.
    #[command(subcommand)]
    Patch(patch_cmd::PatchCommand),
    /// Registered nodes and what they run.
    #[command(subcommand)]
    Nodes(NodesCommand),
    /// Start, follow and steer rollouts.
    #[command(subcommand)]
    Rollout(rollout_cmd::RolloutCommand),
    /// Stop every rollout from starting a new step (rollbacks still run).
    Freeze {
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Lift a freeze.
    Unfreeze,
    /// Run a whole fleet on this machine and patch it live: a hotfix rolled out
    /// in waves, then a bad patch rolled back automatically.
    Demo(demo::DemoArgs),
    /// Which coordinator leads (and its epoch); any coordinator of the list answers.
    Leader,
    /// The audit log of operator actions, newest first, one page at a time.
    Audit {
        /// Records per page (the coordinator answers at most 1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only records older than this sequence number (the next page's
        /// `--before` is printed under each page).
        #[arg(long)]
        before: Option<u64>,
    },
    /// Who you are to the coordinator; bearer tokens.
    #[command(subcommand)]
    Auth(auth_cmd::AuthCommand),
    /// Certificates for mutual TLS.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// A shell completion script on stdout, e.g. `source <(hotfleet completion bash)`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The manual page (roff) on stdout, e.g. `hotfleet man > hotfleet.1`.
    Man,
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// A development CA plus certificates for the coordinator, nodes and
    /// operators, in the file layout the --tls-* flags take.
    Dev(certs_cmd::DevArgs),
}

#[derive(Debug, Subcommand)]
enum NodesCommand {
    /// Nodes with labels, processes, patch stacks and health.
    List {
        /// "all", or kubectl-style requirements joined by commas:
        /// k=v, k!=v, "k in (a,b)", "k notin (a,b)", k, !k.
        #[arg(long, short = 'l', default_value = "all")]
        selector: String,
        /// Only the counts: nodes by liveness and by build.
        #[arg(long)]
        summary: bool,
    },
    /// Forget a node (refused while a live rollout holds it; audited). Stop
    /// its agent first: an agent still running registers again.
    Remove {
        node_id: String,
        /// Why, for the audit log.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

async fn dispatch(cli: Cli) -> CliResult {
    let (target, output) = (&cli.target, cli.output);
    match cli.command {
        Command::Keygen { out } => patch_cmd::keygen(&out, output),
        Command::Patch(cmd) => patch_cmd::run(cmd, target, output).await,
        Command::Nodes(NodesCommand::List { selector, summary }) => {
            fleet_cmd::nodes_list(target, selector, summary, output).await
        }
        Command::Nodes(NodesCommand::Remove { node_id, reason }) => {
            fleet_cmd::nodes_remove(target, node_id, reason, output).await
        }
        Command::Rollout(cmd) => rollout_cmd::run(target, cmd, output).await,
        Command::Freeze { reason } => fleet_cmd::freeze(target, reason, output).await,
        Command::Unfreeze => fleet_cmd::unfreeze(target, output).await,
        Command::Demo(args) => demo::run(args, output).await,
        Command::Audit { limit, before } => fleet_cmd::audit(target, limit, before, output).await,
        Command::Leader => fleet_cmd::leader(target, output).await,
        Command::Auth(cmd) => auth_cmd::run(cmd, target, output).await,
        Command::Certs(CertsCommand::Dev(args)) => certs_cmd::dev(args),
        Command::Completion { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "hotfleet", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()).map_err(|e| {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                output::stdout_closed();
            }
            anyhow::anyhow!("cannot write the manual page: {e}").into()
        }),
    }
}

fn main() {
    output::end_quietly_when_stdout_closes();
    let cli = Cli::parse();
    let output = cli.output;
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            std::process::exit(exit::FAILED);
        }
    };
    if let Err(failure) = runtime.block_on(dispatch(cli)) {
        std::process::exit(failure.report(output));
    }
}
