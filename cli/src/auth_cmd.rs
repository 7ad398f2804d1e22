//! `hotfleet auth whoami` (who the coordinator takes you for) and `hotfleet
//! auth token create` (a bearer token for the coordinator's `--tokens`
//! file: printed once, stored only as its SHA-256).

use std::{io::Write, path::PathBuf};

use anyhow::{anyhow, Context};
use clap::Subcommand;
use hotfleet_proto::v1::WhoAmIRequest;
use sha2::{Digest, Sha256};

use crate::{
    client::{failure, Target},
    exit::CliResult,
    output::Output,
};

#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Who the coordinator takes you for (identity, role, credential).
    Whoami,
    /// Bearer tokens for the coordinator's --tokens file.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token for NAME with a role, append its hash to the tokens file
    /// (created 0600), and print the token once. Whoever may write that file
    /// is in effect an admin; the coordinator reads it at start.
    Create {
        name: String,
        /// viewer, operator or admin.
        #[arg(long)]
        role: String,
        /// The coordinator's --tokens file.
        #[arg(long)]
        tokens: PathBuf,
    },
}

pub async fn run(command: AuthCommand, target: &Target, output: Output) -> CliResult {
    match command {
        AuthCommand::Whoami => whoami(target, output).await,
        AuthCommand::Token(TokenCommand::Create { name, role, tokens }) => create_token(&name, &role, &tokens),
    }
}

async fn whoami(target: &Target, output: Output) -> CliResult {
    let mut client = target.connect_any().await?;
    let me = client.who_am_i(target.request(WhoAmIRequest {})).await.map_err(|s| failure("who am I", s))?.into_inner();
    if output.structured() {
        output.print(&crate::views::doc("WhoAmI", crate::views::WhoAmI::from(&me)));
    } else {
        let role = if me.role.is_empty() { "none (authenticated, may not read or act)" } else { &me.role };
        println!("identity    {}\nrole        {role}\ncredential  {}", me.identity, me.credential);
    }
    Ok(())
}

fn create_token(name: &str, role: &str, tokens: &PathBuf) -> CliResult {
    if !["viewer", "operator", "admin"].contains(&role) {
        return Err(anyhow!("--role {role:?}: use viewer, operator or admin").into());
    }
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control() || c == '#') {
        return Err(anyhow!("token name {name:?}: no spaces, control characters or #").into());
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| anyhow!("no randomness: {e}"))?;
    let token = format!("hft_{}", hex::encode(secret));
    let hash = hex::encode(Sha256::digest(token.as_bytes()));
    let mut options = std::fs::OpenOptions::new();
    options.append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(tokens).with_context(|| format!("opening {}", tokens.display()))?;
    writeln!(file, "{hash} {name} {role}").with_context(|| format!("writing {}", tokens.display()))?;
    println!("{token}");
    eprintln!("token for {name} ({role}) added to {}; restart the coordinator to load it", tokens.display());
    Ok(())
}
