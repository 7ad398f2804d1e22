//! `hotfleet keygen` and `hotfleet patch build|sign|verify|show`: offline patch tooling.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context};
use clap::{Args, Subcommand};
use hotfleet_patch::{source_tree, Bundle, Limits, Manifest, SigningKeyFile, TrustedKeys, MANIFEST_FORMAT};

use crate::{
    client::{failure, Target},
    exit::{CliResult, Failure},
    output::{format_ms, Output},
    views,
};
use hotfleet_proto::v1::{ListPatchesRequest, PushPatchRequest};

#[derive(Debug, Subcommand)]
pub enum PatchCommand {
    /// Build a patch bundle from the changed modules of a source tree.
    Build(Box<BuildArgs>),
    /// Sign a bundle with an ed25519 key (made by `hotfleet keygen`).
    Sign {
        /// The bundle to sign (rewritten in place unless --out is given).
        bundle: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check a bundle's structure, digests and signature against trusted keys.
    Verify {
        bundle: PathBuf,
        /// Public key file or directory of *.pub files. Repeatable.
        #[arg(long = "trusted-key", required = true)]
        trusted_keys: Vec<PathBuf>,
    },
    /// Upload a signed bundle to the coordinator (verified there before it is stored).
    Push { bundle: PathBuf },
    /// Patches the coordinator holds.
    List {
        /// Only patches for this build.
        #[arg(long, default_value = "")]
        build: String,
    },
    /// What a patch would do inside one live game process: the runtime
    /// prepares it, answers its plan (functions replaced, classes updated,
    /// data kept or conflicting, hooks, refusals with line numbers), and the
    /// prepare is aborted: nothing is committed.
    Plan {
        /// Patch id (pushed to the coordinator already).
        patch: String,
        /// The node whose process(es) of the patch's build prepare it.
        #[arg(long)]
        node: String,
        /// Only this process of the node [default: every process of the build].
        #[arg(long)]
        process: Option<String>,
    },
    /// A build's patch stack (what every process of the build runs), oldest
    /// first, with who rolled each patch out and when.
    Stack {
        #[arg(long)]
        build: String,
    },
    /// Show a bundle's manifest.
    Show {
        bundle: PathBuf,
        /// Also print each module's source.
        #[arg(long)]
        sources: bool,
    },
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Source root holding the package directories (e.g. examples/zone_server).
    #[arg(long)]
    root: PathBuf,
    /// Top-level package the patch may change. Repeatable.
    #[arg(long = "package", required = true)]
    packages: Vec<String>,
    /// Ship the modules that differ from this older copy of the source root.
    #[arg(long, conflicts_with_all = ["git", "modules"])]
    base: Option<PathBuf>,
    /// Ship the modules changed in this git range (FROM..TO, TO defaults to HEAD).
    #[arg(long, conflicts_with_all = ["base", "modules"])]
    git: Option<String>,
    /// Ship exactly these modules. Repeatable.
    #[arg(long = "module")]
    modules: Vec<String>,
    /// Build id of the game servers this patch targets.
    #[arg(long)]
    target_build: String,
    /// Patch id this one builds on: the top of the build's patch stack.
    /// Agents refuse a patch whose parent is not the top of a process's
    /// stack; omit it only for a build's first patch.
    #[arg(long)]
    parent: Option<String>,
    #[arg(long, env = "HOTFLEET_AUTHOR")]
    author: Option<String>,
    #[arg(long, default_value = "")]
    description: String,
    /// Sign with this key right away.
    #[arg(long)]
    key: Option<PathBuf>,
    /// The Python the fleet runs: every packed module is compiled with it
    /// first, and a syntax error is refused.
    #[arg(long, env = "HOTFLEET_PYTHON", default_value = "python3")]
    python: String,
    #[arg(long)]
    out: PathBuf,
}

pub fn keygen(dir: &Path, output: Output) -> CliResult {
    let key = SigningKeyFile::generate().map_err(anyhow::Error::from)?;
    let (secret, public) = key.write_pair(dir).map_err(Failure::refused)?;
    let key_id = hotfleet_patch::key_id(&key.public());
    if output.structured() {
        output.print(&views::doc(
            "KeyPair",
            views::KeyPair {
                secret_key: secret.display().to_string(),
                public_key: public.display().to_string(),
                key_id,
            },
        ));
    } else {
        println!("signing key  {} (keep it secret; owner-only)", secret.display());
        println!("public key   {} (give it to agents and the coordinator: --trusted-key)", public.display());
        println!("key id       {key_id}");
    }
    Ok(())
}

pub async fn run(cmd: PatchCommand, target: &Target, output: Output) -> CliResult {
    match cmd {
        PatchCommand::Push { bundle } => push_file(target, &bundle, output, true).await.map(|_| ()),
        PatchCommand::List { build } => list(target, build, output).await,
        PatchCommand::Plan { patch, node, process } => {
            crate::plan_cmd::plan(target, patch, node, process, output).await
        }
        PatchCommand::Stack { build } => crate::stack_cmd::stack(target, build, output).await,
        PatchCommand::Build(args) => build(*args, target, output).await,
        PatchCommand::Sign { bundle, key, out } => sign(&bundle, &key, out.as_deref(), output),
        PatchCommand::Verify { bundle, trusted_keys } => verify(&bundle, &trusted_keys, output),
        PatchCommand::Show { bundle, sources } => show(&bundle, sources, output),
    }
}

/// Reads and structurally checks a bundle file.
pub fn read_bundle(path: &Path) -> Result<Bundle, Failure> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Bundle::decode(&bytes, &Limits::default())
        .map_err(|err| Failure::refused(anyhow!(err).context(format!("{} is not a valid patch", path.display()))))
}

fn write_bundle(path: &Path, bundle: &Bundle) -> anyhow::Result<()> {
    let tmp = path.with_extension("hfpatch.tmp");
    fs::write(&tmp, bundle.encode()).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Pushes a bundle file; returns its patch id.
pub async fn push_file(target: &Target, path: &Path, output: Output, report: bool) -> Result<String, Failure> {
    let bundle = read_bundle(path)?;
    let mut client = target.connect().await?;
    let response = client
        .push_patch(target.request(PushPatchRequest { bundle: bundle.encode() }))
        .await
        .map_err(|s| failure(&format!("the coordinator refused {}", path.display()), s))?
        .into_inner();
    if output.structured() && report {
        let patch = response.patch.as_ref().map(views::Patch::from);
        output.print(&views::doc("PushResult", views::PushResult { created: response.created, patch }));
    } else if report {
        let verb = if response.created { "staged" } else { "already staged" };
        println!("{verb}: patch {} (build {})", bundle.id(), bundle.manifest.target_build);
    }
    Ok(bundle.id())
}

/// Every patch id the coordinator holds, for prefixes and suggestions.
pub async fn known_patches(target: &Target) -> Result<Vec<String>, Failure> {
    let mut client = target.connect().await?;
    let answer = client
        .list_patches(target.request(ListPatchesRequest { target_build: String::new() }))
        .await
        .map_err(|s| failure("listing patches failed", s))?;
    Ok(answer.into_inner().patches.into_iter().map(|p| p.patch_id).collect())
}

async fn list(target: &Target, target_build: String, output: Output) -> CliResult {
    let mut client = target.connect().await?;
    let patches = client
        .list_patches(target.request(ListPatchesRequest { target_build }))
        .await
        .map_err(|s| failure("listing patches failed", s))?
        .into_inner()
        .patches;
    if output.structured() {
        output.print(&views::list("PatchList", patches.iter().map(views::Patch::from).collect()));
        return Ok(());
    }
    for p in &patches {
        println!(
            "{}  build {:<12} {} by {:<16} {} module(s)  {}",
            p.patch_id,
            p.target_build,
            format_ms(p.pushed_at_ms),
            p.pushed_by,
            p.modules.len(),
            p.description
        );
    }
    Ok(())
}

async fn build(args: BuildArgs, target: &Target, output: Output) -> CliResult {
    let picked = if let Some(base) = &args.base {
        source_tree::changed_against_dir(&args.root, base, &args.packages)
    } else if let Some(range) = &args.git {
        source_tree::changed_in_git(&args.root, range, &args.packages)
    } else if !args.modules.is_empty() {
        source_tree::named(&args.root, &args.modules, &args.packages)
    } else {
        return Err(Failure::refused(anyhow!(
            "say which modules to ship: --base OLD_DIR, --git FROM..TO or --module NAME"
        )));
    }
    .map_err(Failure::refused)?;
    for removed in &picked.removed {
        eprintln!("warning: module {removed} was removed; a hot patch cannot delete a module, it stays loaded");
    }
    if picked.modules.is_empty() {
        return Err(Failure::refused(anyhow!("no module changed: nothing to patch")));
    }
    let errors = crate::pycheck::syntax_errors(&args.python, &picked.modules).map_err(Failure::refused)?;
    if !errors.is_empty() {
        return Err(Failure::refused(anyhow!(
            "{} module(s) do not compile with {}; nothing was written:\n  {}",
            errors.len(),
            args.python,
            errors.join("\n  ")
        )));
    }
    warn_unknown_build(target, &args.target_build).await;
    let manifest = Manifest {
        format: MANIFEST_FORMAT.to_string(),
        target_build: args.target_build,
        parent: args.parent,
        packages: args.packages,
        modules: vec![],
        author: args.author.unwrap_or_else(default_author),
        created_at: now_rfc3339(),
        description: args.description,
    };
    let mut bundle = Bundle::create(manifest, picked.modules).map_err(Failure::refused)?;
    if let Some(key) = &args.key {
        bundle.sign(&SigningKeyFile::load(key).map_err(Failure::refused)?);
    }
    write_bundle(&args.out, &bundle)?;
    if output.structured() {
        output.print(&views::bundle(&bundle, false));
    } else {
        println!("built {} -> {}", bundle.id(), args.out.display());
        for entry in &bundle.manifest.modules {
            println!("  {:<40} {} bytes", entry.name, entry.size);
        }
        if !bundle.is_signed() {
            println!("unsigned: run `hotfleet patch sign {} --key KEY`", args.out.display());
        }
    }
    Ok(())
}

/// Warns when a coordinator answers and none of its nodes runs `build` (a
/// typo in --target-build would otherwise surface only at `rollout start`).
/// Silent when no coordinator is configured or reachable: building is offline work.
async fn warn_unknown_build(target: &Target, build: &str) {
    // Quiet and quick: only a coordinator already configured and reachable is asked.
    if target.connect_any().await.is_err() {
        return;
    }
    let Ok(summary) = crate::fleet_cmd::fleet_summary(target).await else { return };
    let mut builds: Vec<&str> = summary.by_build.keys().map(String::as_str).filter(|b| !b.is_empty()).collect();
    builds.sort_unstable();
    // Nodes that report no build yet say nothing either way.
    if !builds.is_empty() && !builds.contains(&build) {
        eprintln!(
            "warning: no node of the coordinator runs build {build} (its nodes run: {}); check --target-build",
            builds.join(", ")
        );
    }
}

fn sign(path: &Path, key: &Path, out: Option<&Path>, output: Output) -> CliResult {
    let mut bundle = read_bundle(path)?;
    let key = SigningKeyFile::load(key).map_err(Failure::refused)?;
    bundle.sign(&key);
    let target = out.unwrap_or(path);
    write_bundle(target, &bundle)?;
    if output.structured() {
        output.print(&views::bundle(&bundle, false));
    } else {
        println!("signed {} with key {} -> {}", bundle.id(), bundle.signer_id().unwrap_or_default(), target.display());
    }
    Ok(())
}

fn verify(path: &Path, trusted: &[PathBuf], output: Output) -> CliResult {
    let bundle = read_bundle(path)?;
    let trusted = TrustedKeys::load(trusted).map_err(Failure::refused)?;
    bundle.verify(&trusted).map_err(Failure::refused)?;
    if output.structured() {
        output.print(&views::bundle(&bundle, false));
    } else {
        println!("ok: patch {} signed by trusted key {}", bundle.id(), bundle.signer_id().unwrap_or_default());
    }
    Ok(())
}

fn show(path: &Path, sources: bool, output: Output) -> CliResult {
    let bundle = read_bundle(path)?;
    if output.structured() {
        output.print(&views::bundle(&bundle, sources));
        return Ok(());
    }
    let m = &bundle.manifest;
    println!("patch        {}", bundle.id());
    println!("target build {}", m.target_build);
    println!("parent       {}", m.parent.as_deref().unwrap_or("(none)"));
    println!("author       {}", m.author);
    println!("created at   {}", m.created_at);
    println!("signed by    {}", bundle.signer_id().as_deref().unwrap_or("(unsigned)"));
    if !m.description.is_empty() {
        println!("description  {}", m.description);
    }
    println!("modules:");
    for entry in &m.modules {
        println!(
            "  {:<40} {:>8} bytes  sha256 {}",
            entry.name,
            entry.size,
            entry.sha256.get(..16).unwrap_or(&entry.sha256)
        );
    }
    if sources {
        for (name, source) in &bundle.modules {
            println!("\n# ---- {name}\n{source}");
        }
    }
    Ok(())
}

/// `$USER@host`; without `$USER` (cron, a bare container) `$LOGNAME`, then
/// the numeric uid, so a bundle always names a traceable author (runbook §1).
fn default_author() -> String {
    let user = ["USER", "LOGNAME"]
        .iter()
        .find_map(|var| std::env::var(var).ok().filter(|v| !v.trim().is_empty()))
        // SAFETY: getuid cannot fail and touches no memory.
        .unwrap_or_else(|| format!("uid-{}", unsafe { libc::getuid() }));
    let host = fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    if host.is_empty() {
        user
    } else {
        format!("{user}@{host}")
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}
